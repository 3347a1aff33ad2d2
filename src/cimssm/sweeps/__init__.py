"""Sweeps: collect a multirun directory into one table and plots; record failed jobs.

    from cimssm.sweeps import load_sweep, plot_metric_vs_noise, plot_metric_vs_ace, write_sweep_summary
    df = load_sweep("outputs/multirun/default/2025-01-01_12-00-00")
    plot_metric_vs_noise(df, "acc", hue="quant")

Imports are lazy so that ``import cimssm.sweeps.failures`` (used in every job) stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load_sweep": "cimssm.sweeps.collect",
    "load_run": "cimssm.sweeps.collect",
    "aggregate_seeds": "cimssm.sweeps.collect",
    "sweep_axes": "cimssm.sweeps.collect",
    "plot_metric_vs_noise": "cimssm.sweeps.plots",
    "plot_metric_vs_ace": "cimssm.sweeps.plots",
    "write_sweep_summary": "cimssm.sweeps.summary",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cimssm.sweeps' has no attribute {name!r}")
