"""Read checkpoints back as untrusted input and rebuild the run that wrote them."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cimssm.config.validate import ConfigError, validate_config


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True; every failure becomes a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as err:
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"ckpt_path={path}: not a readable checkpoint (truncated or corrupt?): {first}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path}: not a Lightning checkpoint (no state_dict)")
    cfg = ckpt.get("hyper_parameters", {}).get("cfg")
    if not cfg or "model" not in cfg:
        raise ConfigError(f"ckpt_path={path}: no stored cimssm config; was it written by train.py?")
    return ckpt


def stored_config(ckpt: dict[str, Any]) -> DictConfig:
    """The run config stored in a checkpoint, validated like a fresh one."""
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    validate_config(cfg)
    return cfg


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with an error that names the first missing / unexpected / mismatched tensor."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConfigError(
            f"ckpt_path={path}: weights do not fit the model rebuilt from its config "
            f"({len(missing)} missing, {len(unexpected)} unexpected; {what})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ConfigError(
                f"ckpt_path={path}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(state)
