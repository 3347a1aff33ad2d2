"""Callbacks that run around training: noise evaluation, cost report, sensitivity, pruning."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig


def after_fit_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """The callbacks that the hardware groups of ``cfg`` switch on."""
    return []
