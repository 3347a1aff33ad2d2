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


def summary_metrics(summary: list[dict[str, Any]], metric: str, prefix: str = "noise") -> dict[str, float]:
    """``{prefix}/{m}@{level}[_t{t}]_mean`` and ``_std`` per summary row (e.g. ``noise/acc@0.01_mean``)
    for ``metric`` and accuracy (every task has one): the keys a sweeper can optimize."""
    out = {}
    for r in summary:
        at = f"@{r['level']:g}" + (f"_t{r['t_inference']:g}" if r["t_inference"] else "")
        for m in dict.fromkeys([metric, "acc"]):
            if f"{m}_mean" in r:
                out[f"{prefix}/{m}{at}_mean"] = float(r[f"{m}_mean"])
                out[f"{prefix}/{m}{at}_std"] = float(r[f"{m}_std"] or 0.0)
    return out


def log_noise_summary(
    trainer: pl.Trainer, summary: list[dict[str, Any]], metric: str, prefix: str = "noise", plot: Path | None = None
) -> None:
    """Mean and std per level to every logger; with W&B also the summary table, a line plot and
    the ``plot`` image (noise_eval.png), so a W&B dashboard can compare the runs of a sweep."""
    for logger in trainer.loggers:
        logger.log_metrics(summary_metrics(summary, metric, prefix))
        if type(logger).__name__ == "WandbLogger":
            import wandb

            columns = list(summary[0])
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in summary])
            payload = {
                f"{prefix}/summary": table,
                f"{prefix}/{metric}_vs_level": wandb.plot.line(
                    table, "level", f"{metric}_mean", title=f"{metric} vs noise level"
                ),
            }
            if plot is not None and Path(plot).is_file():
                payload[f"{prefix}/{metric}_vs_level_plot"] = wandb.Image(str(plot))
            logger.experiment.log(payload)


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank (torch.distributed all_gather_object, gloo or nccl)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


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
        self.metric = "acc"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        # PostTrainingCallback, earlier in the list, has loaded the best weights (and applied PTQ).
        # Multi-process: every rank evaluates its share of the chips on the whole test split (the
        # datamodule's own loader, not a distributed one) and rank 0 writes the gathered rows.
        world = trainer.world_size
        if trainer.is_global_zero:
            log.info("noise evaluation with profile %s on %d process(es)", self.profile.get("name"), world)
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
            progress=trainer.is_global_zero,
            shard=(trainer.global_rank, world),
            gather=gather_rows if world > 1 else None,
            write=trainer.is_global_zero,
        )
        self.metric = "ppl" if pl_module.task == "lm" else "acc"
        if trainer.is_global_zero:
            log_noise_summary(trainer, self.summary, self.metric, plot=self.out_dir / "noise_eval.png")
            # callback_metrics travel back from ddp_spawn workers; the callback's own fields do not.
            for key, value in summary_metrics(self.summary, self.metric).items():
                trainer.callback_metrics[key] = torch.tensor(value)
