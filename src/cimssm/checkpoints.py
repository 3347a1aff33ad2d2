"""Read checkpoints back as untrusted input and rebuild the run that wrote them.

A checkpoint file is data someone may have sent you: it is read with ``torch.load(...,
weights_only=True)`` (tensors and plain containers only; a pickled ``os.system`` is refused by
torch before anything runs), and the run config stored in it is only instantiated through the
allow-list of :mod:`cimssm.config.safe_instantiate`. Every failure is a one-line
:class:`~cimssm.config.validate.ConfigError` naming the file and what is wrong.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cimssm.config.safe_instantiate import check_targets, resolve_path, stored_config_from_dict
from cimssm.config.validate import ConfigError, validate_config

#: The model keys that say "which model" in error messages.
_MODEL_KEYS = ("name", "d_model", "n_layer", "d_state")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True; every failure becomes a one-line ConfigError.

    Also refuses a stored config with a ``_target_`` outside the allow-list (before anything
    could instantiate it).
    """
    shown = str(path)
    resolved = resolve_path("ckpt_path", path, "file", expected="a .ckpt file written by train.py")
    try:
        ckpt = torch.load(resolved, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        if blocked:  # a pickled callable (os.system, eval, ...): torch refused it before running it
            raise ConfigError(
                f"ckpt_path={shown}: refused: it asks to import {blocked.group(1)} while loading; "
                "only tensors and plain data are loaded (weights_only=True)"
            ) from err
        first = " ".join(str(err).split())[:160]
        raise ConfigError(
            f"ckpt_path={shown}: not a readable checkpoint (truncated or corrupt?): {first}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = " ".join(str(err).split())[:160]
        raise ConfigError(
            f"ckpt_path={shown}: not a readable checkpoint (truncated or corrupt?): {first}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(
            f"ckpt_path={shown}: not a Lightning checkpoint (no state_dict); give a .ckpt from train.py"
        )
    hparams = ckpt.get("hyper_parameters")
    cfg = hparams.get("cfg") if isinstance(hparams, dict) else None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ConfigError(f"ckpt_path={shown}: no stored cimssm config; was it written by train.py?")
    check_targets(cfg, source=f"ckpt_path={shown}")
    return ckpt


def stored_config(ckpt: dict[str, Any], source: str = "checkpoint") -> DictConfig:
    """The run config stored in a checkpoint: targets checked, then validated like a fresh one."""
    cfg = stored_config_from_dict(ckpt["hyper_parameters"]["cfg"], source)
    validate_config(cfg)
    return cfg


def describe_model(cfg: Any) -> str:
    """``model=s4d (d_model=16, n_layer=2, d_state=8)`` for messages; ``cfg`` is a run config."""
    model = cfg.get("model") if isinstance(cfg, dict | DictConfig) else None
    if not model:
        return "an unknown model"
    model = OmegaConf.to_container(model) if isinstance(model, DictConfig) else model
    sizes = ", ".join(f"{k}={model[k]}" for k in _MODEL_KEYS[1:] if k in model)
    return f"model={model.get('name', '?')}" + (f" ({sizes})" if sizes else "")


def weights_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """None if ``state`` fits ``own`` key for key and shape for shape, else what differs first."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        return f"{len(missing)} missing, {len(unexpected)} unexpected; {what}"
    for k, v in state.items():
        if own[k].shape != v.shape:
            return f"tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
    return None


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with an error that names the first missing / unexpected / mismatched tensor."""
    problem = weights_mismatch(module.state_dict(), state)
    if problem:
        raise ConfigError(
            f"ckpt_path={path}: weights do not fit the model rebuilt from its config ({problem})"
        )
    module.load_state_dict(state)


def check_resumable(ckpt: dict[str, Any], path: str | Path, module: torch.nn.Module, run_cfg: Any) -> None:
    """Refuse to resume ``module`` (built from ``run_cfg``) from a checkpoint of another model or data.

    Lightning would fail deep inside ``fit`` with a traceback; this says which model the
    checkpoint holds and which one this run builds.
    """
    stored = ckpt["hyper_parameters"]["cfg"]
    stored_data = (stored.get("data") or {}).get("name")
    if stored_data != run_cfg.data.name:  # first: other data also changes the vocabulary/head shapes
        raise ConfigError(
            f"ckpt_path={path}: checkpoint was trained on data={stored_data}, this run uses "
            f"data={run_cfg.data.name}; resume with the same data"
        )
    problem = weights_mismatch(module.state_dict(), ckpt["state_dict"])
    if problem:
        raise ConfigError(
            f"ckpt_path={path}: checkpoint of {describe_model(stored)}, this run builds "
            f"{describe_model(run_cfg)}: the weights do not fit ({problem}); resume with the checkpoint's own config"
        )


__all__ = [
    "load_checkpoint",
    "stored_config",
    "describe_model",
    "weights_mismatch",
    "load_weights",
    "check_resumable",
]
