"""Shared fixtures: compose the real configs with tiny overrides, as the template projects do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

torch.set_num_threads(min(2, torch.get_num_threads()))

# Small, fast settings shared by every end-to-end test.
TINY = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "optimizer.warmup_steps=1",
    "callbacks=none",
]
DATA_TINY = {
    "shakespeare_char": ["data.seq_len=32", "data.batch_size=4", "data.limit_chars=20000"],
    "selective_copy": ["data.seq_len=16", "data.n_memorize=4", "data.n_train=64", "data.n_val=16",
                       "data.n_test=16", "data.batch_size=8"],
}


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: a tiny run config for model x data writing into tmp_path."""

    def make(model: str = "s4d_tiny", data: str = "selective_copy", extra: list[str] = ()) -> DictConfig:
        overrides = [f"model={model}", f"data={data}", *TINY, *DATA_TINY.get(data, []), *extra]
        return compose_cfg(overrides, output_dir=tmp_path / "run")

    return make


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600):
    """Run a repository entry point in a subprocess; returns CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
