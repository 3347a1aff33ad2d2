"""Export the quantized weights of a model as integers with their scales.

Per quantized weight ``NAME`` (a parameter with a ``UniformQuantizer`` parametrization):

    NAME.int          codes (int8 / uint8 / int16 / int32, the smallest that holds the grid)
    NAME.scale        float32, 0-dim (per tensor) or (C,) (per channel, axis ``ch_axis``)
    NAME.zero_point   int32, same shape as the scale (0 when symmetric)
    NAME.bits         int32, 0-dim

with  weight_q = (NAME.int - NAME.zero_point)·NAME.scale  (scale broadcast along ``ch_axis``).
The file is .safetensors (the summary also goes in its metadata) or, with a .pt suffix, a
``torch.save`` dict. A JSON sidecar ``<file>.json`` lists every weight: shape, bits, levels,
symmetric, granularity, ch_axis, scale mode, dtype. Quantized taps and activations are computed
in the forward pass and are not stored; the sidecar lists them under ``runtime_quantizers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from cimssm.hardware.core import iter_transforms
from cimssm.hardware.quantizers import UniformQuantizer


def quantized_weights(model: nn.Module) -> dict[str, tuple[UniformQuantizer, torch.Tensor]]:
    """``{param name: (quantizer, the tensor it quantizes)}`` for every quantized weight.

    The tensor is the clean weight passed through the parametrizations before the quantizer
    (none, when quantization is attached first as it should be).
    """
    out = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for leaf, plist in module.parametrizations.items():
            x = plist.original.detach()
            for t in plist:
                if isinstance(t, UniformQuantizer) and t.levels is not None:
                    out[f"{name}.{leaf}" if name else leaf] = (t, x)
                    break
                with torch.no_grad():
                    x = t(x)
    return out


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def export_quantized(model: nn.Module, path: str | Path) -> dict:
    """Write the integer weights to ``path`` (.safetensors or .pt) and a JSON sidecar; returns the summary.

    Raises FileExistsError (naming the path) if the file or its sidecar exists, ValueError if
    the model has no quantized weights.
    """
    path = Path(path)
    for p in (path, _sidecar(path)):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite it")
    weights = quantized_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no quantized weights to export")

    tensors: dict[str, torch.Tensor] = {}
    summary: dict = {"format": "cimssm.quantized/1", "weights": {}, "runtime_quantizers": []}
    for name, (q, x) in weights.items():
        codes, scale, zero_point = q.quantize_to_int(x)
        tensors[f"{name}.int"] = codes.contiguous().cpu()
        tensors[f"{name}.scale"] = scale.contiguous().cpu()
        tensors[f"{name}.zero_point"] = zero_point.contiguous().cpu()
        tensors[f"{name}.bits"] = torch.tensor(q.bits, dtype=torch.int32)
        summary["weights"][name] = {
            "shape": list(codes.shape),
            "dtype": str(codes.dtype).removeprefix("torch."),
            "bits": q.bits,
            "levels": q.levels,
            "symmetric": q.symmetric,
            "granularity": q.granularity if scale.dim() else "tensor",
            "ch_axis": q.ch_axis if scale.dim() else None,
            "scale_mode": q.scale_mode,
            "part": q.part,
        }
    weight_quantizers = {id(q) for q, _ in weights.values()}
    for where, t in iter_transforms(model):
        if isinstance(t, UniformQuantizer) and id(t) not in weight_quantizers:
            summary["runtime_quantizers"].append({"at": where, "part": t.part, "bits": t.bits})

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save({"tensors": tensors, "summary": summary}, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"summary": json.dumps(summary)})
    _sidecar(path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_quantized(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an export (``NAME.int``, ``NAME.scale``, ...)."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)["tensors"]
    from safetensors.torch import load_file

    return load_file(str(path))


def dequantize(tensors: dict[str, torch.Tensor], name: str, ch_axis: int = 0) -> torch.Tensor:
    """(int - zero_point)·scale of weight ``name`` from ``load_quantized``'s tensors."""
    codes = tensors[f"{name}.int"].float()
    scale, zp = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"].float()
    if scale.dim():
        shape = [1] * codes.dim()
        shape[ch_axis % codes.dim()] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (codes - zp) * scale
