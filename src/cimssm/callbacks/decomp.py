"""DecompCallback: after fit (best weights loaded, PTQ applied), swap the HPD targets in."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from cimssm.hardware.setup import apply_decomp

log = logging.getLogger("cimssm")


class DecompCallback(Callback):
    """Apply the ``decomp`` section (hardware/hpd.py) to the trained model.

    Runs right after :class:`~cimssm.callbacks.post_training.PostTrainingCallback`, so the
    factors come from the best (and, with PTQ, quantized) weights, and the test, the cost report,
    the noise evaluation and the sensitivity analysis all see the decomposed model. Checkpoints
    were written during fit and keep the plain layers.
    """

    def __init__(self, decomp: dict[str, Any]):
        self.decomp = decomp
        self.decomposed: list[str] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.decomposed = apply_decomp(pl_module.net, self.decomp)
        if self.decomposed:
            log.info("HPD applied to %s", ", ".join(self.decomposed))
