"""Summarize an existing (or partial, or still running) sweep dir: table, markdown and plots.

    python scripts/summarize_sweep.py outputs/multirun/<experiment>/<date>
    python scripts/summarize_sweep.py outputs/multirun/<experiment>/<date> --metric ppl --hue quant

Writes sweep_summary.csv, sweep_summary_seeds.csv, sweep_summary.md and
sweep_<metric>_vs_noise / _vs_ace (.png, .svg) into the sweep dir and prints the markdown.
Exit status 2 (one line on stderr) when the dir does not exist or holds no job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

METRICS = ("acc", "ppl", "loss", "bpc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (or a single run dir)")
    parser.add_argument(
        "--metric", choices=METRICS, default=None, help="noise metric (default: ppl for LM, else acc)"
    )
    parser.add_argument(
        "--hue", action="append", default=None, help="column that splits plot lines (repeatable)"
    )
    args = parser.parse_args(argv)

    from cimssm.sweeps.collect import find_job_dirs
    from cimssm.sweeps.summary import write_sweep_summary

    if not args.sweep_dir.is_dir():
        sys.stderr.write(f"summarize_sweep: {args.sweep_dir} is not a directory\n")
        return 2
    if not find_job_dirs(args.sweep_dir):
        sys.stderr.write(
            f"summarize_sweep: no job dirs (with .hydra/overrides.yaml or metrics) under {args.sweep_dir}\n"
        )
        return 2
    paths = write_sweep_summary(args.sweep_dir, metric=args.metric, hue=args.hue)
    print(paths["markdown"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
