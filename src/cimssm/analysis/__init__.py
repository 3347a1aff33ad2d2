"""Analyses run on a trained model: layer sensitivity (``sensitivity``), HPD vs baseline tables
(``hpd_compare``). Lightning-free: the callbacks and eval.py call them."""

from cimssm.analysis.sensitivity import (
    SensitivityUnit,
    run_sensitivity,
    sensitivity_analysis,
    sensitivity_units,
)

__all__ = ["SensitivityUnit", "run_sensitivity", "sensitivity_analysis", "sensitivity_units"]
