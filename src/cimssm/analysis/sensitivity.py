"""Layer sensitivity: inject a noise profile into one unit of the model at a time.

Units (HPD, arXiv 2508.11935, layer-wise robustness study): every block (all its analog tensors
together), every component within each block, and every analog part outside the blocks:

- Mamba: components in_proj, conv1d, x_proj, dt_proj, A_log/D (the SSM matrix A = −exp(A_log)
  and the skip D), out_proj; outside: lm_head (classifier).
- S4D: components kernel (A real / imaginary parts and C), mixing; outside: encoder, decoder.
- a model without ``hardware_parts``: one component per Linear / Conv1d module.

Only analog tensors are units (the ``analog`` section and the profile's own ``targets`` decide,
as everywhere): an HPD digital factor or an excluded embedding is never perturbed.

For a unit u and level s, K chips are drawn (``monte_carlo_eval`` with the profile narrowed to
u's tensors). Every unit uses the same chip seeds, and a tensor's draws depend only on the chip
seed and its name, so a block's noise is exactly the union of its components' noise (common
random numbers: differences between units are not sampling noise of the draws). The metric m is
evaluated on the same batches as the clean model's m₀; the degradation of a chip is

    lower-is-better metrics (ppl, loss, bpc):  d = m / m₀ − 1      (relative increase)
    accuracy:                                  d = m₀ − m          (absolute drop)

and units are ranked by the mean d over chips (largest first; ties keep the unit order), per
(level, inference time). A unit that the forward pass never uses has d = 0 exactly.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from cimssm.hardware.analog import _profile_targets, build_analog_config, build_noise_profile
from cimssm.hardware.montecarlo import monte_carlo_eval, summarize_rows

log = logging.getLogger("cimssm")

__all__ = [
    "SensitivityUnit",
    "degradation",
    "format_ranking",
    "plot_sensitivity_heatmap",
    "run_sensitivity",
    "sensitivity_analysis",
    "sensitivity_units",
    "write_rows",
]

# Parts that form one component of a block (the rest: one component per part).
COMPONENT_OF_PART = {"A": "A_log/D", "D": "A_log/D", "A_real": "kernel", "A_imag": "kernel", "C": "kernel"}
LOWER_IS_BETTER = ("ppl", "loss", "bpc")
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class SensitivityUnit:
    """One unit: ``name`` (``block1``, ``block1/out_proj``, ``lm_head``), its block index (None
    outside the blocks), its component (``block`` for a whole block) and its analog tensors."""

    name: str
    block: int | None
    component: str
    targets: tuple[str, ...] = field(default_factory=tuple)


def _component(model: nn.Module, tensor: str, part: str, block: int | None) -> str:
    if getattr(model, "hardware_parts", None) is not None:
        return COMPONENT_OF_PART.get(part, part)
    owner = tensor.rpartition(".")[0]  # no parts: the owning module names the component
    if block is None:
        return owner
    return owner[_BLOCK.search(owner).end() :] if _BLOCK.search(owner) else owner


def sensitivity_units(
    model: nn.Module,
    profile: Mapping[str, Any] | None = None,
    analog: Mapping[str, Any] | None = None,
    blocks: bool = True,
    components: bool = True,
    outside: bool = True,
) -> list[SensitivityUnit]:
    """The units of ``model`` in a fixed order: per block the whole block then its components
    (in the order of ``hardware_parts``), then the parts outside the blocks."""
    prof = build_noise_profile(profile or {"kind": "gaussian", "level": 0.0})
    targets = _profile_targets(model, prof, build_analog_config(analog))  # [(name, {"part", "where"})]
    per_block: dict[int, dict[str, list[str]]] = {}
    outer: dict[str, list[str]] = {}
    for name, info in targets:
        m = _BLOCK.search(name)
        block = int(m.group(1)) if m else None
        comp = _component(model, name, info["part"], block)
        if block is None:
            outer.setdefault(comp, []).append(name)
        else:
            per_block.setdefault(block, {}).setdefault(comp, []).append(name)
    units: list[SensitivityUnit] = []
    for b in sorted(per_block):
        comps = per_block[b]
        if blocks:
            units.append(
                SensitivityUnit(f"block{b}", b, "block", tuple(n for ns in comps.values() for n in ns))
            )
        if components:
            units.extend(SensitivityUnit(f"block{b}/{c}", b, c, tuple(ns)) for c, ns in comps.items())
    if outside:
        units.extend(SensitivityUnit(c, None, c, tuple(ns)) for c, ns in outer.items())
    return units


def degradation(metric: str, value: float, clean: float) -> float:
    """m/m₀ − 1 for lower-is-better metrics (ppl, loss, bpc); m₀ − m otherwise (accuracy)."""
    if metric in LOWER_IS_BETTER:
        return value / clean - 1.0 if clean else math.inf
    return clean - value


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    profile: Mapping[str, Any],
    analog: Mapping[str, Any] | None,
    seed: int,
    metric: str,
    levels: Sequence[float] | None = None,
    chips: int | None = None,
    units: Sequence[SensitivityUnit] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per unit x level x inference time, ranked within each (level, time).

    ``evaluate(model)`` returns the metrics of the model as it is now (same batches every call).
    Row keys: unit, block, component, tensors, profile, level, t_inference, chips, metric, clean,
    mean, std, ci95, degradation, degradation_std, rank.
    """
    prof = build_noise_profile(profile)
    levels = list(prof["eval_levels"] if levels is None else levels)
    chips = int(prof["chips"] if chips is None else chips)
    units = list(sensitivity_units(model, prof, analog) if units is None else units)
    clean = float(dict(evaluate(model))[metric])
    out: list[dict[str, Any]] = []
    bar = _units_progress(progress)
    task = bar.add_task("sensitivity", total=len(units))
    with bar:
        for i, unit in enumerate(units):
            bar.update(task, description=f"sensitivity {unit.name}")
            unit_profile = {**prof, "targets": list(unit.targets), "eval_levels": levels, "chips": chips}
            chip_rows = monte_carlo_eval(
                model, evaluate, unit_profile, analog, seed, progress=False, profile_name=prof["name"]
            )
            out.extend(_unit_rows(unit, i, chip_rows, prof["name"], metric, clean))
            bar.advance(task)
    _rank(out)
    return out


def _units_progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )  # fmt: skip


def _unit_rows(
    unit: SensitivityUnit,
    order: int,
    chip_rows: list[dict[str, Any]],
    profile: str,
    metric: str,
    clean: float,
) -> list[dict[str, Any]]:
    """Summary rows of one unit (per level and time) with the degradation of its chips."""
    out = []
    for s in summarize_rows(chip_rows):
        ds = [
            degradation(metric, float(r[metric]), clean)
            for r in chip_rows
            if r["level"] == s["level"] and r["t_inference"] == s["t_inference"]
        ]
        d_mean = sum(ds) / len(ds)
        d_std = math.sqrt(sum((d - d_mean) ** 2 for d in ds) / (len(ds) - 1)) if len(ds) > 1 else 0.0
        out.append(
            {
                "unit": unit.name,
                "block": "" if unit.block is None else unit.block,
                "component": unit.component,
                "tensors": len(unit.targets),
                "profile": profile,
                "level": s["level"],
                "t_inference": s["t_inference"],
                "chips": s["chips"],
                "metric": metric,
                "clean": clean,
                "mean": s[f"{metric}_mean"],
                "std": s[f"{metric}_std"],
                "ci95": s[f"{metric}_ci95"],
                "degradation": d_mean,
                "degradation_std": d_std,
                "_order": order,
            }
        )
    return out


def _rank(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["level"], r["t_inference"]), []).append(r)
    for rs in groups.values():
        key = lambda r: (-(r["degradation"] if not math.isnan(r["degradation"]) else -math.inf), r["_order"])  # noqa: E731
        for k, r in enumerate(sorted(rs, key=key), start=1):
            r["rank"] = k
    for r in rows:
        r.pop("_order", None)


def ranking_point(rows: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """(level, t) the table and the heatmap show: the highest level, the last inference time."""
    return max(r["level"] for r in rows), max(r["t_inference"] for r in rows)


def _at(rows: Sequence[Mapping[str, Any]], point: tuple[float, float]) -> list[Mapping[str, Any]]:
    return sorted((r for r in rows if (r["level"], r["t_inference"]) == point), key=lambda r: r["rank"])


def format_ranking(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """The ranked units at the ranking point as a rich table rendered to text (for the log)."""
    from rich.console import Console
    from rich.table import Table

    point = ranking_point(rows)
    ranked = _at(rows, point)
    metric = ranked[0]["metric"]
    relative = metric in LOWER_IS_BETTER
    table = Table(
        title=title
        or f"layer sensitivity at level {point[0]:g}"
        + (f", t = {point[1]:g} s" if point[1] else "")
        + f" ({ranked[0]['chips']} chips; clean {metric} {ranked[0]['clean']:.4g})"
    )
    for col, just in (("rank", "right"), ("unit", "left"), ("tensors", "right"), (metric, "right"),
                      ("degradation" + (" (rel.)" if relative else ""), "right")):  # fmt: skip
        table.add_column(col, justify=just)
    for r in ranked:
        fmt = (lambda v: f"{100 * v:+.2f} %") if relative else (lambda v: f"{v:+.4f}")
        table.add_row(
            str(r["rank"]),
            r["unit"],
            str(r["tensors"]),
            f"{r['mean']:.4g} ± {r['std']:.2g}",
            f"{fmt(r['degradation'])} ± {fmt(r['degradation_std']).lstrip('+')}",
        )
    buf = io.StringIO()
    Console(file=buf, width=110, color_system=None).print(table)
    return buf.getvalue()


def plot_sensitivity_heatmap(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Heatmap blocks x components (+ the whole block) of the degradation at the ranking point,
    with the units outside the blocks as a second row of cells; PNG (and SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ranked = _at(rows, ranking_point(rows))
    inner = [r for r in ranked if r["block"] != ""]
    outer = sorted((r for r in ranked if r["block"] == ""), key=lambda r: r["unit"])
    if not inner and not outer:
        return None
    blocks = sorted({int(r["block"]) for r in inner})
    comps = _component_order(rows) + (["block"] if any(r["component"] == "block" for r in inner) else [])
    grid = np.full((len(blocks), len(comps)), np.nan)
    for r in inner:
        grid[blocks.index(int(r["block"])), comps.index(r["component"])] = r["degradation"]
    metric = ranked[0]["metric"]
    relative = metric in LOWER_IS_BETTER
    unit = 100.0 if relative else 1.0  # relative increases are drawn in percent
    grid *= unit
    outer_values = [unit * r["degradation"] for r in outer]
    values = [v for v in grid.ravel() if not np.isnan(v)] + outer_values
    vmin, vmax = min(0.0, min(values)), max(values) if max(values) > 0 else 1.0
    # Blocks x components on the left, the units outside the blocks as one column on the right.
    widths = [len(comps)] * bool(inner) + [1] * bool(outer)
    fig, axes = plt.subplots(
        1, len(widths), figsize=(0.95 * sum(widths) + 3.0, 0.5 * max(len(blocks), len(outer), 2) + 1.8),
        dpi=120, gridspec_kw={"width_ratios": widths}, squeeze=False,
    )  # fmt: skip
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")

    # Degradations can span decades (an unstable SSM next to a robust projection): log colours then.
    from matplotlib.colors import Normalize, SymLogNorm

    small = min((abs(v) for v in values if v), default=1.0)
    wide = vmax > 100 * max(small, 1e-12) and vmax > 10 * (1.0 if relative else 0.01)
    norm = (
        SymLogNorm(linthresh=1.0 if relative else 0.01, vmin=vmin, vmax=vmax)
        if wide
        else Normalize(vmin, vmax)
    )

    def draw(ax, data, xlabels, ylabels):
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                text = f"{v:.2f}%" if relative else f"{v:.3f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if norm(v) < 0.6 else "black")  # fmt: skip
        return im

    im = None
    if inner:
        im = draw(axes[0][0], grid, comps, [f"block {b}" for b in blocks])
    if outer:
        ax = axes[0][-1]
        im = draw(ax, np.array([[v] for v in outer_values]), ["outside blocks"], [r["unit"] for r in outer])
        ax.yaxis.tick_right()
    point = ranking_point(rows)
    label = f"{metric} increase (%)" if relative else f"{metric} drop"
    fig.colorbar(im, ax=list(axes[0]), label=label, shrink=0.9, pad=0.08)
    fig.suptitle(title or f"layer sensitivity, {ranked[0]['profile']} level {point[0]:g}", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    fig.savefig(Path(path).with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _component_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["component"] for r in rows if r["block"] != "" and r["component"] != "block"))


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    from cimssm.evaluation import write_rows_csv

    write_rows_csv(list(rows), Path(path))
    return Path(path)


def run_sensitivity(
    model: nn.Module,
    batches_fn: Callable[[], Any],
    task: str,
    profile: Mapping[str, Any],
    analog: Mapping[str, Any] | None,
    seed: int,
    out_dir: Path,
    levels: Sequence[float] | None = None,
    chips: int | None = None,
    max_batches: int | None = None,
    blocks: bool = True,
    components: bool = True,
    outside: bool = True,
    plot: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The whole analysis on a data split: sensitivity.csv, sensitivity.png, the ranking in the log.

    ``batches_fn()`` returns a fresh iterable of batches; each evaluation reads the first
    ``max_batches`` of them (the same ones every time). Metric: ppl for lm, acc otherwise.
    """
    from cimssm.evaluation import evaluate_model

    metric = "ppl" if task == "lm" else "acc"
    units = sensitivity_units(model, profile, analog, blocks, components, outside)
    if not units:
        raise ValueError(
            "sensitivity analysis: the model has no analog tensors to perturb (check analog.include)"
        )
    log.info("sensitivity analysis: %d units, profile %s", len(units), build_noise_profile(profile)["name"])

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_model(m, batches_fn(), task, max_batches)

    rows = sensitivity_analysis(
        model, evaluate, profile, analog, seed, metric, levels, chips, units, progress
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out_dir / "sensitivity.csv")
    log.info("layer sensitivity ranking (%s):\n%s", out_dir / "sensitivity.csv", format_ranking(rows))
    if plot:
        plot_sensitivity_heatmap(rows, out_dir / "sensitivity.png")
    return rows
