"""One LightningModule for every model x task: the place where models and hardware meet.

The backbone arrives built (and with its hardware transforms attached); this module owns the
loss, the metrics, the optimizer with S4-style parameter groups, and the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

IGNORE_INDEX = -100


def optim_hints(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: _optim hint}``: the hints as plain data, which survive pickling (a
    ddp_spawn worker receives parameters without their Python attributes)."""
    return {name: dict(p._optim) for name, p in model.named_parameters() if getattr(p, "_optim", None)}


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, hints: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups following the S4 convention: parameters with an ``_optim`` hint get their own.

    Parameters without a hint: weight decay on matrices, none on biases/norm weights (ndim < 2).
    ``hints`` (from :func:`optim_hints`) stands in for hints the parameters lost in transit.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        hint = dict(getattr(p, "_optim", None) or (hints or {}).get(name, {}))
        hint.setdefault("weight_decay", weight_decay if p.ndim >= 2 else 0.0)
        hint.setdefault("lr", lr)
        if hint["lr"] is None:
            hint["lr"] = lr
        key = tuple(sorted(hint.items()))
        groups.setdefault(key, {"params": [], **hint})["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LitSequenceModel(pl.LightningModule):
    """Trains and evaluates any model of ``cimssm.models`` on an lm or classification task.

    Args:
        net: the model (with hardware transforms attached, if any).
        task: "lm" (per-position targets, -100 ignored) or "classification".
        n_classes: output classes (vocabulary size for lm), for the accuracy metric.
        optimizer: dict with lr, weight_decay, betas, warmup_steps, min_lr_ratio.
        cfg: the resolved run config, stored in the checkpoint so eval.py can rebuild the run.
    """

    def __init__(
        self,
        net: nn.Module,
        task: str,
        n_classes: int,
        optimizer: dict[str, Any],
        cfg: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.net = net
        self.task = task
        self.n_classes = n_classes
        self.optim_cfg = dict(optimizer)
        self.optim_hints = optim_hints(net)
        self.save_hyperparameters({"cfg": cfg or {}, "task": task, "n_classes": n_classes})
        for split in ("val", "test"):
            setattr(self, f"{split}_loss", MeanMetric())
            setattr(
                self,
                f"{split}_acc",
                MulticlassAccuracy(num_classes=n_classes, average="micro", ignore_index=IGNORE_INDEX),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_and_logits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, y = batch
        logits = self.net(x)
        if self.task == "lm":
            flat_logits, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        else:
            flat_logits, flat_y = logits, y
        loss = F.cross_entropy(flat_logits.float(), flat_y, ignore_index=IGNORE_INDEX)
        return loss, flat_logits, flat_y

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        loss, logits, y = self.loss_and_logits(batch)
        if split == "train":
            # sync_dist: under DDP the logged loss is the global batch's, as in one process
            self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, sync_dist=True)
            return loss
        n_tokens = (y != IGNORE_INDEX).sum()
        mean_loss, acc = getattr(self, f"{split}_loss"), getattr(self, f"{split}_acc")
        mean_loss.update(loss.detach(), weight=n_tokens)
        acc.update(logits.detach(), y)
        self.log(f"{split}/loss", mean_loss, on_epoch=True, prog_bar=True)
        self.log(f"{split}/acc", acc, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_lm_metrics(self, split: str) -> None:
        # Perplexity and bits per character derive from the token-weighted mean loss.
        if self.task != "lm":
            return
        loss = getattr(self, f"{split}_loss").compute()
        self.log(f"{split}/ppl", torch.exp(loss), prog_bar=split == "val")
        self.log(f"{split}/bpc", loss / math.log(2.0))

    def on_validation_epoch_end(self) -> None:
        self._log_lm_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_lm_metrics("test")

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        groups = param_groups(self.net, cfg["lr"], cfg["weight_decay"], self.optim_hints)
        optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(int(cfg["warmup_steps"]), total // 2)
        floor = float(cfg["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, floor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
