"""Uniform fake quantization with a straight-through estimator (STE).

One quantizer, ``UniformQuantizer``, covers what QS4D (arXiv 2507.06079) and the usual QAT/PTQ
recipes need. With step size ``s`` (the *scale*), integer codes ``qmin..qmax`` and zero point ``z``:

    q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) · s

- symmetric (z = 0): ``2^(b-1) - 1`` positive levels, codes ``-qmax..qmax`` (2^b - 1 values);
  b = 1 is binary, q(x) = sign(x)·s with sign(0) = +1.
- asymmetric: codes ``0..2^b - 1``, the range [min(x, 0), max(x, 0)] mapped onto them with an
  integer zero point, so 0 is exactly representable.
- ``levels=L`` instead of ``bits``: QS4D gives precision in levels. Symmetric: L = 2 is binary,
  otherwise qmax = (L - 1) // 2 (so ``levels=2^b`` is the same grid as ``bits=b``); asymmetric:
  codes 0..L-1.

Where the range comes from (``scale``):

- ``"max"``: max|x| (or min/max) of the tensor at every forward (QS4D). Nothing is clipped.
- ``"running"``: a running range kept in buffers: an exponential moving average (``momentum``)
  in training mode, the running max/min over batches while ``calibrating`` (PTQ), frozen in eval
  mode or after ``freeze()``. Values beyond it are clipped.
- ``"learned"``: a learnable clip (PACT/LSQ): ``clip_max`` (and ``clip_min`` when asymmetric)
  are parameters, initialised from the first tensor seen, trained through the LSQ gradient
  (Esser et al., ICLR 2020) with its gradient scale 1/sqrt(numel·qmax).

Gradient (STE): d q / d x = 1 where x lies inside the quantizer's range, 0 outside (only the
clipping modes can have values outside). ``bits=None`` is the identity: the input is returned
unchanged, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GRANULARITIES = ("tensor", "channel")
SCALE_MODES = ("max", "running", "learned")
MAX_BITS = 16


class QuantConfigError(ValueError):
    """A quantization setting outside what is allowed; the message names key, value and range."""


def check_bits(bits, name: str = "bits") -> int | None:
    """``bits`` as an int in 1..16, or None (float); anything else raises QuantConfigError."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int | float) or bits != int(bits):
        raise QuantConfigError(f"{name} must be an integer in 1..{MAX_BITS} or null (float), got {bits!r}")
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise QuantConfigError(f"{name} must be in 1..{MAX_BITS} or null (float), got {bits}")
    return bits


def check_levels(levels, name: str = "levels") -> int | None:
    """``levels`` as an int in 2..2^16, or None."""
    if levels is None:
        return None
    if isinstance(levels, bool) or not isinstance(levels, int | float) or levels != int(levels):
        raise QuantConfigError(f"{name} must be an integer in 2..{2**MAX_BITS} or null, got {levels!r}")
    levels = int(levels)
    if not 2 <= levels <= 2**MAX_BITS:
        raise QuantConfigError(f"{name} must be in 2..{2**MAX_BITS} or null, got {levels}")
    return levels


def levels_to_bits(levels: int) -> int:
    """Bits needed to store ``levels`` codes (ceil(log2 L))."""
    return max(1, math.ceil(math.log2(levels)))


def code_range(levels: int, symmetric: bool) -> tuple[int, int]:
    """Integer codes (qmin, qmax) of a grid with ``levels`` levels (binary: (-1, 1), no zero)."""
    if symmetric:
        qmax = 1 if levels == 2 else (levels - 1) // 2
        return -qmax, qmax
    return 0, levels - 1


def int_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest of int8, uint8, int16, int32 holding codes qmin..qmax."""
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int32


def _codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """x·(1/scale) + zero_point, unrounded (a new tensor). Multiplying by the reciprocal is several
    times faster than dividing on CPU; export uses this same expression, so codes match bit for bit."""
    v = x * scale.to(x.dtype).reciprocal()
    return v if zero_point is None else v.add_(zero_point.to(x.dtype))


def _from_codes(v, scale, zero_point, qmin: int, qmax: int, binary: bool) -> torch.Tensor:
    """(clamp(round(v), qmin, qmax) - zp)·scale from unrounded codes v (overwritten in place)."""
    scale = scale.to(v.dtype)
    if binary:
        return torch.where(v >= 0, scale, -scale)
    q = v.round_().clamp_(qmin, qmax)
    if zero_point is not None:
        q = q.sub_(zero_point.to(v.dtype))
    return q.mul_(scale)


def _fake_values(x, scale, zero_point, qmin: int, qmax: int, binary: bool) -> torch.Tensor:
    """The fake-quantized values (no autograd): (clamp(round(x/scale) + zp, qmin, qmax) - zp)·scale."""
    return _from_codes(_codes(x, scale, zero_point), scale, zero_point, qmin, qmax, binary)


def _in_range(v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """qmin <= v <= qmax (two passes instead of three for a symmetric range)."""
    if qmin == -qmax:
        return v.abs() <= qmax
    return (v >= qmin) & (v <= qmax)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the quantized tensor; backward: the gradient where x was in range (or everywhere)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, binary, clip_grad):
        ctx.clip_grad = clip_grad
        v = _codes(x, scale, zero_point)
        if clip_grad:
            ctx.save_for_backward(_in_range(v, qmin, qmax))
        return _from_codes(v, scale, zero_point, qmin, qmax, binary)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip_grad:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None, None, None


class _DynamicFakeQuantSTE(torch.autograd.Function):
    """``scale="max"``: range, scale and quantization in one autograd node (nothing is clipped,
    so the gradient passes unchanged). One node instead of a dozen keeps the per-call overhead
    of the many small tensors (weights, SSM parameters) low."""

    @staticmethod
    def forward(ctx, x, quantizer):
        hi, lo = quantizer._observe(x)
        scale, zp = quantizer._scale_zero_point(hi, lo)
        zp = None if zp is None else quantizer._view(zp, x)
        return _fake_values(
            x, quantizer._view(scale, x), zp, quantizer.qmin, quantizer.qmax, quantizer.binary
        )

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LearnedFakeQuantSTE(torch.autograd.Function):
    """``scale="learned"``: fake quantization with the LSQ gradient to the (broadcast) scale.

    out = (q - z)·s with q = clamp(round(x/s + z), qmin, qmax) (binary: sign):
    d out/d x = 1 inside the range, 0 outside;  d out/d s = q - (x/s + z) inside, q - z outside.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, binary):
        v = _codes(x, scale, zero_point)
        mask = _in_range(v, qmin, qmax)
        if binary:
            q = torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
        else:
            q = v.round().clamp_(qmin, qmax)
        if zero_point is not None:
            zero_point = zero_point.to(v.dtype)
            q = q.sub_(zero_point)
            v = v.sub_(zero_point)
        ctx.save_for_backward(mask, torch.where(mask, q - v, q))
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return q.mul_(scale.to(v.dtype))

    @staticmethod
    def backward(ctx, grad):
        mask, dscale = ctx.saved_tensors
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * dscale).sum_to_size(ctx.scale_shape).to(ctx.scale_dtype)
        return grad * mask, grad_scale, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    zero_point: torch.Tensor | None = None,
    clip_grad: bool = True,
    binary: bool = False,
) -> torch.Tensor:
    """q = (clamp(round(x/scale) + zero_point, qmin, qmax) - zero_point)·scale, with an STE.

    ``scale`` (and ``zero_point``) broadcast against ``x`` and get no gradient. The gradient to x
    is passed unchanged where qmin <= x/scale + zero_point <= qmax and zeroed elsewhere
    (``clip_grad=False``: passed everywhere). ``binary``: q = sign(x)·scale (sign(0) = +1).
    """
    return _FakeQuantSTE.apply(x, scale.detach(), zero_point, qmin, qmax, binary, clip_grad)


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """Value t, gradient scaled by g (LSQ)."""
    return (t - t * g).detach() + t * g


class UniformQuantizer(nn.Module):
    """Uniform fake quantizer ``f(x) -> x'`` (see the module docstring for the formula).

    Args:
        bits: 1..16, or None for the identity. Exclusive with ``levels``.
        symmetric: signed grid around 0 (True) or min/max with a zero point (False).
        granularity: ``"tensor"`` (one scale) or ``"channel"`` (one scale per index of ``ch_axis``).
        ch_axis: the channel axis for ``granularity="channel"`` (0: output channel of a weight).
        scale: ``"max"`` | ``"running"`` | ``"learned"``.
        momentum: EMA factor of the running range in training mode.
        levels: number of levels (2..65536) instead of ``bits``.
        num_channels: channel count, required for a per-channel learned scale (its parameter
            must exist before the optimizer is built); optional otherwise.
    """

    def __init__(
        self,
        bits: int | None = None,
        symmetric: bool = True,
        granularity: str = "tensor",
        ch_axis: int = 0,
        scale: str = "max",
        momentum: float = 0.1,
        levels: int | None = None,
        num_channels: int | None = None,
    ):
        super().__init__()
        bits = check_bits(bits)
        levels = check_levels(levels)
        if bits is not None and levels is not None:
            raise QuantConfigError(f"give bits or levels, not both (bits={bits}, levels={levels})")
        if granularity not in GRANULARITIES:
            raise QuantConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if scale not in SCALE_MODES:
            raise QuantConfigError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
        if not 0.0 < momentum <= 1.0:
            raise QuantConfigError(f"momentum must be in (0, 1], got {momentum!r}")
        if granularity == "channel" and scale == "learned" and num_channels is None:
            raise QuantConfigError(
                "a per-channel learned scale needs num_channels (known for weights only); "
                "use granularity='tensor' or scale='max'/'running' for activations"
            )
        if levels is None and bits is not None:
            levels = 2**bits
        self.levels = levels
        self.bits = None if levels is None else (bits if bits is not None else levels_to_bits(levels))
        self.symmetric = bool(symmetric)
        self.granularity = granularity
        self.ch_axis = int(ch_axis)
        self.scale_mode = scale
        self.momentum = float(momentum)
        self.binary = self.symmetric and levels == 2
        self.qmin, self.qmax = code_range(levels, self.symmetric) if levels is not None else (0, 0)
        self.calibrating = False
        # Where it is attached (set by quantize.apply_quantization; informative only).
        self.part: str | None = None
        self.target: str | None = None

        shape = (num_channels,) if granularity == "channel" and num_channels is not None else ()
        if scale == "running":
            # Lazily sized (per-channel) when num_channels is unknown; see _load_from_state_dict.
            init = torch.zeros(shape) if shape or granularity == "tensor" else torch.zeros(0)
            self.register_buffer("running_max", init.clone())
            if not self.symmetric:
                self.register_buffer("running_min", init.clone())
        elif scale == "learned":
            self.clip_max = nn.Parameter(torch.ones(shape))
            self.clip_max._optim = {"weight_decay": 0.0}
            if not self.symmetric:
                self.clip_min = nn.Parameter(-torch.ones(shape))
                self.clip_min._optim = {"weight_decay": 0.0}
        if scale != "max":
            # State flags live in buffers (so they travel with the state_dict) and are mirrored in
            # Python attributes, so forward never reads a tensor flag (a device sync on GPU).
            self.register_buffer("initialized", torch.tensor(False))
            self.register_buffer("frozen", torch.tensor(False))
        self._initialized = self._frozen = False

    def extra_repr(self) -> str:
        if self.levels is None:
            return "bits=None"
        return (
            f"bits={self.bits}, levels={self.levels}, symmetric={self.symmetric}, "
            f"granularity={self.granularity!r}, scale={self.scale_mode!r}"
        )

    # ---- range -------------------------------------------------------------------------

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel vector (C,) shaped to broadcast against x."""
        if t.dim() == 0 or self.granularity == "tensor" or x.dim() == 0:
            return t
        shape = [1] * x.dim()
        shape[self.ch_axis % x.dim()] = -1
        return t.reshape(shape)

    def _observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(max, min) of x per tensor or per channel; min is None when symmetric (max is max|x|).

        The range always includes 0. One ``aminmax`` pass (much faster than ``abs().amax()``).
        """
        x = x.detach()
        if self.granularity == "tensor" or x.dim() == 0:
            lo, hi = torch.aminmax(x)
        else:
            axis = self.ch_axis % x.dim()
            flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, rest)
            lo, hi = torch.aminmax(flat, dim=1)
        if self.symmetric:
            return torch.maximum(hi, -lo), None
        return hi.clamp_min(0), lo.clamp_max(0)

    @torch.no_grad()
    def _update_running(self, hi: torch.Tensor, lo: torch.Tensor | None) -> None:
        first = not self._initialized
        if first or self.running_max.shape != hi.shape:
            self.running_max = hi.to(self.running_max.dtype).clone()
            if lo is not None:
                self.running_min = lo.to(self.running_min.dtype).clone()
            self._set_flag("initialized", True)
        elif self.calibrating:  # PTQ: the range of every batch seen
            torch.maximum(self.running_max, hi, out=self.running_max)
            if lo is not None:
                torch.minimum(self.running_min, lo, out=self.running_min)
        else:  # QAT: exponential moving average
            self.running_max.lerp_(hi.to(self.running_max.dtype), self.momentum)
            if lo is not None:
                self.running_min.lerp_(lo.to(self.running_min.dtype), self.momentum)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor) -> None:
        """Set the running range or the learned clip from ``x`` (e.g. the weight, at attach time)."""
        if self.levels is None or self.scale_mode == "max":
            return
        hi, lo = self._observe(x)
        if self.scale_mode == "running":
            self._set_flag("initialized", False)
            self._update_running(hi, lo)
        else:
            self.clip_max.copy_(hi.clamp_min(torch.finfo(hi.dtype).tiny).expand_as(self.clip_max))
            if lo is not None:
                self.clip_min.copy_(lo.clamp_max(-torch.finfo(lo.dtype).tiny).expand_as(self.clip_min))
            self._set_flag("initialized", True)

    def _set_flag(self, name: str, value: bool) -> None:
        getattr(self, name).fill_(value)
        setattr(self, f"_{name}", value)

    def freeze(self) -> None:
        """Stop updating the running range (PTQ after calibration); ends calibration."""
        self.calibrating = False
        if self.scale_mode != "max":
            self._set_flag("frozen", True)

    def unfreeze(self) -> None:
        if self.scale_mode != "max":
            self._set_flag("frozen", False)

    def _scale_zero_point(self, hi: torch.Tensor, lo: torch.Tensor | None):
        """Step size and integer zero point (None when symmetric) from a range."""
        tiny = torch.finfo(hi.dtype).tiny
        if self.symmetric:
            return (hi / self.qmax).clamp_min(tiny), None
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(tiny)
        zero_point = (self.qmin - lo / scale).round().clamp(self.qmin, self.qmax)
        return scale, zero_point

    # ---- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.levels is None:
            return x
        if self.scale_mode == "max":
            return _DynamicFakeQuantSTE.apply(x, self)
        if self.scale_mode == "running":
            updating = (self.training or self.calibrating) and not self._frozen
            if updating or not self._initialized:
                hi, lo = self._observe(x)
                if updating:
                    self._update_running(hi, lo)
                if self.calibrating:  # observe only: downstream layers calibrate on float inputs
                    return x
            if self._initialized:
                hi, lo = self.running_max, getattr(self, "running_min", None)
            # else: never calibrated and frozen/eval, so the current range stands in
            scale, zp = self._scale_zero_point(hi.to(x.dtype), None if lo is None else lo.to(x.dtype))
            return fake_quantize(
                x, self._view(scale, x), self.qmin, self.qmax,
                None if zp is None else self._view(zp, x), clip_grad=True, binary=self.binary,
            )  # fmt: skip
        return self._forward_learned(x)

    def _forward_learned(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            self.init_range(x)
        if self.calibrating:
            return x
        g = 1.0 / math.sqrt(max(1, x.numel() // max(1, self.clip_max.numel())) * self.qmax)
        hi = self._view(_grad_scale(self.clip_max, g), x).abs()
        tiny = torch.finfo(x.dtype).tiny
        if self.symmetric:
            scale, zp = (hi / self.qmax).clamp_min(tiny), None
        else:
            lo = self._view(_grad_scale(self.clip_min, g), x)
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(tiny)
            zp = (self.qmin - lo / scale).round().clamp(self.qmin, self.qmax).detach()
        return _LearnedFakeQuantSTE.apply(x, scale, zp, self.qmin, self.qmax, self.binary)

    # ---- export ------------------------------------------------------------------------

    @torch.no_grad()
    def current_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) this quantizer would use on ``x`` in eval mode, per tensor or channel."""
        if self.levels is None:
            raise QuantConfigError("a quantizer with bits=None has no scale")
        if self.scale_mode == "learned":
            hi = self.clip_max.detach().abs()
            lo = self.clip_min.detach() if not self.symmetric else None
            if not self._initialized:
                hi, lo = self._observe(x)
        elif self.scale_mode == "running" and self._initialized:
            hi, lo = self.running_max, getattr(self, "running_min", None)
        else:
            hi, lo = self._observe(x)
        hi = hi.to(x.dtype)
        lo = None if lo is None else lo.to(x.dtype)
        scale, zp = self._scale_zero_point(hi, lo)
        return scale, torch.zeros_like(scale) if zp is None else zp

    @torch.no_grad()
    def quantize_to_int(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes of ``x``, with (scale, zero_point): x_q = (codes - zero_point)·scale.

        Codes are int8 up to 8 bit symmetric (uint8 asymmetric), int16 up to 16 bit symmetric,
        int32 for 16-bit asymmetric. Binary codes are ±1. Scale and zero point have one entry
        per channel (granularity "channel") or are 0-dim.
        """
        scale, zp = self.current_scale(x)
        s, z = self._view(scale, x), self._view(zp, x)
        if self.binary:
            codes = torch.where(x >= 0, 1, -1)
        else:
            codes = _codes(x, s.to(x.dtype), None if self.symmetric else z.to(x.dtype))
            codes = codes.round_().clamp_(self.qmin, self.qmax)
        return codes.to(int_dtype(self.qmin, self.qmax)), scale.float(), zp.to(torch.int32)

    # ---- state ---------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazily sized per-channel running range takes the stored shape.
        for name in ("running_max", "running_min"):
            key = prefix + name
            if key in state_dict and name in self._buffers:
                stored = state_dict[key]
                if self._buffers[name].shape != stored.shape:
                    self._buffers[name] = torch.zeros_like(stored, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "initialized" in self._buffers:
            self._initialized, self._frozen = bool(self.initialized), bool(self.frozen)
