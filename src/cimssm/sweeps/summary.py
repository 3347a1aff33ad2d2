"""Write a sweep's summary: CSV tables, a markdown report and the plots, into the sweep dir.

``write_sweep_summary(sweep_dir)`` is what the Hydra callback runs after a multirun and what
``scripts/summarize_sweep.py`` runs on any existing or partial sweep dir. It (re)writes only its
own derived files, never a job's outputs:

- sweep_summary.csv: one row per job x noise level (x inference time), mean and std over chips;
- sweep_summary_seeds.csv: mean and std across training seeds per sweep point;
- sweep_summary.md: per-job table, across-seed table, failed jobs with their errors, plot links;
- sweep_<metric>_vs_noise.{png,svg} and sweep_<metric>_vs_ace.{png,svg}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from cimssm.sweeps.collect import aggregate_seeds, default_metric, independent_axes, load_sweep
from cimssm.sweeps.plots import plot_metric_vs_ace, plot_metric_vs_noise

SUMMARY_CSV = "sweep_summary.csv"
SEEDS_CSV = "sweep_summary_seeds.csv"
SUMMARY_MD = "sweep_summary.md"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` (floats to 4 significant digits; no extra dependency)."""
    if df.empty:
        return "_(none)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    return f"{mean:.4g} ± {std:.2g}" if std is not None and not math.isnan(std) else f"{mean:.4g}"


def _point_label(df: pd.DataFrame) -> pd.Series:
    """``1%`` per noise row; ``gauss_1pct:1%`` when profiles differ; `` t=3600s`` when times differ."""
    if "level" not in df:
        return pd.Series([""] * len(df), index=df.index)
    label = (100 * df["level"].astype(float)).map(lambda v: "" if math.isnan(v) else f"{v:g}%")
    if "profile" in df and df["profile"].nunique() > 1:
        label = df["profile"].astype(str) + ":" + label
    if "t_inference" in df and df["t_inference"].nunique() > 1:
        label = label + df["t_inference"].map(lambda t: f" t={t:g}s")
    return label


def _clean_metric(df: pd.DataFrame, metric: str) -> str | None:
    for col in (f"test/{metric}", f"val/{metric}", "test/acc", "test/loss"):
        if col in df:
            return col
    return None


def job_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per job: status, axes, seed, clean metric, ACE and ``metric`` at each noise level."""
    if df.empty:
        return df
    axes = independent_axes(df)
    first = df.drop_duplicates("job").set_index("job")
    cols = ["status", *axes] + (["seed"] if "seed" in first and "seed" not in axes else [])
    clean = _clean_metric(df, metric)
    cols += [c for c in (clean, "cost/ace") if c and c in first]
    table = first[cols].copy()
    mean_col, std_col = f"{metric}_mean", f"{metric}_std"
    if mean_col in df:
        noisy = df[df[mean_col].notna()].assign(_point=_point_label(df))
        for point, sub in noisy.groupby("_point", sort=False):
            stds = sub[std_col] if std_col in sub else sub[mean_col] * float("nan")
            values = {job: _pm(m, s) for job, m, s in zip(sub["job"], sub[mean_col], stds)}
            table[f"{metric}@{point}"] = [values.get(job, "") for job in table.index]
    return table.reset_index()


def seeds_table(seeds: pd.DataFrame, df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Across-seed table: axes, n_seeds, clean metric and ``metric`` per level as mean ± std."""
    if seeds.empty:
        return seeds
    axes = [a for a in independent_axes(df) if a in seeds]
    clean = _clean_metric(df, metric)
    key_cols = axes + ["n_seeds"]
    mean_col = f"{metric}_mean"
    rows: dict[tuple, dict[str, Any]] = {}
    has_level = "level" in seeds and seeds["level"].notna().any()
    point = _point_label(seeds) if has_level else pd.Series([""] * len(seeds), index=seeds.index)
    for idx, r in seeds.iterrows():
        key = tuple(str(r[a]) for a in axes)
        row = rows.setdefault(key, {**{a: r[a] for a in axes}, "n_seeds": r["n_seeds"]})
        if clean and f"{clean}_seed_mean" in seeds:
            row[clean] = _pm(r[f"{clean}_seed_mean"], r[f"{clean}_seed_std"])
        if "cost/ace_seed_mean" in seeds:
            row["cost/ace"] = r["cost/ace_seed_mean"]
        if has_level and f"{mean_col}_seed_mean" in seeds and not math.isnan(r[f"{mean_col}_seed_mean"]):
            row[f"{metric}@{point[idx]}"] = _pm(r[f"{mean_col}_seed_mean"], r[f"{mean_col}_seed_std"])
    out = pd.DataFrame(list(rows.values()))
    rest = [c for c in out.columns if c not in key_cols]
    return out[[c for c in key_cols if c in out] + rest]


def write_sweep_summary(
    sweep_dir: str | Path, metric: str | None = None, hue: str | list[str] | None = None
) -> dict[str, Path]:
    """Collect ``sweep_dir`` and write the summary files into it; returns {name: path}.

    ``metric``: the noise metric (acc, ppl, loss, bpc; default ppl for language models, else acc).
    ``hue``: column(s) that split the lines of the noise plot (default: the sweep's axes).
    """
    root = Path(sweep_dir)
    df = load_sweep(root)
    metric = metric or default_metric(df)
    out: dict[str, Path] = {}
    out["csv"] = root / SUMMARY_CSV
    df.to_csv(out["csv"], index=False)
    seeds = aggregate_seeds(df) if "status" in df and (df["status"] == "ok").any() else pd.DataFrame()
    if not seeds.empty:
        out["seeds_csv"] = root / SEEDS_CSV
        seeds.to_csv(out["seeds_csv"], index=False)
    out["noise_plot"] = root / f"sweep_{metric}_vs_noise.png"
    plot_metric_vs_noise(df, metric, hue, path=out["noise_plot"])
    out["ace_plot"] = root / f"sweep_{metric}_vs_ace.png"
    plot_metric_vs_ace(df, path=out["ace_plot"])

    counts = df.drop_duplicates("job")["status"].value_counts().to_dict() if "status" in df else {}
    lines = [
        f"# Sweep summary: {root}",
        "",
        f"{df['job'].nunique() if 'job' in df else 0} jobs: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s)
        + ". "
        + f"Noise metric: {metric} (mean ± std over chips; across seeds in the second table).",
        "",
        "## Jobs",
        "",
        markdown_table(job_table(df, metric)),
    ]
    if not seeds.empty and (seeds["n_seeds"] > 1).any():
        lines += ["## Across seeds", "", markdown_table(seeds_table(seeds, df, metric))]
    failed = df[df["status"] == "failed"].drop_duplicates("job") if "status" in df else df.iloc[0:0]
    if len(failed):
        lines += ["## Failed jobs", "", markdown_table(failed[["job", "error"]])]
    lines += [
        "## Plots",
        "",
        f"![{metric} vs noise level]({out['noise_plot'].name})",
        "",
        f"![{metric} vs ACE]({out['ace_plot'].name})",
        "",
    ]
    out["markdown"] = root / SUMMARY_MD
    out["markdown"].write_text("\n".join(lines))
    return out


__all__ = ["write_sweep_summary", "job_table", "seeds_table", "markdown_table"]
