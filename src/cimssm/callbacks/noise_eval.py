"""NoiseEvalCallback: after fit, Monte-Carlo evaluation of the best checkpoint under noise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from cimssm.evaluation import noise_evaluation

log = logging.getLogger("cimssm")


def load_best_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Load the best checkpoint's weights into ``pl_module`` (weights_only); returns its path."""
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if not path or not Path(path).is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    pl_module.load_state_dict(state)
    return path


def log_noise_summary(trainer: pl.Trainer, summary: list[dict[str, Any]], metric: str, prefix: str = "noise") -> None:
    """Mean and std per level to every logger; a W&B table and line plot when W&B is on."""
    for logger in trainer.loggers:
        for r in summary:
            key = f"{prefix}/{metric}@{r['level']:g}" + (f"_t{r['t_inference']:g}" if r["t_inference"] else "")
            logger.log_metrics({f"{key}_mean": r[f"{metric}_mean"], f"{key}_std": r[f"{metric}_std"] or 0.0})
        if type(logger).__name__ == "WandbLogger":
            import wandb

            columns = list(summary[0])
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in summary])
            logger.experiment.log(
                {
                    f"{prefix}/summary": table,
                    f"{prefix}/{metric}_vs_level": wandb.plot.line(
                        table, "level", f"{metric}_mean", title=f"{metric} vs noise level"
                    ),
                }
            )


class NoiseEvalCallback(Callback):
    """Run after fit: K chips per noise level on the test split, with the best weights.

    Writes noise_eval.csv (one row per level x t_inference x chip), noise_eval_summary.csv and
    noise_eval.png in ``out_dir``, and logs mean/std per level to every logger.
    """

    def __init__(
        self,
        profile: dict[str, Any],
        analog: dict[str, Any],
        seed: int,
        out_dir: str | Path,
        max_batches: int | None = None,
    ):
        self.profile = profile
        self.analog = analog
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.max_batches = max_batches
        self.rows: list[dict[str, Any]] = []
        self.summary: list[dict[str, Any]] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        # PostTrainingCallback, earlier in the list, has loaded the best weights (and applied PTQ).
        log.info("noise evaluation with profile %s", self.profile.get("name"))
        dm = trainer.datamodule
        dm.setup("test")
        self.rows, self.summary = noise_evaluation(
            pl_module.net,
            dm.test_dataloader,
            pl_module.task,
            self.profile,
            self.analog,
            self.seed,
            self.out_dir,
            max_batches=self.max_batches,
        )
        log_noise_summary(trainer, self.summary, "ppl" if pl_module.task == "lm" else "acc")
