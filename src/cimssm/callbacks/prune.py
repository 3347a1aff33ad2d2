"""PruneCallback: after fit, structured pruning of the deployed model (QS4D), and its sweep plot.

The pruning itself is :func:`cimssm.prune.prune_state_dims`; this module wires it to a run:
the metric on the validation (or test) split, optional fine-tuning on the training split, and
the outputs in the run directory:

- prune_curve.csv: one row per step (step 0 = unpruned): kept fraction, d_state per layer,
  the metric, its drop against the unpruned model, within tolerance, accepted;
- prune_curve.png / .svg: the metric vs the kept fraction of the states;
- cost.json: a ``"pruned"`` section (the pruned model's ``total``, ``ratio_vs_unpruned``,
  ``ratio_vs_unpruned_fp32`` and the pruning ``record``);
- checkpoints/pruned.ckpt: the pruned weights with the pruning record, which
  :func:`cimssm.pipeline.rebuild_from_checkpoint` (eval.py) applies before loading.

The model stays pruned afterwards, so the test, the noise evaluation and metrics_final.json
describe the pruned model; ``prune/<metric>_unpruned`` keeps the number before pruning.

:class:`PruneSweepCallback` (a Hydra callback) gathers every job's prune_curve.csv after a
multirun into sweep_prune_curves.csv, sweep_prune_summary.md and sweep_prune_curve.png/.svg.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback
from torch import nn

from cimssm.prune import HIGHER_IS_BETTER, PruneResult, prune_state_dims

log = logging.getLogger("cimssm")

CURVE_CSV = "prune_curve.csv"
CURVE_PLOT = "prune_curve.png"
PRUNED_CKPT = "pruned.ckpt"
# Totals compared before and after pruning in cost.json and the logged metrics.
COST_KEYS = ("params", "memory_bytes", "macs_per_token", "ace", "energy_pj_per_token")


def _free_path(path: Path) -> Path:
    """``path``, or ``<stem>-v1<suffix>``, ``-v2``, ... when it exists: never overwrite."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-v{n}{path.suffix}")
    return candidate


def finetune_fn(
    batches: Callable[[], Any],
    task: str,
    steps: int,
    lr: float,
    lr_scale: float,
    optimizer: dict[str, Any],
    seed: int,
) -> Callable[[nn.Module], None]:
    """``finetune(net)``: ``steps`` AdamW steps on the training split after a pruning step.

    The parameter groups follow the model's hints (S4 convention, :func:`param_groups`), every
    learning rate scaled by ``lr_scale`` (fine-tuning lr / training lr). Quantizers attached to
    the model stay on (QAT stays QAT); training noise does not (fine-tuning is clean).
    """
    from cimssm.lit_module import IGNORE_INDEX, param_groups

    calls = {"n": 0}

    def finetune(net: nn.Module) -> None:
        calls["n"] += 1
        torch.manual_seed(seed + calls["n"])  # same run, same fine-tuning draws
        groups = param_groups(net, lr, float(optimizer.get("weight_decay", 0.0)))
        for g in groups:
            if g["lr"] != lr:  # a hinted group (SSM lr): scale it like the base lr
                g["lr"] = g["lr"] * lr_scale
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(optimizer.get("betas", (0.9, 0.999))))
        clip = optimizer.get("gradient_clip_val")
        net.train()
        it = iter(batches())
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(batches())
                x, y = next(it)
            logits = net(x)
            if task == "lm":
                logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(net.parameters(), float(clip))
            opt.step()
        net.eval()

    return finetune


# ----------------------------------------------------------------------------------- run files
def write_curve_csv(result: PruneResult, path: Path) -> None:
    rows = result.curve
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curve(result: PruneResult, path: Path, title: str = "") -> list[Path]:
    """The metric vs the kept fraction; the tolerance band below the unpruned value."""
    from matplotlib.figure import Figure

    from cimssm.sweeps.plots import save_figure

    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    ax = fig.add_subplot()
    m = result.metric
    xs = [r["kept_fraction"] for r in result.curve]
    ys = [r[m] for r in result.curve]
    ax.plot(xs, ys, color="0.5", lw=1, zorder=1)
    acc = [r for r in result.curve if r["accepted"]]
    rej = [r for r in result.curve if not r["accepted"]]
    ax.scatter([r["kept_fraction"] for r in acc], [r[m] for r in acc], color="C0", zorder=2, label="accepted")
    if rej:
        ax.scatter([r["kept_fraction"] for r in rej], [r[m] for r in rej], facecolors="none", edgecolors="C3",
                   zorder=2, label="outside tolerance")  # fmt: skip
    sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0
    limit = result.baseline - sign * result.tolerance
    ax.axhline(result.baseline, color="C0", ls=":", lw=1)
    ax.axhspan(min(limit, result.baseline), max(limit, result.baseline), color="C0", alpha=0.12, lw=0)
    ax.set_xlim(1.02, 0)
    ax.set_xlabel("kept fraction of the SSM states")
    ax.set_ylabel(m)
    ax.set_title(title or f"pruning: {m} vs kept states (tolerance {result.tolerance:g})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def cost_section(unpruned: dict, pruned: dict, record: dict) -> dict[str, Any]:
    """cost.json's ``"pruned"`` section: the pruned totals and their ratios to the unpruned model."""
    before, fp32 = unpruned["total"], unpruned["fp32_total"]
    after = pruned["total"]
    return {
        "record": record,
        "total": after,
        "ratio_vs_unpruned": {
            k: (after[k] / before[k] if before.get(k) else None) for k in after if k in before
        },
        "ratio_vs_unpruned_fp32": {
            k: (after[k] / fp32[k] if fp32.get(k) else None) for k in after if k in fp32
        },
    }


def config_state_dict(net: nn.Module, quant_mode: str) -> dict[str, torch.Tensor]:
    """The state_dict of ``net`` as a model rebuilt from its config holds it.

    With PTQ the quantizers were attached after training, so the rebuilt model has none: their
    state is left out and the clean weights (``a.parametrizations.w.original``) go back under
    their own names (``a.w``). With QAT the rebuilt model has the same quantizers: nothing changes.
    (The net itself is not touched: detaching from a deepcopy would strip the original too, as
    torch shares a parametrized module's class with its copies.)
    """
    state = net.state_dict()
    if quant_mode != "ptq":
        return {k: v.detach().cpu() for k, v in state.items()}
    from cimssm.hardware.core import TransformChain

    chains = [name + "." for name, m in net.named_modules() if isinstance(m, TransformChain)]
    out = {}
    for key, value in state.items():
        if ".parametrizations." in key:
            if not key.endswith(".original"):
                continue  # a quantizer's running range
            key = key.replace(".parametrizations.", ".").removesuffix(".original")
        elif any(key.startswith(c) for c in chains):
            continue  # a tap or input quantizer
        out[key] = value.detach().cpu()
    return out


def save_pruned_checkpoint(
    path: Path, pl_module: pl.LightningModule, record: dict, quant_mode: str, datamodule: Any = None
) -> Path:
    """A Lightning-format checkpoint that eval.py rebuilds: config, weights, pruning record."""
    state = {f"net.{k}": v for k, v in config_state_dict(pl_module.net, quant_mode).items()}
    ckpt: dict[str, Any] = {
        "state_dict": state,
        "hyper_parameters": dict(pl_module.hparams),
        "prune_record": record,
    }
    if datamodule is not None and hasattr(datamodule, "state_dict"):
        ckpt[type(datamodule).__qualname__] = datamodule.state_dict()
    path = _free_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------- callback
class PruneCallback(Callback):
    """After fit (and after PTQ and the cost report): prune the model, write the curve and cost.

    Args:
        prune: the ``prune`` config section (method, tolerance, step_fraction, finetune_steps,
            finetune_lr, metric, split, eval_batches, full_curve, save).
        analog: the ``analog`` section (which layers the cost report counts as analog).
        out_dir: the run directory.
        optimizer: the ``optimizer`` section (fine-tuning lr and betas).
        quant_mode: ``quant.mode``; PTQ quantizers are left out of the saved checkpoint.
        seed: the run seed (fine-tuning draws).
        seq_len: tokens per sequence for the cost report (None: per token only).
    """

    def __init__(
        self,
        prune: dict[str, Any],
        analog: dict[str, Any],
        out_dir: str | Path,
        optimizer: dict[str, Any] | None = None,
        quant_mode: str = "qat",
        seed: int = 0,
        seq_len: int | None = None,
    ):
        self.prune = dict(prune)
        self.analog = dict(analog)
        self.out_dir = Path(out_dir)
        self.optimizer = dict(optimizer or {})
        self.quant_mode = quant_mode
        self.seed = seed
        self.seq_len = seq_len
        self.result: PruneResult | None = None
        self.metrics: dict[str, float] = {}
        self.checkpoint: Path | None = None

    def _cost(self, net: nn.Module) -> dict:
        from cimssm.cost import cost_report

        return cost_report(
            net,
            quant=None,
            analog_globs=(self.analog.get("include", ["*"]), self.analog.get("exclude", [])),
            tile_size=int(self.analog.get("tile_size", 512)),
            seq_len=self.seq_len,
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        from cimssm.evaluation import evaluate_model

        p, task, net = self.prune, pl_module.task, pl_module.net
        metric = p.get("metric", "acc")
        dm = trainer.datamodule
        split = p.get("split", "val")
        dm.setup("validate" if split == "val" else "test")
        loader_fn = dm.val_dataloader if split == "val" else dm.test_dataloader
        max_batches = p.get("eval_batches")

        def evaluate(model: nn.Module) -> float:
            return evaluate_model(model, loader_fn(), task, max_batches)[metric]

        first_x = next(iter(loader_fn()))[0]
        seq_len = int(first_x.shape[1])  # L of the S4D kernel energy
        finetune = None
        if int(p.get("finetune_steps", 0)) > 0:
            dm.setup("fit")
            base_lr = float(self.optimizer.get("lr", 1e-3))
            lr = float(p.get("finetune_lr") or base_lr * float(self.optimizer.get("min_lr_ratio", 0.1)))
            finetune = finetune_fn(dm.train_dataloader, task, int(p["finetune_steps"]), lr, lr / base_lr,
                                   self.optimizer, self.seed)  # fmt: skip
        unpruned_cost = self._cost(net)
        log.info(
            "structured pruning of the SSM states (%s on %s, tolerance %g)", metric, split, p.get("tolerance")
        )
        self.result = result = prune_state_dims(
            net,
            evaluate,
            metric=metric,
            tolerance=float(p.get("tolerance", 0.01)),
            step_fraction=float(p.get("step_fraction", 0.125)),
            finetune=finetune,
            seq_len=seq_len,
            full_curve=bool(p.get("full_curve", True)),
        )
        pruned_cost = self._cost(net)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_curve_csv(result, self.out_dir / CURVE_CSV)
        plot_curve(result, self.out_dir / CURVE_PLOT)
        self._write_cost(unpruned_cost, pruned_cost, result.record)
        if p.get("save", True):
            self.checkpoint = save_pruned_checkpoint(
                self.out_dir / "checkpoints" / PRUNED_CKPT, pl_module, result.record, self.quant_mode, dm
            )
        self.metrics = self._metrics(result, unpruned_cost, pruned_cost)
        # Into callback_metrics so that train() puts them in metrics_final.json (and a sweep's summary).
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics)
        log.info(
            "pruned to %.3f of the states (d_state %s): %s %.4f, unpruned %.4f",
            result.kept_fraction,
            result.accepted["d_state"],
            metric,
            result.accepted[metric],
            result.baseline,
        )

    def _write_cost(self, unpruned: dict, pruned: dict, record: dict) -> None:
        from cimssm.cost import write_cost_json

        path = self.out_dir / "cost.json"
        report = unpruned
        if path.is_file():  # the cost report of this run: add the section, keep the rest
            try:
                report = json.loads(path.read_text())
            except ValueError:
                report = unpruned
        report["pruned"] = cost_section(unpruned, pruned, record)
        write_cost_json(report, path)

    @staticmethod
    def _metrics(result: PruneResult, unpruned: dict, pruned: dict) -> dict[str, float]:
        m = result.metric
        out = {
            "prune/kept_fraction": result.kept_fraction,
            f"prune/{m}": float(result.accepted[m]),
            f"prune/{m}_unpruned": result.baseline,
            "prune/steps_accepted": float(result.accepted["step"]),
        }
        for k in COST_KEYS:
            before, after = unpruned["total"].get(k), pruned["total"].get(k)
            if after is not None:
                out[f"prune/{k}"] = float(after)
                if before:
                    out[f"prune/{k}_ratio_vs_unpruned"] = float(after) / float(before)
        return out


# ------------------------------------------------------------------------------------ a sweep
SWEEP_CURVES_CSV = "sweep_prune_curves.csv"
SWEEP_SUMMARY_MD = "sweep_prune_summary.md"
SWEEP_PLOT = "sweep_prune_curve.png"
# Columns of prune_curve.csv (never sweep axes).
CURVE_COLUMNS = ("step", "kept_fraction", "kept_states", "d_state", "drop", "within_tolerance", "accepted",
                 *HIGHER_IS_BETTER)  # fmt: skip


def load_prune_curves(sweep_dir: str | Path):
    """Every job's prune_curve.csv under ``sweep_dir``, labelled with the job's config and metrics.

    One row per job x pruning step; the label and metric columns are those of
    :func:`cimssm.sweeps.collect.load_sweep` (one row per job, noise columns dropped).
    """
    import pandas as pd

    from cimssm.sweeps.collect import load_sweep

    root = Path(sweep_dir)
    jobs = load_sweep(root)
    if "job" not in jobs or jobs.empty:
        return pd.DataFrame()
    jobs = jobs.drop_duplicates("job").set_index("job")
    frames = []
    for job in jobs.index:
        path = (root if job == "." else root / job) / CURVE_CSV
        if not path.is_file():
            continue
        try:
            curve = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
        labels = jobs.loc[job].drop(
            labels=[c for c in ("profile", "level", "t_inference", "chips") if c in jobs]
        )
        curve = curve.assign(job=job, **{k: v for k, v in labels.items() if k not in curve})
        if "prune.tolerance" not in curve:
            curve["prune.tolerance"] = _tolerance_of(path.parent)
        frames.append(curve)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _tolerance_of(job: Path) -> float | None:
    from omegaconf import OmegaConf

    try:
        return float(OmegaConf.load(job / "config_resolved.yaml").prune.tolerance)
    except Exception:  # no resolved config (a synthetic or partial job): no tolerance line
        return None


def _label_text(value: Any) -> str:
    """A label value as text: None/NaN -> "null" (a float precision), 8.0 -> "8"."""
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _hue_keys(curves, hue: str | list[str] | None) -> list[str]:
    """``hue`` as a list, default the sweep's independent axes (seeds excluded) among the job labels."""
    from cimssm.sweeps.collect import independent_axes

    if hue is not None:
        keys = [hue] if isinstance(hue, str) else list(hue)
    else:
        labels = curves.drop_duplicates("job").drop(columns=[c for c in CURVE_COLUMNS if c in curves])
        keys = independent_axes(labels)
    return [k for k in keys if k in curves and k not in CURVE_COLUMNS and k not in ("job", "prune.tolerance")]


def _prune_metric(curves) -> str:
    return next((m for m in HIGHER_IS_BETTER if m in curves), "acc")


def plot_prune_curves(
    curves,
    hue: str | list[str] | None = None,
    *,
    path: str | Path | None = None,
    tolerance: float | None = None,
):
    """The metric and its drop vs the kept fraction of the states, one line per ``hue`` value.

    ``hue``: column(s) splitting the lines (default: the sweep's independent axes, seeds
    excluded). Jobs on one line (seeds) are averaged at each kept fraction, the band is their std.
    """
    from matplotlib.figure import Figure

    from cimssm.sweeps.plots import save_figure

    fig = Figure(figsize=(9.0, 3.6), dpi=120)
    ax_abs, ax_drop = fig.subplots(1, 2)
    if curves is None or len(curves) == 0:
        for ax in (ax_abs, ax_drop):
            ax.text(
                0.5, 0.5, "no prune_curve.csv in this sweep", ha="center", va="center", transform=ax.transAxes
            )
    else:
        metric = _prune_metric(curves)
        keys = _hue_keys(curves, hue)
        labelled = curves.assign(**{k: curves[k].map(_label_text) for k in keys})
        groups = labelled.groupby(keys, sort=True) if keys else [("", curves)]
        for values, sub in groups:
            values = values if isinstance(values, tuple) else (values,)
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or None
            for ax, col in ((ax_abs, metric), (ax_drop, "drop")):
                by = sub.groupby("kept_fraction", sort=True)[col]
                y, s = by.mean(), by.std(ddof=1).fillna(0.0)
                x = y.index.to_numpy(dtype=float)
                line = ax.plot(x, y.to_numpy(), marker="o", ms=3.5, label=label)[0]
                ax.fill_between(
                    x, (y - s).to_numpy(), (y + s).to_numpy(), color=line.get_color(), alpha=0.18, lw=0
                )
        if tolerance is None and "prune.tolerance" in curves and curves["prune.tolerance"].notna().any():
            tolerance = float(curves["prune.tolerance"].dropna().iloc[0])
        if tolerance is not None:
            ax_drop.axhline(tolerance, color="k", ls="--", lw=1, label=f"tolerance {tolerance:g}")
        ax_abs.set_ylabel(metric)
        ax_drop.set_ylabel(f"{metric} drop vs unpruned")
        ax_drop.legend(fontsize=7, loc="best")
        # Zoom on the decision: drops up to 5x the tolerance (the left panel shows the collapse).
        top = max(0.05, 5 * (tolerance or 0.01))
        ax_drop.set_ylim(bottom=min(-0.01, float(curves["drop"].min()) - 0.005), top=top)
    for ax in (ax_abs, ax_drop):
        ax.set_xlim(1.02, 0)
        ax.set_xlabel("kept fraction of the SSM states")
        ax.grid(alpha=0.3)
    fig.suptitle("structured pruning: metric vs kept states (mean over seeds, band: std)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def prune_table(curves, hue: str | list[str] | None = None):
    """One row per job: axes, seed, unpruned and pruned metric, kept fraction, ACE and its ratio."""
    import pandas as pd

    if curves is None or len(curves) == 0:
        return pd.DataFrame()
    metric = _prune_metric(curves)
    keys = _hue_keys(curves, hue)
    rows = []
    for job, sub in curves.groupby("job", sort=False):
        acc = sub[sub["accepted"].astype(str) == "True"]
        last = acc.iloc[-1] if len(acc) else sub.iloc[0]
        first = sub.iloc[0]
        row = {"job": job, **{k: _label_text(first.get(k)) for k in keys if k in sub}}
        if "seed" in sub and "seed" not in keys:
            row["seed"] = first.get("seed")
        row[f"{metric} unpruned"] = first[metric]
        row[f"{metric} pruned"] = last[metric]
        row["kept fraction"] = last["kept_fraction"]
        row["d_state"] = last["d_state"]
        for col, name in (("test/acc", "test/acc (pruned)"), ("prune/ace_ratio_vs_unpruned", "ACE ratio"),
                          ("prune/ace", "ACE (pruned)")):  # fmt: skip
            if col in sub:
                row[name] = first[col]
        rows.append(row)
    return pd.DataFrame(rows)


def write_prune_summary(sweep_dir: str | Path, hue: str | list[str] | None = None) -> dict[str, Path]:
    """sweep_prune_curves.csv, sweep_prune_summary.md and sweep_prune_curve.png/.svg in ``sweep_dir``."""
    from cimssm.sweeps.summary import markdown_table

    root = Path(sweep_dir)
    curves = load_prune_curves(root)
    out = {"csv": root / SWEEP_CURVES_CSV, "plot": root / SWEEP_PLOT, "markdown": root / SWEEP_SUMMARY_MD}
    curves.to_csv(out["csv"], index=False)
    plot_prune_curves(curves, hue, path=out["plot"])
    table = prune_table(curves, hue)
    lines = ["# Pruning summary", "", f"Sweep: `{root}`. One row per job; the pruned model is the last step "
             "within the tolerance (its metric on the pruning split; test/acc is the pruned model's test).", "",
             markdown_table(table)]  # fmt: skip
    seeds = seed_table(table, _hue_keys(curves, hue) if len(curves) else [])
    if len(seeds):
        lines += ["## Across seeds (mean ± std)", "", markdown_table(seeds)]
    lines += ["## Plot", "", f"![pruning curves]({out['plot'].name})", ""]
    out["markdown"].write_text("\n".join(lines))
    return out


def seed_table(table, keys: list[str]):
    """Mean ± std over seeds of :func:`prune_table`'s numbers, per value of ``keys`` (the axes)."""
    import pandas as pd

    if len(table) == 0 or "seed" not in table or table["seed"].nunique() < 2:
        return pd.DataFrame()
    keys = [k for k in keys if k in table and k != "seed"]
    numeric = [c for c in table.columns if c not in ("job", "seed", "d_state", *keys)]
    grouped = table.groupby(keys, sort=True) if keys else [((), table)]
    rows = []
    for values, sub in grouped:
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(keys, values))
        row["seeds"] = len(sub)
        for c in numeric:
            row[c] = f"{sub[c].mean():.4g} ± {sub[c].std(ddof=1):.2g}"
        rows.append(row)
    return pd.DataFrame(rows)


class PruneSweepCallback(HydraCallback):
    """Hydra callback: after a multirun, :func:`write_prune_summary` into the sweep dir.

    Put it under ``hydra.callbacks`` (conf/experiment/qs4d_pruning.yaml does); a failure is
    logged, not raised (``python -m cimssm.callbacks.prune <sweep dir>`` redoes it).
    """

    def __init__(self, hue: Any = None, enabled: bool = True):
        self.hue = list(hue) if hue is not None and not isinstance(hue, str) else hue
        self.enabled = enabled

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not self.enabled or not sweep_dir.is_dir():
            return
        try:
            paths = write_prune_summary(sweep_dir, self.hue)
        except Exception as err:  # the jobs' results stay on disk
            log.error("pruning summary failed (%s: %s); rerun: python -m cimssm.callbacks.prune %s",
                      type(err).__name__, err, sweep_dir)  # fmt: skip
            return
        log.info("pruning summary: %s", paths["markdown"])


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m cimssm.callbacks.prune <sweep dir>")
    print(write_prune_summary(sys.argv[1])["markdown"])
