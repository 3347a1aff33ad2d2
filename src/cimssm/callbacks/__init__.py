"""Callbacks that run around training: training noise, PTQ, cost report, noise evaluation."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from cimssm.hardware.setup import analog_config, noise_profile, quant_spec


def training_callbacks(cfg: DictConfig) -> list[Callback]:
    """Callbacks every training run gets, whatever the callbacks group says: step-keyed RNG
    (exact resume) and the NaN/Inf guard (``numerics`` section)."""
    from cimssm.callbacks.checkpointing import StepSeededRNG
    from cimssm.callbacks.numerics import NonFiniteGuard

    numerics = cfg.get("numerics") or {}
    return [
        StepSeededRNG(int(cfg.seed)),
        NonFiniteGuard(
            on_nan=numerics.get("on_nan", "stop"),
            max_consecutive_skips=numerics.get("max_consecutive_skips", 20),
            check_grads=numerics.get("check_grads", True),
        ),
    ]


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
    decomp = analog_config(cfg.get("decomp"))
    if decomp.get("method", "none") != "none":
        from cimssm.callbacks.decomp import DecompCallback
        from cimssm.hardware.hpd import analog_with_decomposition

        callbacks.append(DecompCallback(decomp))  # right after the best weights (and PTQ)
        analog = analog_with_decomposition(analog, decomp)  # digital factors: not analog
    callbacks.append(CostReportCallback(analog, run_dir, seq_len=cfg.data.get("seq_len")))
    prune = cfg.get("prune")
    if prune is not None and prune.method != "none":
        from cimssm.callbacks.prune import PruneCallback

        # Before the noise evaluation, so that it (and the test) sees the pruned model.
        callbacks.append(
            PruneCallback(
                analog_config(prune), analog, run_dir, optimizer=analog_config(cfg.optimizer),
                quant_mode=cfg.quant.mode, seed=seed, seq_len=cfg.data.get("seq_len"),
            )
        )  # fmt: skip
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
    if cfg.get("analysis") is not None and cfg.analysis.get("name") == "sensitivity":
        from cimssm.callbacks.sensitivity import SensitivityCallback, sensitivity_settings

        callbacks.append(SensitivityCallback(sensitivity_settings(cfg), analog, seed, run_dir))
    return callbacks
