"""Load Hugging Face ``MambaForCausalLM`` checkpoints (e.g. ``state-spaces/mamba-130m-hf``).

:class:`~cimssm.models.mamba.MambaModel` uses the HF module names, so a checkpoint loads by
name once the config is translated. Only local files are read; nothing is downloaded. To use
``state-spaces/mamba-130m-hf``, fetch it on a machine with network access, e.g.::

    huggingface-cli download state-spaces/mamba-130m-hf --local-dir mamba-130m-hf
    # or: python -c "from huggingface_hub import snapshot_download as s; \\
    #                s('state-spaces/mamba-130m-hf', local_dir='mamba-130m-hf')"

copy the directory (``config.json`` and ``model.safetensors`` are enough) next to the project,
then::

    from cimssm.models.hf_import import load_hf_mamba
    model = load_hf_mamba("mamba-130m-hf")  # MambaModel, task="lm", eval() mode

The tokenizer (GPT-NeoX, in the same directory) is not handled here.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cimssm.models.mamba import MambaModel

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_BIN_NAME = "pytorch_model.bin"

# HF MambaConfig defaults for keys a config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "state_size": 16,
    "expand": 2,
    "conv_kernel": 4,
    "time_step_rank": "auto",
    "use_bias": False,
    "use_conv_bias": True,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "pad_vocab_size_multiple": 8,
    "time_step_min": 1e-3,
    "time_step_max": 1e-1,
    "time_step_floor": 1e-4,
    "hidden_act": "silu",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers")


class CheckpointFormatError(ValueError):
    """A checkpoint directory, its config or its tensors do not match what the model expects."""


def hf_config_to_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate an HF ``MambaConfig`` dict (``config.json``) into :class:`MambaModel` kwargs.

    HF's ``vocab_size`` is already the embedding table size (``pad_vocab_size_multiple`` is only
    recorded), so the model is built with ``pad_vocab_size_multiple=1``.
    """
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"config must be a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type", "mamba")
    if model_type != "mamba":
        raise CheckpointFormatError(f"config model_type is {model_type!r}, expected 'mamba' (Mamba-1)")
    missing = [key for key in _HF_REQUIRED if key not in cfg]
    if missing:
        raise CheckpointFormatError(f"config is missing required key(s): {', '.join(missing)}")
    c = {**_HF_DEFAULTS, **cfg}
    if c["hidden_act"] != "silu":
        raise CheckpointFormatError(f"hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
    dt_rank = c["time_step_rank"]
    if dt_rank == "auto":
        dt_rank = math.ceil(c["hidden_size"] / 16)
    return {
        "d_model": int(c["hidden_size"]),
        "n_layer": int(c["num_hidden_layers"]),
        "d_state": int(c["state_size"]),
        "d_conv": int(c["conv_kernel"]),
        "expand": c["expand"],
        "dt_rank": int(dt_rank),
        "tie_embeddings": bool(c["tie_word_embeddings"]),
        "norm_eps": float(c["layer_norm_epsilon"]),
        "pad_vocab_size_multiple": 1,
        "task": "lm",
        "vocab_size": int(c["vocab_size"]),
        "conv_bias": bool(c["use_conv_bias"]),
        "bias": bool(c["use_bias"]),
        "dt_min": float(c["time_step_min"]),
        "dt_max": float(c["time_step_max"]),
        "dt_init_floor": float(c["time_step_floor"]),
    }


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointFormatError(f"no config.json in {directory}")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{config_path} is not valid JSON: {err}") from err


def _read_tensors(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single = directory / SAFETENSORS_NAME
    index = directory / SAFETENSORS_INDEX_NAME
    binary = directory / TORCH_BIN_NAME
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(load_file(str(directory / shard)))
            return tensors
        if binary.is_file():
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
                raise CheckpointFormatError(f"{binary} does not hold a dict of tensors")
            return tensors
    except CheckpointFormatError:
        raise
    except Exception as err:  # corrupt file, bad header, missing shard
        raise CheckpointFormatError(f"cannot read the weights in {directory}: {err}") from err
    raise CheckpointFormatError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {TORCH_BIN_NAME}"
    )


def load_hf_mamba(path: str | Path, **model_kwargs: Any) -> MambaModel:
    """Build a :class:`MambaModel` from an HF Mamba checkpoint directory and load its weights.

    ``path`` holds ``config.json`` and ``model.safetensors`` (or a sharded safetensors index, or
    ``pytorch_model.bin``). ``model_kwargs`` override the translated config (e.g.
    ``scan_chunk_size``). Tensors are cast to float32. Raises :class:`CheckpointFormatError`
    naming the missing, misshapen or unexpected tensors. Returns the model in ``eval()`` mode.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointFormatError(f"checkpoint directory {directory} does not exist")
    kwargs = {**hf_config_to_kwargs(_read_config(directory)), **model_kwargs}
    tensors = _read_tensors(directory)
    model = MambaModel(**kwargs)

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.tied:
        lm_head = tensors.pop("lm_head.weight", None)
        embeddings = tensors.get("backbone.embeddings.weight")
        if lm_head is not None and embeddings is not None and not torch.equal(lm_head, embeddings):
            warnings.warn(
                "tie_word_embeddings is true: lm_head.weight differs from backbone.embeddings.weight "
                "and is ignored",
                stacklevel=2,
            )
        expected.pop("lm_head.weight")
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointFormatError(f"checkpoint {directory} is missing tensor(s): {', '.join(missing)}")
    unexpected = sorted(name for name in tensors if name not in expected)
    if unexpected:
        raise CheckpointFormatError(
            f"checkpoint {directory} has unexpected tensor(s): {', '.join(unexpected)}"
        )
    for name, shape in expected.items():
        found = tuple(tensors[name].shape)
        if found != shape:
            raise CheckpointFormatError(
                f"tensor {name} has shape {list(found)} in {directory}, the config expects {list(shape)}"
            )
    state = {name: tensors[name].float() for name in expected}
    model.load_state_dict(state, strict=False)  # lm_head.weight, when tied, comes with embeddings
    return model.eval()
