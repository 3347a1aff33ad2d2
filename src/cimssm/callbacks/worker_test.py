"""The test after fit for spawning strategies (ddp_spawn), run inside the training processes.

With ``ddp_spawn`` the fit, and so every after-fit callback (best weights, PTQ, HPD, pruning),
runs in worker processes; the main process only gets the state_dict back, loaded non-strictly,
so a structural change made after fit (quantizer parametrizations, decomposed layers) never
reaches it, and a second spawn for ``trainer.test`` would also start a new CSV writer that
deletes the fit's metrics.csv. This callback tests the deployed model where it lives: on rank 0,
after the other after-fit callbacks, on the whole test split (each example once, as one process
does), and puts ``test/*`` into ``trainer.callback_metrics``, which Lightning sends back to the
main process, and into the loggers.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class TestInWorkerCallback(Callback):
    """``test/{loss,acc,ppl,bpc}`` of the model after fit, computed in the rank-0 worker.

    Args:
        max_batches: ``trainer.limit_test_batches`` when it is a batch count, else None (all).
    """

    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        from cimssm.evaluation import evaluate_model

        dm = trainer.datamodule
        dm.setup("test")
        result = evaluate_model(pl_module.net, dm.test_dataloader(), pl_module.task, self.max_batches)
        self.metrics = {f"test/{k}": float(v) for k, v in result.items()}
        for key, value in self.metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)


__all__ = ["TestInWorkerCallback"]
