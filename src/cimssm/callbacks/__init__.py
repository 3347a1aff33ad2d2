"""Callbacks that run around training: training noise, PTQ, cost report, noise evaluation."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from cimssm.hardware.setup import analog_config, noise_profile, quant_spec


def after_fit_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """The callbacks that the hardware groups of ``cfg`` switch on, in the order they must run."""
    from cimssm.callbacks.cost_report import CostReportCallback
    from cimssm.callbacks.noise_eval import NoiseEvalCallback
    from cimssm.callbacks.post_training import PostTrainingCallback, TrainingNoiseCallback

    seed = int(cfg.seed)
    analog = analog_config(cfg.analog)
    callbacks: list[Callback] = []
    if cfg.noise.train and cfg.noise.kind != "none":
        callbacks.append(TrainingNoiseCallback(noise_profile(cfg.noise), analog, seed))
    callbacks.append(PostTrainingCallback(quant_spec(cfg.quant)))
    callbacks.append(CostReportCallback(analog, run_dir, seq_len=cfg.data.get("seq_len")))
    if cfg.noise.kind != "none" and cfg.noise.evaluate:
        limit = cfg.trainer.get("limit_test_batches")
        callbacks.append(
            NoiseEvalCallback(
                noise_profile(cfg.noise),
                analog,
                seed,
                run_dir,
                max_batches=limit if isinstance(limit, int) else None,
            )
        )
    return callbacks
