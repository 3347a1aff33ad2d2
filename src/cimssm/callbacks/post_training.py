"""Callbacks around training that apply hardware: training noise per step, PTQ after fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from cimssm.checkpoints import load_checkpoint, load_weights
from cimssm.hardware.setup import calibrate_ptq

log = logging.getLogger("cimssm")


def load_best_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Load the best checkpoint's weights into ``pl_module`` (weights_only); returns its path."""
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if not path or not Path(path).is_file():
        return None
    load_weights(pl_module, load_checkpoint(path)["state_dict"], path)
    return path


class TrainingNoiseCallback(Callback):
    """Noise-aware training: a fresh draw of the profile in every training forward.

    The noise is attached at the start of each training batch (draws keyed by (seed, step)) and
    removed at its end, so validation and every checkpoint see the clean weights only.
    """

    def __init__(self, profile: dict[str, Any], analog: dict[str, Any], seed: int):
        self.profile, self.analog, self.seed = profile, analog, seed
        self.handle = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        from cimssm.hardware.analog import attach_training_noise

        self.handle = attach_training_noise(pl_module.net, self.profile, self.analog, seed=self.seed)
        self.handle.resample(trainer.global_step)

    def _remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()


class PostTrainingCallback(Callback):
    """After fit: load the best checkpoint's weights, then (PTQ) quantize and calibrate.

    Runs first among the after-fit callbacks, so the test, the cost report and the noise
    evaluation all see the model that would be deployed. PTQ calibrates on the first
    ``calib_batches`` validation batches (a fixed order, so a rerun calibrates identically).
    """

    def __init__(self, quant: dict[str, Any] | None = None):
        self.quant = quant
        self.best_path: str | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        self.best_path = load_best_weights(trainer, pl_module)
        if self.quant is not None and self.quant.get("mode") == "ptq":
            dm = trainer.datamodule
            dm.setup("validate")
            n = calibrate_ptq(pl_module.net, self.quant, dm.val_dataloader())
            log.info("post-training quantization calibrated on %d batches", n)
