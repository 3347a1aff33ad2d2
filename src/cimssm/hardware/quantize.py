"""Quantize a model's ``hardware_parts``: the spec, its resolution against a model, QAT and PTQ.

The spec (``quant`` config group) is a plain mapping::

    mode:          "qat" | "ptq"       QAT: quantizers act from the first step; PTQ: attach after
                                       training, then ``calibrate``
    weight_bits:   int | null          shorthand for every part of category "weight"
    act_bits:      int | null          ... category "act"
    ssm_bits:      int | null          ... category "ssm"
    symmetric:     bool  (true)
    granularity:   "tensor" | "channel"  (tensor) for weight (kind "param") parts; taps and
                                       inputs stay per tensor unless a part says otherwise
    scale:         "max" | "running" | "learned" | null  (null: "max" for qat, "running" for ptq)
    calib_batches: int (8)             batches ``calibrate`` uses in PTQ
    momentum:      float (0.1)         EMA factor of running ranges
    parts:         {NAME: {bits, levels, symmetric, granularity, scale, ch_axis}}

A part's own ``bits`` (or ``levels``) override the shorthand of its category, ``null`` included
(float). A part whose model entry has ``levels_factor`` (S4D's ``ssm_input``: 0.5) gets that
fraction of the levels of its bits, as QS4D quantizes the SSM input with half the levels.
Per-channel quantization of a tap or an input needs the part's ``ch_axis``; for weights it is
axis 0 (the output channel of Linear/Conv1d weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cimssm.hardware.core import (
    TransformChain,
    attach_input_transform,
    attach_param_transform,
    attach_tap_transform,
    detach_transforms,
    iter_transforms,
    match_names,
    param_names,
    to_plain,
)
from cimssm.hardware.quantizers import (
    GRANULARITIES,
    SCALE_MODES,
    QuantConfigError,
    UniformQuantizer,
    check_bits,
    check_levels,
    levels_to_bits,
)

MODES = ("qat", "ptq")
CATEGORY_KEYS = {"weight": "weight_bits", "act": "act_bits", "ssm": "ssm_bits"}
PART_KEYS = ("bits", "levels", "symmetric", "granularity", "scale", "ch_axis")


@dataclass
class QuantSpec:
    """The quantization config (see the module docstring for the keys)."""

    mode: str = "qat"
    weight_bits: int | None = None
    act_bits: int | None = None
    ssm_bits: int | None = None
    symmetric: bool = True
    granularity: str = "tensor"
    scale: str | None = None
    calib_batches: int = 8
    momentum: float = 0.1
    parts: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantConfigError(f"quant.mode must be one of {MODES}, got {self.mode!r}")
        for key in CATEGORY_KEYS.values():
            setattr(self, key, check_bits(getattr(self, key), f"quant.{key}"))
        if not isinstance(self.symmetric, bool):
            raise QuantConfigError(f"quant.symmetric must be true or false, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(
                f"quant.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.scale is not None and self.scale not in SCALE_MODES:
            raise QuantConfigError(f"quant.scale must be one of {SCALE_MODES} or null, got {self.scale!r}")
        if (
            isinstance(self.calib_batches, bool)
            or not isinstance(self.calib_batches, int)
            or self.calib_batches < 1
        ):
            raise QuantConfigError(
                f"quant.calib_batches must be a positive integer, got {self.calib_batches!r}"
            )
        if not isinstance(self.momentum, int | float) or not 0.0 < self.momentum <= 1.0:
            raise QuantConfigError(f"quant.momentum must be in (0, 1], got {self.momentum!r}")
        parts = to_plain(self.parts or {})
        if not isinstance(parts, dict):
            raise QuantConfigError(f"quant.parts must be a mapping NAME -> settings, got {self.parts!r}")
        for name, settings in parts.items():
            if settings is None:
                settings = parts[name] = {}
            if not isinstance(settings, dict):
                raise QuantConfigError(
                    f"quant.parts.{name} must be a mapping with keys {PART_KEYS}, got {settings!r}"
                )
            unknown = sorted(set(settings) - set(PART_KEYS))
            if unknown:
                raise QuantConfigError(f"quant.parts.{name}: unknown key(s) {unknown}; allowed: {PART_KEYS}")
            if (
                "bits" in settings
                and "levels" in settings
                and None not in (settings["bits"], settings["levels"])
            ):
                raise QuantConfigError(f"quant.parts.{name}: give bits or levels, not both")
            if "bits" in settings:
                check_bits(settings["bits"], f"quant.parts.{name}.bits")
            if "levels" in settings:
                check_levels(settings["levels"], f"quant.parts.{name}.levels")
            if "granularity" in settings and settings["granularity"] not in GRANULARITIES:
                raise QuantConfigError(
                    f"quant.parts.{name}.granularity must be one of {GRANULARITIES}, "
                    f"got {settings['granularity']!r}"
                )
            if "scale" in settings and settings["scale"] not in SCALE_MODES:
                raise QuantConfigError(
                    f"quant.parts.{name}.scale must be one of {SCALE_MODES}, got {settings['scale']!r}"
                )
            if "symmetric" in settings and not isinstance(settings["symmetric"], bool):
                raise QuantConfigError(
                    f"quant.parts.{name}.symmetric must be true or false, got {settings['symmetric']!r}"
                )
            if "ch_axis" in settings and not isinstance(settings["ch_axis"], int):
                raise QuantConfigError(
                    f"quant.parts.{name}.ch_axis must be an integer, got {settings['ch_axis']!r}"
                )
        self.parts = parts

    @classmethod
    def from_dict(cls, d: Mapping | QuantSpec | None) -> QuantSpec:
        """Read a spec from a mapping (unknown keys raise QuantConfigError); None is all float."""
        if isinstance(d, QuantSpec):
            return d
        d = to_plain(d or {})
        if not isinstance(d, dict):
            raise QuantConfigError(f"a quant spec must be a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise QuantConfigError(f"quant: unknown key(s) {unknown}; allowed: {names}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def default_scale(self) -> str:
        return self.scale or ("running" if self.mode == "ptq" else "max")


@dataclass(frozen=True)
class ResolvedPart:
    """One part of a model with the settings the spec gives it; ``bits=None``: left in float.

    ``bits`` is the storage width of the grid (ceil(log2 levels)); ``levels`` the grid size.
    ``matched`` are the parameter / module names its globs match in this model.
    """

    name: str
    kind: str
    category: str
    targets: tuple[str, ...]
    matched: tuple[str, ...]
    bits: int | None
    levels: int | None
    symmetric: bool
    granularity: str
    scale: str
    ch_axis: int | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def hardware_parts(model: nn.Module) -> dict[str, dict]:
    parts = getattr(model, "hardware_parts", None)
    if not isinstance(parts, Mapping):
        raise QuantConfigError(f"{type(model).__name__} has no hardware_parts to quantize")
    return dict(parts)


def _candidates(model: nn.Module, kind: str) -> list[str]:
    if kind == "param":
        return param_names(model)
    if kind not in ("tap", "input"):
        raise QuantConfigError(f"hardware part kind must be param, tap or input, got {kind!r}")
    hidden = (".parametrizations.", ".hw_input", ".hw_output", ".transforms.")
    names = [n for n, _ in model.named_modules() if n and not any(h in n + "." for h in hidden)]
    if kind == "tap":
        names = [n for n in names if isinstance(model.get_submodule(n), nn.Identity | TransformChain)]
    return names


def resolve_parts(model: nn.Module, spec: Mapping | QuantSpec | None) -> dict[str, ResolvedPart]:
    """Every part of ``model.hardware_parts`` with its resolved bits and settings.

    Raises QuantConfigError for a part name in ``spec.parts`` the model does not have (listing
    the model's parts), and for a part given bits explicitly whose globs match nothing here.
    A part quantized through a category shorthand whose globs match nothing (an ``embeddings``
    part of a float-input model) is left alone.
    """
    spec = QuantSpec.from_dict(spec)
    parts = hardware_parts(model)
    unknown = sorted(set(spec.parts) - set(parts))
    if unknown:
        raise QuantConfigError(
            f"quant.parts: unknown part(s) {unknown} for {type(model).__name__}; its parts: {sorted(parts)}"
        )
    out: dict[str, ResolvedPart] = {}
    for name, entry in parts.items():
        kind, category = entry["kind"], entry["category"]
        if category not in CATEGORY_KEYS:
            raise QuantConfigError(f"hardware part {name!r}: category must be one of {list(CATEGORY_KEYS)}")
        targets = tuple(entry["targets"])
        own = spec.parts.get(name, {})
        explicit = "bits" in own or "levels" in own
        if own.get("levels") is not None:
            levels = check_levels(own["levels"])
        else:
            bits = own["bits"] if "bits" in own else getattr(spec, CATEGORY_KEYS[category])
            bits = check_bits(bits, f"quant.parts.{name}.bits")
            levels = None if bits is None else 2**bits
            factor = entry.get("levels_factor", 0.5 if name == "ssm_input" else 1.0)
            if levels is not None and factor != 1.0:
                levels = max(2, int(round(levels * factor)))
        matched = tuple(match_names(_candidates(model, kind), targets))
        if levels is not None and not matched and explicit:
            raise QuantConfigError(
                f"quant.parts.{name}: bits set but its target(s) {list(targets)} match no "
                f"{'parameter' if kind == 'param' else 'module'} of {type(model).__name__}"
            )
        granularity = own.get("granularity", spec.granularity if kind == "param" else "tensor")
        ch_axis = own.get("ch_axis", 0 if kind == "param" else None)
        if granularity == "channel" and ch_axis is None and levels is not None:
            raise QuantConfigError(
                f"quant.parts.{name}: per-channel quantization of a {kind} needs "
                f"quant.parts.{name}.ch_axis (the channel axis of the tensor)"
            )
        scale = own.get("scale", spec.default_scale)
        if granularity == "channel" and scale == "learned" and kind != "param" and levels is not None:
            raise QuantConfigError(
                f"quant.parts.{name}: a per-channel learned scale is supported for weights only; "
                "use granularity 'tensor' or scale 'max'/'running'"
            )
        out[name] = ResolvedPart(
            name=name,
            kind=kind,
            category=category,
            targets=targets,
            matched=matched,
            bits=None if levels is None else levels_to_bits(levels),
            levels=levels,
            symmetric=own.get("symmetric", spec.symmetric),
            granularity=granularity,
            scale=scale,
            ch_axis=ch_axis,
        )
    return out


def _param(model: nn.Module, name: str) -> torch.Tensor:
    """The current (possibly transformed) value of parameter ``name``."""
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def _quantizer(
    part: ResolvedPart, momentum: float, num_channels: int | None = None, granularity: str | None = None
) -> UniformQuantizer:
    q = UniformQuantizer(
        bits=None,
        levels=part.levels,
        symmetric=part.symmetric,
        granularity=granularity or part.granularity,
        ch_axis=part.ch_axis or 0,
        scale=part.scale,
        momentum=momentum,
        num_channels=num_channels,
    )
    q.part = part.name
    return q


def quantizers(model: nn.Module) -> list[UniformQuantizer]:
    """Every attached UniformQuantizer (weights, taps, inputs)."""
    return [t for _, t in iter_transforms(model) if isinstance(t, UniformQuantizer)]


def is_quantized(model: nn.Module) -> bool:
    return bool(quantizers(model))


def apply_quantization(model: nn.Module, spec: Mapping | QuantSpec | None) -> list[str]:
    """Attach a quantizer to every target of every part with bits; returns ``"kind:name"`` of each.

    Weights get a parametrization (per output channel, axis 0, with granularity "channel"), taps
    a tap transform, activations an input transform. Running / learned ranges of weights start
    from the weight itself. Nothing is attached for parts left in float, so an all-float spec
    leaves the model (outputs and state_dict keys) exactly as it was.
    """
    spec = QuantSpec.from_dict(spec)
    resolved = resolve_parts(model, spec)
    if is_quantized(model) and any(p.levels is not None and p.matched for p in resolved.values()):
        raise QuantConfigError("the model is already quantized; call remove_quantization first")
    attached: list[str] = []
    some = next(iter(model.parameters()), None)
    device = some.device if some is not None else torch.device("cpu")
    for part in resolved.values():
        if part.levels is None:
            continue
        for name in part.matched:
            if part.kind == "param":
                with torch.no_grad():
                    weight = _param(model, name).detach()
                channel = part.granularity == "channel" and weight.dim() > 0
                q = _quantizer(
                    part,
                    spec.momentum,
                    num_channels=weight.shape[part.ch_axis or 0] if channel else None,
                    granularity="channel" if channel else "tensor",
                )
                q.target = name
                q.to(weight.device).init_range(weight)
                attach_param_transform(model, name, q)
            elif part.kind == "tap":
                q = _quantizer(part, spec.momentum).to(device)
                q.target = name
                attach_tap_transform(model, name, q)
            else:
                q = _quantizer(part, spec.momentum).to(device)
                q.target = name
                attach_input_transform(model, name, q)
            q.train(model.training)  # a new module is in training mode; follow the model
            attached.append(f"{part.kind}:{name}")
    return attached


def remove_quantization(model: nn.Module) -> int:
    """Detach every quantizer (weights back to their clean values bit for bit); returns how many."""
    return detach_transforms(model, lambda t: isinstance(t, UniformQuantizer))


def _default_forward(model: nn.Module, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, tuple | list) else batch
    p = next(iter(model.parameters()), None)
    if p is not None and isinstance(x, torch.Tensor):
        x = x.to(p.device)  # batches come from a (CPU) dataloader
    return model(x)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    num_batches: int | None = None,
) -> int:
    """PTQ: run up to ``num_batches`` batches (all if None) in calibration mode, then freeze.

    While calibrating, quantizers with running ranges record the max (and min) over the batches
    and pass their input through unchanged, so every layer calibrates on float inputs. The model
    runs in eval mode (no dropout); its train/eval mode is restored afterwards.
    ``forward_fn(model, batch)`` runs one batch (default: ``model(batch[0])`` for a tuple or
    list, ``model(batch)`` otherwise, moved to the model's device). Returns the number of
    batches used.
    """
    qs = quantizers(model)
    if not qs:
        raise QuantConfigError("calibrate: the model has no quantizers (apply_quantization first)")
    forward_fn = forward_fn or _default_forward
    was_training = model.training
    model.eval()
    for q in qs:
        q.unfreeze()
        q.calibrating = True
    n = 0
    try:
        for batch in batches:
            if num_batches is not None and n >= num_batches:
                break
            forward_fn(model, batch)
            n += 1
    finally:
        for q in qs:
            q.freeze()
        model.train(was_training)
    return n


def freeze_quantizers(model: nn.Module) -> None:
    for q in quantizers(model):
        q.freeze()


def attached_bits(model: nn.Module) -> dict[tuple[str, str], int]:
    """Bits of the quantizers attached now, keyed by (kind, name): ("param", clean param name),
    ("tap", module name) or ("input", module name). The lowest bits win where several sit."""
    out: dict[tuple[str, str], int] = {}

    def put(key: tuple[str, str], chain: Iterable[nn.Module]) -> None:
        for t in chain:
            if isinstance(t, UniformQuantizer) and t.bits is not None:
                out[key] = min(out.get(key, t.bits), t.bits)

    from torch.nn.utils import parametrize  # local: only needed here

    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for leaf, plist in module.parametrizations.items():
                put(("param", f"{name}.{leaf}" if name else leaf), plist)
        hw_input = module._modules.get("hw_input")
        if isinstance(hw_input, TransformChain):
            put(("input", name), hw_input.transforms)
        if isinstance(module, TransformChain) and not name.endswith(("hw_input", "hw_output")):
            put(("tap", name), module.transforms)
    return out
