"""Monte-Carlo evaluation of a model under a noise profile (Lightning-free).

K chips per noise level; each chip is programmed once (its draws fixed by
``chip_seed(seed, profile, level, chip)``) and evaluated at every inference time (only the
time-dependent draws, e.g. PCM read noise, change with ``t``). The model is perturbed in place
through attached transforms, never copied, and the clean weights come back bit for bit after
each chip.

Speed, with the same numbers: each evaluation runs inside ``parametrize.cached()``, so a
perturbed weight is computed once per evaluation rather than once per batch; and when the noisy
tensors all sit in the last blocks and the head (e.g. ``analog.include=[backbone.layers.3.*,
lm_head.*]``) and ``evaluate`` can reuse a prefix (:class:`cimssm.evaluation.ModelEvaluator`), the
clean blocks in front of them run once per batch instead of once per chip and time
(:func:`clean_prefix_stop`, ``forward_hidden`` in docs/architecture.md).

Level 0 is deterministic for every kind (no random draw has any effect), so it is evaluated
once per inference time and its result is written as K identical rows (chips 0..K-1, column
``replicated`` True for chips 1..K-1): every (level, t) has K rows and summaries need no
special case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from cimssm.hardware.analog import _profile_targets, apply_noise, build_analog_config, build_noise_profile
from cimssm.hardware.noise import chip_seed

__all__ = ["chip_seed", "clean_prefix_stop", "monte_carlo_eval", "summarize_rows", "ID_COLUMNS"]

ID_COLUMNS = ("profile", "kind", "level", "t_inference", "chip", "seed", "status", "replicated")

# Two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30; beyond: 1.96.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def _t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]noise eval[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def clean_prefix_stop(model: nn.Module, profile: Mapping, analog: Mapping | None) -> int:
    """How many leading blocks of ``model`` no tensor of ``profile`` touches (0: none to reuse).

    Blocks are counted as in ``model.forward_hidden`` / ``model.layer_of`` (docs/architecture.md):
    the result is the block of the first noisy tensor (``n_layer`` when only the head is noisy);
    0 when the input layer is noisy, nothing is, or the model has no ``forward_hidden``.
    """
    layer_of = getattr(model, "layer_of", None)
    if not callable(layer_of) or not callable(getattr(model, "forward_hidden", None)):
        return 0
    prof = build_noise_profile(profile)
    if prof["kind"] == "none":
        return 0
    names = [name for name, _ in _profile_targets(model, prof, build_analog_config(analog))]
    return max(0, min((layer_of(n) for n in names), default=0))


def monte_carlo_eval(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    profile: Mapping,
    analog: Mapping | None,
    seed: int,
    levels: Sequence[float] | None = None,
    chips: int | None = None,
    t_inference: Sequence[float] | None = None,
    progress: bool = True,
    profile_name: str | None = None,
    reuse_prefix: bool = True,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` on K chips per level and every inference time; returns one row per eval.

    ``levels``, ``chips`` and ``t_inference`` default to the profile's ``eval_levels``, ``chips``
    and ``t_inference``. Row: ``profile, kind, level, t_inference, chip, seed`` (the chip seed),
    ``status`` ("ok", or "nan" when a metric came back NaN; NaN is recorded, never raised),
    ``replicated`` (a copy of the level-0 evaluation), then the metrics ``evaluate`` returned.
    ``evaluate(model)`` runs the forwards (it owns ``eval()`` / ``no_grad``); per-forward draws
    are keyed by (chip seed, t, forward index), so reruns with the same seed give identical rows.
    With ``reuse_prefix`` and an ``evaluate`` that has ``reuse_prefix(model, stop)`` (a context
    manager, :class:`cimssm.evaluation.ModelEvaluator`), the clean blocks in front of the first
    noisy one are computed once for all chips; the rows are the same either way.
    ``shard=(index, count)`` evaluates only every count-th (level, chip) job starting at index
    (multi-process: ``(rank, world_size)``); ``gather(rows)`` returns the rows of all shards
    (e.g. an all-gather), which are then sorted as one run's: the same rows as unsharded, since
    every draw is keyed by the chip seed, never by which process evaluates it.
    """
    prof = build_noise_profile(profile)
    name = profile_name or prof["name"]
    levels = list(prof["eval_levels"] if levels is None else levels)
    chips = int(prof["chips"] if chips is None else chips)
    times = list(prof["t_inference"] if t_inference is None else t_inference)
    if chips < 1:
        raise ValueError(f"chips={chips!r} must be >= 1")
    if prof["kind"] == "none":
        levels = [0.0]

    rows: list[dict[str, Any]] = []
    index, count = shard
    total = len(range(index, sum(1 if float(lv) == 0.0 else chips for lv in levels), count))
    job = -1
    stop = clean_prefix_stop(model, prof, analog) if reuse_prefix else 0
    reuse = getattr(evaluate, "reuse_prefix", None)
    prefix = reuse(model, stop) if stop > 0 and callable(reuse) else nullcontext()
    with prefix, _progress(progress) as bar:
        task = bar.add_task(f"{name}", total=total)
        for level in levels:
            level = float(level)
            n_eval = 1 if level == 0.0 else chips
            for chip in range(n_eval):
                job += 1
                if job % count != index:  # another process evaluates this one
                    continue
                bar.update(task, description=f"{name} level={level:g} chip={chip + 1}/{n_eval}")
                cs = chip_seed(seed, name, level, chip)
                with apply_noise(
                    model, prof, analog, seed, level, chip, times[0], profile_name=name
                ) as handle:
                    for t in times:
                        handle.set_time(t)
                        with parametrize.cached():  # each perturbed weight once per evaluation
                            metrics = {k: float(v) for k, v in dict(evaluate(model)).items()}
                        status = "nan" if any(math.isnan(v) for v in metrics.values()) else "ok"
                        row = {
                            "profile": name,
                            "kind": prof["kind"],
                            "level": level,
                            "t_inference": float(t),
                            "chip": chip,
                            "seed": cs,
                            "status": status,
                            "replicated": False,
                            **metrics,
                        }
                        rows.append(row)
                        if level == 0.0:
                            rows.extend({**row, "chip": c, "replicated": True} for c in range(1, chips))
                bar.advance(task)
    if gather is not None:
        rows = gather(rows)
    # rows in (level, t, chip) order
    order = {(lv, t): i for i, (lv, t) in enumerate((float(lv), float(t)) for lv in levels for t in times)}
    rows.sort(key=lambda r: (order[(r["level"], r["t_inference"])], r["chip"]))
    return rows


def summarize_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std (ddof 1), 95 % CI half-width (Student t) of every metric per (profile, level, t).

    NaN values are left out of the statistics and counted in ``{metric}_nan``; ``{metric}_n`` is
    the number of finite values. Columns: profile, level, t_inference, chips, then per metric
    ``_mean, _std, _ci95, _n, _nan``.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("profile"), r["level"], r["t_inference"]), []).append(r)
    out = []
    for (profile, level, t), rs in groups.items():
        metric_names = list(dict.fromkeys(k for r in rs for k in r if k not in ID_COLUMNS))
        s: dict[str, Any] = {"profile": profile, "level": level, "t_inference": t, "chips": len(rs)}
        for m in metric_names:
            vals = [float(r[m]) for r in rs if m in r and r[m] is not None]
            finite = [v for v in vals if not math.isnan(v)]
            n = len(finite)
            mean = sum(finite) / n if n else float("nan")
            std = (
                math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
                if n > 1
                else (0.0 if n else float("nan"))
            )
            ci = _t975(n - 1) * std / math.sqrt(n) if n > 1 else (0.0 if n else float("nan"))
            s.update(
                {f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci95": ci, f"{m}_n": n, f"{m}_nan": len(vals) - n}
            )
        out.append(s)
    return out
