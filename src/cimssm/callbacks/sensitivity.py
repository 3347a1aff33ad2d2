"""SensitivityCallback: after fit, the layer sensitivity analysis (cimssm.analysis.sensitivity)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from cimssm.config.validate import ConfigError

log = logging.getLogger("cimssm")


def sensitivity_settings(cfg: DictConfig) -> dict[str, Any]:
    """The noise profile and the options of ``analysis=sensitivity`` for a run config.

    The profile is the run's ``noise`` group (kind, its parameters, per_channel, t_inference);
    ``analysis.levels`` / ``analysis.chips`` override its ``eval_levels`` / ``chips``.
    """
    from cimssm.hardware.setup import noise_profile

    a = cfg.analysis
    if cfg.noise.kind == "none":
        raise ConfigError(
            "analysis=sensitivity needs a noise profile to inject: set noise=gauss_5pct (or any noise "
            "group other than none); got noise=none"
        )
    profile = noise_profile(cfg.noise)
    if a.get("levels") is not None:
        profile["eval_levels"] = [float(v) for v in a.levels]
    if a.get("chips") is not None:
        profile["chips"] = int(a.chips)
    return {
        "profile": profile,
        "max_batches": a.get("max_batches"),
        "split": a.get("split", "test"),
        "blocks": bool(a.get("blocks", True)),
        "components": bool(a.get("components", True)),
        "outside": bool(a.get("outside", True)),
        "plot": bool(a.get("plot", True)),
    }


def log_sensitivity(trainer: pl.Trainer, rows: list[dict[str, Any]], plot: Path | None) -> None:
    """W&B: the rows as a table and the heatmap as an image (other loggers: nothing)."""
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger" or not rows:
            continue
        import wandb

        columns = list(rows[0])
        payload: dict[str, Any] = {
            "sensitivity/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        }
        if plot is not None and Path(plot).is_file():
            payload["sensitivity/heatmap"] = wandb.Image(str(plot))
        logger.experiment.log(payload)


class SensitivityCallback(Callback):
    """Runs last among the after-fit callbacks, on the deployed model (best weights, PTQ, HPD).

    Writes sensitivity.csv, sensitivity.png and the ranked table (log) into ``out_dir``.
    """

    def __init__(self, settings: dict[str, Any], analog: dict[str, Any], seed: int, out_dir: str | Path):
        self.settings, self.analog, self.seed, self.out_dir = settings, analog, seed, Path(out_dir)
        self.rows: list[dict[str, Any]] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        from cimssm.analysis.sensitivity import run_sensitivity

        s = self.settings
        dm = trainer.datamodule
        dm.setup("test" if s["split"] == "test" else "validate")
        loader = dm.test_dataloader if s["split"] == "test" else dm.val_dataloader
        self.rows = run_sensitivity(
            pl_module.net,
            loader,
            pl_module.task,
            s["profile"],
            self.analog,
            self.seed,
            self.out_dir,
            max_batches=s["max_batches"],
            blocks=s["blocks"],
            components=s["components"],
            outside=s["outside"],
            plot=s["plot"],
        )
        log_sensitivity(trainer, self.rows, self.out_dir / "sensitivity.png" if s["plot"] else None)
