"""HPD vs baseline: one checkpoint evaluated under noise with decomp none and hpd variants.

Reads eval.py job directories (a multirun dir, single eval dirs, or both): each job's
``.hydra/config.yaml`` (the decomp and noise settings) and ``noise_eval_summary.csv`` (mean and
std over chips per level). For every HPD variant and noise level it reports the metric beside
the undecomposed model's at the same level and the relative improvement (HPD paper, arXiv
2508.11935):

    PPL:       (PPL_none − PPL_hpd) / PPL_none        (> 0: HPD lowers the perplexity)
    accuracy:  (acc_hpd − acc_none) / acc_none

Writes hpd_vs_baseline.csv, hpd_vs_baseline.md and hpd_vs_baseline.png (metric vs level per
variant, and the relative improvement) into the output folder:

    python -m cimssm.analysis.hpd_compare outputs/eval_multirun/hpd_vs_baseline/<date> [more dirs] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["collect_eval_jobs", "compare", "main", "variant_label", "write_comparison"]

_SUMMARY = "noise_eval_summary.csv"


def variant_label(decomp: dict[str, Any]) -> str:
    """``none``, or ``hpd:<target>`` plus ``:r<rank>``, ``:vt`` (swapped) and ``:ref=W`` (original)."""
    if decomp.get("method", "none") == "none":
        return "none"
    label = f"hpd:{decomp.get('target')}"
    if decomp.get("rank") is not None:
        label += f":r{decomp['rank']}"
    if decomp.get("analog_factor", "usigma") != "usigma":
        label += f":{decomp['analog_factor']}"
    if decomp.get("noise_reference", "factor") != "factor":
        label += ":ref=W"
    if decomp.get("digital_bits") is not None:
        label += f":d{decomp['digital_bits']}b"
    return label


def _job_dirs(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such directory (give eval.py run or multirun dirs)")
        out.extend(sorted({f.parent for f in p.rglob(_SUMMARY)}, key=lambda d: str(d)))
    return list(dict.fromkeys(out))


def collect_eval_jobs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per job x level x inference time: variant, decomp settings, profile, level, t,
    chips, ``<metric>_mean`` and ``<metric>_std`` (metric: ppl when present, else acc)."""
    rows: list[dict[str, Any]] = []
    for job in _job_dirs(paths):
        cfg_file = job / ".hydra" / "config.yaml"
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False) if cfg_file.is_file() else {}
        decomp = dict(cfg.get("decomp") or {"method": "none"})
        with open(job / _SUMMARY, newline="") as f:
            for s in csv.DictReader(f):
                metric = "ppl" if "ppl_mean" in s else "acc"
                rows.append(
                    {
                        "job": str(job),
                        "variant": variant_label(decomp),
                        "method": decomp.get("method", "none"),
                        "target": decomp.get("target") if decomp.get("method", "none") != "none" else "",
                        "rank": decomp.get("rank"),
                        "analog_factor": decomp.get("analog_factor"),
                        "noise_reference": decomp.get("noise_reference"),
                        "profile": s["profile"],
                        "level": float(s["level"]),
                        "t_inference": float(s["t_inference"]),
                        "chips": int(float(s["chips"])),
                        "metric": metric,
                        "mean": float(s[f"{metric}_mean"]),
                        "std": float(s[f"{metric}_std"] or 0.0),
                    }
                )
    return rows


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """HPD rows with the baseline (variant ``none``, same profile, level, t) and the relative
    improvement; the baseline rows themselves come first (improvement 0). Duplicate variants (a
    baseline evaluated once per swept target) keep their first job."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault((r["variant"], r["profile"], r["level"], r["t_inference"]), r)
    base = {k[1:]: r for k, r in seen.items() if k[0] == "none"}
    if not base:
        raise ValueError("no baseline: evaluate the same checkpoint with decomp=none as well")
    out = []
    for key, r in sorted(seen.items(), key=lambda kv: (kv[0][0] != "none", kv[0][0], kv[0][1:])):
        b = base.get(key[1:])
        if b is None:
            continue
        m, m0 = r["mean"], b["mean"]
        if r["metric"] == "ppl":
            rel = (m0 - m) / m0 if m0 and math.isfinite(m0) else float("nan")
        else:
            rel = (m - m0) / m0 if m0 else float("nan")
        out.append(
            {**{k: v for k, v in r.items() if k != "job"}, "baseline": m0, "relative_improvement": rel}
        )
    return out


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """One row per variant, one column per (profile, level, t): metric mean ± std over chips and,
    for HPD variants, the relative improvement against ``none`` at the same level."""
    variants = list(dict.fromkeys(r["variant"] for r in table))
    points = sorted({(r["profile"], r["level"], r["t_inference"]) for r in table})
    metric = "PPL" if table[0]["metric"] == "ppl" else table[0]["metric"]
    multi = len({p[0] for p in points}) > 1
    head = ["variant"] + [
        (f"{p[0]} " if multi else "") + f"{metric} @ {p[1]:g}" + (f", t={p[2]:g} s" if p[2] else "")
        for p in points
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r["variant"], r["profile"], r["level"], r["t_inference"]): r for r in table}
    for v in variants:
        cells = [v]
        for p in points:
            r = index.get((v, *p))
            if r is None:
                cells.append("")
                continue
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
            if v != "none":
                cell += f" ({100 * r['relative_improvement']:+.2f} %)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: Sequence[dict[str, Any]], path: Path) -> Path:
    """Left: metric vs noise level per variant (±std); right: relative improvement vs level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = table[0]["metric"]
    variants = list(dict.fromkeys(r["variant"] for r in table))
    colors = plt.get_cmap("tab20")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
    for i, v in enumerate(variants):
        rs = sorted((r for r in table if r["variant"] == v), key=lambda r: r["level"])
        xs = [100 * r["level"] for r in rs]
        style = {"color": "black" if v == "none" else colors(i % 20), "marker": "o", "label": v}
        a1.errorbar(xs, [r["mean"] for r in rs], yerr=[r["std"] for r in rs], capsize=3, **style)
        if v != "none":
            a2.plot(xs, [100 * r["relative_improvement"] for r in rs], **style)
    a1.set(xlabel="noise level (%)", ylabel=metric, title=f"{metric} under noise (mean ± std over chips)")
    if metric == "ppl":
        a1.set_yscale("log")
    a2.axhline(0.0, color="gray", lw=0.8)
    a2.set_yscale("symlog", linthresh=10.0)  # a few % and a collapse on one axis
    a2.set(
        xlabel="noise level (%)", ylabel="relative improvement (%)", title="HPD vs undecomposed (> 0: better)"
    )
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    fig.savefig(Path(path).with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_comparison(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Collect, compare and write hpd_vs_baseline.{csv,md,png} into ``out_dir`` (default: the
    first path); returns the comparison rows."""
    paths = list(paths)
    rows = collect_eval_jobs(paths)
    if not rows:
        raise FileNotFoundError(
            f"no {_SUMMARY} under {[str(p) for p in paths]}: run eval.py with a noise profile"
        )
    table = compare(rows)
    out = Path(out_dir or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    from cimssm.evaluation import write_rows_csv

    write_rows_csv(table, out / "hpd_vs_baseline.csv")
    (out / "hpd_vs_baseline.md").write_text(markdown(table))
    plot(table, out / "hpd_vs_baseline.png")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="eval.py run or multirun directories")
    parser.add_argument("--out", default=None, help="output folder (default: the first path)")
    args = parser.parse_args(argv)
    try:
        table = write_comparison(args.paths, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"hpd_compare: {err}")
        return 2
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
