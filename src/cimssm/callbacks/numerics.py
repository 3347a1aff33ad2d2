"""Numerical guard for training: a NaN or Inf loss or gradient stops the run or skips the batch.

``numerics.on_nan`` chooses:

- ``stop`` (default): raise :class:`TrainingStopped` before the optimizer step, so the weights
  and every checkpoint stay finite. Its one-line message names the step, what was not finite
  and the last good checkpoint; ``train.py`` prints it and exits with status 3.
- ``skip``: drop the step's gradients (``p.grad = None``, so AdamW leaves the weights, its
  moments and weight decay untouched), count the batch in ``train/skipped_batches`` and go on;
  after ``numerics.max_consecutive_skips`` skips in a row the run stops as with ``stop`` (the
  model is then unlikely to recover by itself).

The check sits in ``on_before_optimizer_step``: after backward (gradients are final, and under
DDP already all-reduced) and before gradient clipping and the step. The loss is recorded in
``on_before_backward``. Under DDP the decision is reduced over ranks (any rank bad -> all act),
so no rank leaves the collective calls of the next step alone. With fp16 mixed precision the
gradient check is left to the GradScaler, which skips overflowing steps itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("cimssm")

ON_NAN_CHOICES = ("stop", "skip")


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message is one line naming the step and the last good checkpoint."""


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """'last good checkpoint: <path> (step N)', or that none was written yet."""
    from cimssm.callbacks.checkpointing import checkpoint_step

    for cb in trainer.checkpoint_callbacks:
        for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
            if path and Path(path).is_file():
                step = getattr(cb, "last_step", None) if path == getattr(cb, "last_model_path", "") else None
                step = step if step is not None else checkpoint_step(path)
                return f"last good checkpoint: {path}" + (
                    f" (global step {step})" if step is not None else ""
                )
    return "no checkpoint was written before this step"


def _describe(value: torch.Tensor) -> str:
    value = value.detach().float()
    if torch.isnan(value).any():
        return "nan"
    return "inf" if (value > 0).any() else "-inf"


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    # One reduction per tensor, one host sync in total; amax of a tensor with a NaN is NaN.
    peaks = torch.stack([g.detach().abs().amax().float() for g in grads if g.numel()])
    return bool(torch.isfinite(peaks).all())


class NonFiniteGuard(Callback):
    """Stop (or skip the batch) when the training loss or a gradient is NaN or Inf.

    Args:
        on_nan: "stop" or "skip".
        max_consecutive_skips: with "skip", stop after this many non-finite steps in a row.
        check_grads: also check the gradients (the loss is always checked).
    """

    def __init__(self, on_nan: str = "stop", max_consecutive_skips: int = 20, check_grads: bool = True):
        if on_nan not in ON_NAN_CHOICES:
            raise ValueError(
                f"numerics.on_nan={on_nan!r} is not allowed: choose one of {', '.join(ON_NAN_CHOICES)}"
            )
        self.on_nan = on_nan
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.check_grads = bool(check_grads)
        self.skipped = 0
        self._consecutive = 0
        self._bad_loss: str | None = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = _describe(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        check_grads = self.check_grads and not str(trainer.precision).startswith("16")
        bad_grads = check_grads and not _grads_finite(optimizer)
        bad = trainer.strategy.reduce_boolean_decision(bool(bad_loss or bad_grads), all=False)
        if not bad:
            self._consecutive = 0
            return
        step = trainer.global_step
        what = (
            f"loss ({bad_loss})"
            if bad_loss
            else ("gradient" if bad_grads else "loss or gradient on another rank")
        )
        if self.on_nan == "stop" or self._consecutive + 1 > self.max_consecutive_skips:
            why = (
                ""
                if self.on_nan == "stop"
                else f" after {self._consecutive} skipped steps in a row (numerics.max_consecutive_skips)"
            )
            raise TrainingStopped(
                f"training stopped: non-finite {what} in the step after global step {step}{why}; {last_good_checkpoint(trainer)}; "
                "lower optimizer.lr and resume with ckpt_path=last, or set numerics.on_nan=skip"
            )
        # Skip: without gradients AdamW leaves weights, moments and weight decay of this step alone.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self._consecutive += 1
        log.warning("non-finite %s at step %d: batch skipped (%d skipped so far)", what, step, self.skipped)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self.on_nan == "skip":
            pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._bad_loss = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self._consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self._consecutive = int(state_dict.get("consecutive", 0))


__all__ = ["NonFiniteGuard", "TrainingStopped", "last_good_checkpoint", "ON_NAN_CHOICES"]
