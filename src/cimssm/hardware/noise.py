"""Analog noise models as seeded tensor transforms ``f(W) -> W'``.

Each class is one physical non-ideality. A transform is attached to a weight (torch
parametrization), a named tap, or a layer's input/output through ``hardware/core.py``; it
never writes the clean tensor: every forward recomputes ``W'`` from the weight it is given
(the clean or already-quantized one), so removing it restores the clean model bit for bit.

Seeding (DESIGN.md, "Evaluation under noise"):

- ``program(seed)`` sets the transform's seed, derived by the caller from the chip seed
  ``chip_seed(seed, profile, level, chip)`` and the target's name. Per-chip draws (programming
  noise, drift exponents, stuck devices, ...) are standard normals / uniforms drawn from a
  ``torch.Generator`` seeded with that seed, on CPU (so a seed gives the same draws on every
  device), the first time the tensor's shape is seen after ``program``. They live in
  non-persistent buffers: a checkpoint never holds noise.
- ``set_time(t)`` moves the chip to inference time ``t`` (seconds after programming); draws that
  depend on ``t`` (PCM read noise) are keyed by ``(seed, t)``; per-chip draws are kept.
- Per-forward draws (QS4D's test noise on A, ADC output noise) use a fresh generator seeded from
  ``(seed, t, forward counter)``; ``program`` and ``set_time`` reset the counter, so a rerun of
  the same forwards reproduces the same numbers.

Gradients: additive and multiplicative noise are differentiable as written (noise-aware
training); the non-differentiable ones (drift compensation factors, quantizers) pass the
gradient straight through.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable

import torch
from torch import nn


class NoiseConfigError(ValueError):
    """A noise profile or ``analog`` section that cannot be used (names key, value, allowed)."""


# ------------------------------------------------------------------------------------ seeding
def _seed_part(p) -> str:
    if isinstance(p, bool):
        return repr(int(p))
    if isinstance(p, numbers.Integral):
        return repr(int(p))
    if isinstance(p, numbers.Real):
        return repr(float(p))  # 0.05 and np.float64(0.05) give the same seed
    return str(p)


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` via SHA-256 (stable across processes, unlike ``hash()``).

    Numbers are normalised (``int`` / ``float`` repr) so ``1`` and ``np.int64(1)``, ``0.05`` and
    ``np.float64(0.05)`` give the same seed.
    """
    text = "\x1f".join(_seed_part(p) for p in parts)
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def chip_seed(seed: int, profile_name: str, level: float, chip: int) -> int:
    """Seed of one Monte-Carlo chip: ``sha256(seed, profile, level, chip)`` (DESIGN.md)."""
    return stable_seed("chip", int(seed), str(profile_name), float(level), int(chip))


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (CPU so that draws do not depend on the device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


# ------------------------------------------------------------------------------------ tiles
def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View ``w`` as the 2-D array a crossbar holds: (out, rest); a vector is one column."""
    if w.dim() == 0:
        return w.reshape(1, 1)
    if w.dim() == 1:
        return w.reshape(-1, 1)
    return w.reshape(w.shape[0], -1)


def tile_slices(rows: int, cols: int, tile_size: int) -> list[tuple[slice, slice]]:
    """Tiles of at most ``tile_size`` x ``tile_size``, each dimension split into near-equal parts.

    ``rows = 1100, tile_size = 512`` gives 3 row blocks of 367, 367, 366 (as aihwkit's tile
    arrays split a layer), not 512, 512, 76.
    """

    def split(n: int) -> list[slice]:
        k = max(1, math.ceil(n / tile_size))
        base, extra = divmod(n, k)
        out, start = [], 0
        for i in range(k):
            size = base + (1 if i < extra else 0)
            out.append(slice(start, start + size))
            start += size
        return out

    return [(r, c) for r in split(rows) for c in split(cols)]


def tile_map(w2: torch.Tensor, tile_size: int | None, reduce: Callable[[torch.Tensor], torch.Tensor]):
    """A tensor shaped like ``w2`` whose entries hold ``reduce`` of their tile (loop over tiles)."""
    if tile_size is None:
        return reduce(w2).expand_as(w2)
    out = torch.empty_like(w2)
    for r, c in tile_slices(w2.shape[0], w2.shape[1], tile_size):
        out[r, c] = reduce(w2[r, c])
    return out


def abs_max(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """max|w| per tensor, or per output channel (dim 0) with ``per_channel`` (keepdim shape)."""
    a = w.detach().abs()
    if per_channel and w.dim() >= 2:
        return a.reshape(a.shape[0], -1).amax(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    return a.amax()


def abs_mean(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    a = w.detach().abs()
    if per_channel and w.dim() >= 2:
        return a.reshape(a.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    return a.mean()


def straight_through(w: torch.Tensor, w_noisy: torch.Tensor) -> torch.Tensor:
    """``w_noisy`` in value, identity in gradient; exact ``w_noisy`` when no gradient is needed."""
    if torch.is_grad_enabled() and w.requires_grad:
        return w + (w_noisy - w).detach()
    return w_noisy


# ------------------------------------------------------------------------------------ base
class NoiseTransform(nn.Module):
    """Base of every noise transform: seed, inference time, lazily drawn per-chip buffers.

    Subclasses declare their draw buffers in ``draw_names`` (non-persistent buffers), obtain them
    with ``self.normal(name, shape)`` / ``self.uniform(name, shape)`` and list the ones that
    depend on the inference time in ``time_draw_names``.
    """

    draw_names: tuple[str, ...] = ()
    time_draw_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.seed = 0
        self.t_inference = 0.0
        self.forward_count = 0
        for name in self.draw_names:
            self.register_buffer(name, None, persistent=False)

    # -- chip life cycle
    def program(self, seed: int) -> None:
        """Start a new chip: new seed, forget every draw (they are redrawn from the seed)."""
        self.seed = int(seed)
        self.forward_count = 0
        for name in self.draw_names:
            setattr(self, name, None)

    def set_time(self, t_inference: float) -> None:
        """Move to inference time ``t`` (s); time-dependent draws are redrawn for ``(seed, t)``."""
        self.t_inference = float(t_inference)
        self.forward_count = 0
        for name in self.time_draw_names:
            setattr(self, name, None)

    # -- draws
    def _draw(self, name: str, shape: torch.Size, like: torch.Tensor, kind: str) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape != shape:
            key = (self.t_inference,) if name in self.time_draw_names else ()
            g = generator(stable_seed(self.seed, name, *key))
            draw = torch.randn if kind == "normal" else torch.rand
            buf = draw(tuple(shape), generator=g, dtype=torch.float32)
        if buf.device != like.device:
            buf = buf.to(like.device)
        setattr(self, name, buf)
        return buf if buf.dtype == like.dtype or not like.is_floating_point() else buf.to(like.dtype)

    def normal(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """Per-chip N(0, 1) draws of ``shape`` (drawn once after ``program``)."""
        return self._draw(name, torch.Size(shape), like, "normal")

    def uniform(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """Per-chip U[0, 1) draws of ``shape``."""
        return self._draw(name, torch.Size(shape), like, "uniform")

    def forward_normal(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, 1) shaped like ``like``, new at every call, keyed by (seed, t, forward counter)."""
        g = generator(stable_seed(self.seed, "forward", self.t_inference, self.forward_count))
        self.forward_count += 1
        z = torch.randn(like.shape, generator=g, dtype=torch.float32)
        return z.to(device=like.device, dtype=like.dtype)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, t_inference={self.t_inference:g}"


# ------------------------------------------------------------------------------------ weight noise
class GaussianWeightNoise(NoiseTransform):
    """Additive Gaussian noise relative to the weight range, drawn once per chip.

    ``W' = W + level · max|W| · ε``, ε ~ N(0, 1) per element; max|W| of the whole tensor or, with
    ``per_channel``, of each output channel (dim 0). Profile ``gauss_Xpct``: level = X / 100.
    ``reference`` (a scalar or a per-row (out, 1) tensor) replaces max|W|: HPD's factor noise
    relative to the original matrix (hardware/hpd.py, ``noise_reference=original``).
    """

    draw_names = ("eps",)

    def __init__(self, level: float, per_channel: bool = False, reference: torch.Tensor | None = None) -> None:
        super().__init__()
        self.level = float(level)
        self.per_channel = bool(per_channel)
        ref = None if reference is None else torch.as_tensor(reference).detach().clone()
        self.register_buffer("reference", ref, persistent=False)

    def noise_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The std per unit ``level``: ``reference`` when set, else max|W| (per tensor / channel)."""
        if self.reference is not None:
            return self.reference.to(device=w.device, dtype=w.dtype)
        return abs_max(w, self.per_channel)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.level == 0.0:
            return w
        eps = self.normal("eps", w.shape, w)
        return w + self.level * self.noise_scale(w) * eps


class MultiplicativeWeightNoise(NoiseTransform):
    """Multiplicative Gaussian noise, drawn once per chip: ``W' = W · (1 + level · ε)``, ε ~ N(0, 1).

    Profile ``mult_Xpct``: level = X / 100 is the relative std of every weight.
    """

    draw_names = ("eps",)

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = float(level)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.level == 0.0:
            return w
        return w * (1.0 + self.level * self.normal("eps", w.shape, w))


class ConductanceDrift(NoiseTransform):
    """Power-law conductance drift with a per-device exponent and global drift compensation.

    Each weight is one device whose conductance decays as (Ielmini et al. 2007; aihwkit):

        W(t) = W · ((t + t0) / t0)^(−ν),   ν = μ_ν + σ_ν · ε,  ε ~ N(0, 1) per device (per chip)

    so ``W(t) = W · exp(−ν·L)`` with ``L = ln((t + t0)/t0)`` is log-normal around
    ``W · exp(−μ_ν·L + σ_ν²L²/2)``. ``level`` fixes the spread: σ_ν is chosen so that at the
    reference time ``t_ref`` the relative spread (coefficient of variation) of each weight is
    exactly ``level``:

        sqrt(exp(σ_ν² · L_ref²) − 1) = level   =>   σ_ν = sqrt(ln(1 + level²)) / L_ref.

    ``t_ref=None`` (default) takes ``t_ref`` = the inference time being evaluated, so the spread
    equals ``level`` at every evaluated ``t > 0``; a number fixes σ_ν and the spread grows with
    ``t``. At ``t = 0`` nothing has drifted (identity). ν is not folded (|ν|) so the spread formula
    is exact.

    Global drift compensation (switchable): one factor per tensor (per output channel with
    ``per_channel``), ``α = mean|W| / mean|W(t)|`` (a reference read-out right after programming
    divided by the read-out at ``t``, as aihwkit's GlobalDriftCompensation), removes the mean decay.
    Profile ``drift_5pct``: level 0.05, compensation on.
    """

    draw_names = ("eps",)

    def __init__(
        self,
        level: float,
        t_ref: float | None = None,
        t0: float = 20.0,
        nu_mean: float = 0.05,
        compensation: bool = True,
        per_channel: bool = False,
    ) -> None:
        super().__init__()
        if t_ref is not None and t_ref <= 0:
            raise ValueError(f"t_ref must be > 0 seconds or None, got {t_ref!r}")
        self.level = float(level)
        self.t_ref = None if t_ref is None else float(t_ref)
        self.t0 = float(t0)
        self.nu_mean = float(nu_mean)
        self.compensation = bool(compensation)
        self.per_channel = bool(per_channel)

    def drift_exponent_std(self, t: float) -> float:
        """σ_ν = sqrt(ln(1 + level²)) / ln((t_ref + t0)/t0), with t_ref defaulting to ``t``."""
        t_ref = t if self.t_ref is None else self.t_ref
        return math.sqrt(math.log1p(self.level**2)) / math.log((t_ref + self.t0) / self.t0)

    def drift_factor(self, shape, like: torch.Tensor, t: float) -> torch.Tensor:
        """Per-device ((t + t0)/t0)^(−ν)."""
        log_t = math.log((t + self.t0) / self.t0)
        nu = self.nu_mean + self.drift_exponent_std(t) * self.normal("eps", shape, like)
        return torch.exp(-nu * log_t)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = self.t_inference
        if t <= 0.0:
            return w
        w_t = w * self.drift_factor(w.shape, w, t)
        if self.compensation:
            alpha = abs_mean(w, self.per_channel) / abs_mean(w_t, self.per_channel).clamp_min(1e-30)
            w_t = alpha * w_t
        return w_t

    def extra_repr(self) -> str:
        return (
            f"level={self.level}, t_ref={self.t_ref}, t0={self.t0}, nu_mean={self.nu_mean}, "
            f"compensation={self.compensation}, {super().extra_repr()}"
        )


class StuckAtFaults(NoiseTransform):
    """Stuck devices: a fraction ``rate`` of the weights, chosen once per chip, is stuck.

    ``mode="zero"``: the weight reads 0 (a device stuck in its reset state).
    ``mode="gmax"``: the weight reads ``sign(W) · g_max`` with g_max = max|W| of its crossbar tile
    (tiles of at most ``tile_size`` x ``tile_size``; the whole tensor when ``tile_size`` is None;
    one output channel per tile with ``per_channel``). ``sign(0)`` counts as +.
    Device i is stuck when u_i < rate, u_i ~ U[0, 1).
    """

    draw_names = ("u",)

    def __init__(
        self, rate: float, mode: str = "zero", tile_size: int | None = 512, per_channel: bool = False
    ):
        super().__init__()
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"stuck-at rate must be in [0, 1], got {rate!r}")
        if mode not in ("zero", "gmax"):
            raise ValueError(f"stuck-at mode must be 'zero' or 'gmax', got {mode!r}")
        self.rate = float(rate)
        self.mode = mode
        self.tile_size = tile_size
        self.per_channel = bool(per_channel)

    def stuck_mask(self, w: torch.Tensor) -> torch.Tensor:
        return self.uniform("u", w.shape, w) < self.rate

    def stuck_value(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "zero":
            return torch.zeros_like(w)
        w2 = as_matrix(w.detach())
        if self.per_channel:
            g_max = w2.abs().amax(dim=1, keepdim=True).expand_as(w2)
        else:
            g_max = tile_map(w2, self.tile_size, lambda x: x.abs().amax())
        sign = torch.where(w2 < 0, -1.0, 1.0).to(w2.dtype)
        return (sign * g_max).reshape(w.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0:
            return w
        return torch.where(self.stuck_mask(w), self.stuck_value(w), w)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, mode={self.mode}, tile_size={self.tile_size}, {super().extra_repr()}"


class QS4DForwardNoise(NoiseTransform):
    """QS4D's analog test noise on the SSM matrix A, drawn anew at every forward.

    ``A' = A + level · (max(A) − min(A)) · ε``, ε ~ N(0, 1) per element and per forward, from a
    generator seeded with (chip seed, t, forward counter): a rerun after ``program`` reproduces
    the same sequence of draws (QS4D, arXiv 2507.06079, analog noise test; σ = level).
    """

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = float(level)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.level == 0.0:
            return a
        a_d = a.detach()
        spread = a_d.amax() - a_d.amin()
        return a + self.level * spread * self.forward_normal(a)


# ------------------------------------------------------------------------------------ periphery
def _clean_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as stored (the parametrization's original when parametrized)."""
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        return params["weight"].original
    return module.weight


class DACQuantization(NoiseTransform):
    """DAC on a layer's input: per input vector, scale to [−1, 1] and quantize to ``bits``.

    ``s = max|x|`` over the input features of each vector (aihwkit's "abs_max" noise
    management) or the fixed bound ``in_bound`` (values beyond it clip);
    ``x' = s · round(clip(x/s, −1, 1) · n) / n`` with ``n = 2^(bits−1) − 1`` (symmetric);
    ``bits=None`` records the scale without quantizing (for a paired :class:`ADCQuantization`).
    The gradient passes straight through. ``channel_dim``: the dim(s) of one input vector: -1 for
    Linear, 1 for a pointwise Conv1d, (1, 2) for a Conv1d whose output positions mix several
    input positions (one scale per sample).
    """

    def __init__(
        self, bits: int | None = 8, in_bound: float | None = None, channel_dim: int | tuple[int, ...] = -1
    ):
        super().__init__()
        self.bits = bits
        self.in_bound = in_bound
        self.channel_dim = channel_dim
        self.last_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_bound is None:
            s = x.detach().abs().amax(dim=self.channel_dim, keepdim=True).clamp_min(1e-12)
        else:
            s = torch.full((), float(self.in_bound), dtype=x.dtype, device=x.device)
        self.last_scale = s
        if self.bits is None and self.in_bound is None:
            return x
        x_n = (x / s).clamp(-1.0, 1.0)
        if self.bits is not None:
            n = 2 ** (self.bits - 1) - 1
            x_n = torch.round(x_n * n) / n
        return straight_through(x, x_n * s)


class ADCQuantization(NoiseTransform):
    """Read-out of a layer's output: output noise, bound and ADC quantization.

    Outputs are handled in the normalized units of an analog tile (aihwkit's forward IO):
    ``y_n = y / (s_x · max|W|)`` with ``s_x`` the input scale recorded by the paired
    :class:`DACQuantization` and max|W| of the layer's clean weight. Then

        y_n += out_noise · ε      (ε ~ N(0, 1), new at every forward; aihwkit ``out_noise``)
        y_n  = clip(y_n, −out_bound, out_bound)                   (``out_bound=None``: no clip)
        y_n  = round(y_n · n / out_bound) · out_bound / n,  n = 2^(bits−1) − 1   (``bits=None``: off)

    and ``y' = y_n · s_x · max|W|``. The bias, if any, is read out with the product.
    Gradient: straight through.
    """

    def __init__(
        self,
        dac: DACQuantization,
        owner: nn.Module,
        bits: int | None = 8,
        out_bound: float | None = 10.0,
        out_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if bits is not None and out_bound is None:
            raise ValueError("ADC quantization needs an out_bound")
        self.bits = bits
        self.out_bound = out_bound
        self.out_noise = float(out_noise)
        # Plain lists: neither is a child module of this transform (no duplicate registration).
        self._dac = [dac]
        self._owner = [owner]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        s_x = self._dac[0].last_scale
        if s_x is None:
            raise RuntimeError("ADCQuantization ran before its DAC saw an input")
        s = s_x * _clean_weight(self._owner[0]).detach().abs().amax().clamp_min(1e-12)
        y_n = y.detach() / s
        if self.out_noise > 0.0:
            y_n = y_n + self.out_noise * self.forward_normal(y_n)
        if self.out_bound is not None:
            y_n = y_n.clamp(-self.out_bound, self.out_bound)
        if self.bits is not None:
            n = 2 ** (self.bits - 1) - 1
            y_n = torch.round(y_n * (n / self.out_bound)) * (self.out_bound / n)
        return straight_through(y, y_n * s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, out_bound={self.out_bound}, out_noise={self.out_noise}, {super().extra_repr()}"


def is_noise_transform(module: nn.Module) -> bool:
    """Predicate for ``detach_transforms``: every noise transform (not quantizers)."""
    return isinstance(module, NoiseTransform)
