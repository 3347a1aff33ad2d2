"""Plots of a sweep DataFrame (from :func:`cimssm.sweeps.collect.load_sweep`), for notebooks and the summary.

- :func:`plot_metric_vs_noise`: metric vs noise level, one line per precision (or decomposition,
  or any sweep axis), mean with a ±1 std band. The band is the std across seeds when a line has
  several seeds at a level, else the std across chips.
- :func:`plot_metric_vs_ace`: metric vs arithmetic computation effort (QS4D's ACE,
  ``ACE = H·N·(r_A + r_B + r_C)·r_act + H²·r_act·r_lin`` per layer, summed; ``cost/ace``),
  log x axis: the accuracy/cost trade-off of QS4D Fig. 3.

Both build a ``matplotlib.figure.Figure`` without pyplot (no global backend switch, safe in a
Hydra callback and in a notebook), draw into ``ax`` when one is given, and write PNG and SVG when
``path`` is given (``path`` with or without suffix).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cimssm.sweeps.collect import default_metric, independent_axes

FIGSIZE = (5.6, 3.8)


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Write ``fig`` as ``<path>.png`` and ``<path>.svg``; returns both paths."""
    base = Path(path)
    if base.suffix in (".png", ".svg"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    out = [base.with_suffix(".png"), base.with_suffix(".svg")]
    for p in out:
        fig.savefig(p, bbox_inches="tight")
    return out


def _figure(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=FIGSIZE, dpi=120)
    return fig, fig.add_subplot()


def _as_list(hue: str | Sequence[str] | None) -> list[str]:
    if hue is None:
        return []
    return [hue] if isinstance(hue, str) else list(hue)


def _label(keys: list[str], values) -> str:
    if not keys:
        return ""
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values))


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


def _groups(df: pd.DataFrame, keys: list[str]):
    """(label, sub-frame) per distinct value of ``keys`` (None/NaN kept as its own value)."""
    if not keys:
        yield "", df
        return
    labels = df[keys].astype(object).where(df[keys].notna(), "null").astype(str)
    for values, idx in labels.groupby(keys, sort=True).groups.items():
        yield _label(keys, values), df.loc[idx]


def plot_metric_vs_noise(
    df: pd.DataFrame,
    metric: str | None = None,
    hue: str | Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    logx: bool | None = None,
) -> Figure:
    """``<metric>_mean`` vs noise level (in %), one line per value of ``hue``.

    ``metric``: a noise-evaluation metric name (``acc``, ``ppl``, ``loss``, ``bpc``; default ppl
    for language models, else acc). ``hue``: column(s) that split lines; default: the sweep's
    independent axes (seeds excluded), plus ``t_inference`` when it varies. Several jobs on one
    line at one level (seeds) are averaged, the band is their std; a single job's band is its
    std over chips. ``logx``: symmetric-log x axis (default: when levels span 2+ decades).
    """
    metric = metric or default_metric(df)
    mean_col, std_col = f"{metric}_mean", f"{metric}_std"
    fig, ax = _figure(ax)
    data = _finished(df)
    if "level" in data and mean_col in data:
        data = data[data["level"].notna() & data[mean_col].notna()]
    else:
        data = data.iloc[0:0]
    keys = _as_list(hue) if hue is not None else independent_axes(data)
    if hue is None and "t_inference" in data and data["t_inference"].nunique() > 1:
        keys.append("t_inference")
    band_kind = set()
    for label, sub in _groups(data, keys) if len(data) else ():
        by_level = sub.groupby("level", sort=True)
        n_jobs = by_level[mean_col].count()
        if (n_jobs > 1).any():
            y = by_level[mean_col].mean()
            s = by_level[mean_col].std(ddof=1).fillna(0.0)
            band_kind.add("seeds")
        else:
            y = by_level[mean_col].first()
            s = by_level[std_col].first().fillna(0.0) if std_col in sub else y * 0.0
            band_kind.add("chips")
        x = 100.0 * y.index.to_numpy(dtype=float)
        line = ax.plot(x, y.to_numpy(), marker="o", ms=3.5, label=label or None)[0]
        ax.fill_between(x, (y - s).to_numpy(), (y + s).to_numpy(), color=line.get_color(), alpha=0.18, lw=0)
    positive = data["level"][data["level"] > 0] if len(data) else pd.Series(dtype=float)
    if logx is None:
        logx = len(positive) > 0 and positive.max() / positive.min() >= 100
    if logx and len(positive):
        ax.set_xscale("symlog", linthresh=100.0 * float(positive.min()))
    ax.set_xlabel("noise level (%)")
    ax.set_ylabel(f"{metric} (mean)")
    band = " / ".join(f"std across {k}" for k in sorted(band_kind))
    ax.set_title(title or f"{metric} vs noise level" + (f" (band: {band})" if band else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if keys and len(data):
        ax.legend(fontsize=7, loc="best")
    if len(data) == 0:
        ax.text(
            0.5, 0.5, "no noise evaluation in this sweep", ha="center", va="center", transform=ax.transAxes
        )
    if path is not None:
        save_figure(fig, path)
    return fig


def _ace_metric(df: pd.DataFrame, metric: str | None, level: float | None) -> tuple[pd.DataFrame, str, str]:
    """One row per job with a ``_y`` column: the clean metric, or a noise metric at ``level``."""
    if level is not None:
        name = metric or default_metric(df)
        col = f"{name}_mean"
        rows = df[np.isclose(df["level"].astype(float), level)] if "level" in df else df.iloc[0:0]
        label = f"{name} at {100 * level:g} % noise"
    else:
        col = metric or ("test/ppl" if default_metric(df) == "ppl" else "test/acc")
        rows = df.drop_duplicates("job") if "job" in df else df
        label = col
    if col not in rows:
        return rows.iloc[0:0].assign(_y=[]), label, col
    rows = rows.assign(_y=rows[col].astype(float))
    return rows[rows["_y"].notna()], label, col


def plot_metric_vs_ace(
    df: pd.DataFrame,
    metric: str | None = None,
    hue: str | Sequence[str] | None = None,
    *,
    level: float | None = None,
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Metric vs ACE (``cost/ace``, log scale): the QS4D accuracy/cost trade-off.

    ``metric``: a clean metric column (default ``test/acc``, ``test/ppl`` for language models), or
    with ``level`` a noise metric name (``acc``) read at that noise level. ``hue``: column(s)
    whose values are connected as one line, sorted by ACE (default: ``quant.mode`` when it is an
    axis, else every point on its own); each point is annotated with the other axes. Seeds at one
    point are averaged with a ±1 std error bar.
    """
    fig, ax = _figure(ax)
    data = _finished(df)
    data, ylabel, _ = _ace_metric(data, metric, level)
    if "cost/ace" in data:
        data = data[data["cost/ace"].notna() & (data["cost/ace"] > 0)]
    else:
        data = data.iloc[0:0]
    axes = independent_axes(data) if len(data) else []
    if hue is None:
        keys = ["quant.mode"] if "quant.mode" in axes else []
    else:
        keys = _as_list(hue)
    point_keys = [a for a in axes if a not in keys]
    for label, sub in _groups(data, keys) if len(data) else ():
        pts = (
            sub.assign(_point=sub[point_keys].astype(object).where(sub[point_keys].notna(), "null").astype(str).agg(", ".join, axis=1) if point_keys else "")
            .groupby("_point", sort=False)
            .agg(
                ace=("cost/ace", "mean"),
                y=("_y", "mean"),
                s=("_y", lambda v: v.std(ddof=1) if len(v) > 1 else 0.0),
            )
            .sort_values("ace")
        )
        container = ax.errorbar(
            pts["ace"],
            pts["y"],
            yerr=pts["s"],
            marker="o",
            ms=4,
            capsize=2,
            ls="-" if keys else "none",
            label=label or None,
        )
        for name, row in pts.iterrows():
            if name:
                ax.annotate(
                    name,
                    (row["ace"], row["y"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color=container.lines[0].get_color(),
                )
    if len(data):
        ax.set_xscale("log")
    ax.set_xlabel("ACE (arithmetic computation effort, bit-ops)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} vs ACE", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if keys and len(data):
        ax.legend(fontsize=7, loc="best")
    if len(data) == 0:
        ax.text(
            0.5, 0.5, "no cost.json with ACE in this sweep", ha="center", va="center", transform=ax.transAxes
        )
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = ["plot_metric_vs_noise", "plot_metric_vs_ace", "save_figure"]
