"""Apply the quant / noise / decomp sections of a run config to a model (no Lightning here)."""

from __future__ import annotations

from torch import nn


def attach_training_hardware(net: nn.Module, cfg) -> list[str]:
    """Attach what must be present during training: QAT quantizers and training noise."""
    return []
