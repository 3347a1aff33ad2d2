"""PCM statistical device model (Nandakumar et al. 2019) as aihwkit 1.2.0 implements it.

Reference: aihwkit ``inference/noise/pcm.py`` (``PCMLikeNoiseModel``),
``inference/converter/conductance.py`` (``SinglePairConductanceConverter``),
``inference/compensation/drift.py`` (``GlobalDriftCompensation``); formulas as in
papers/NOTES.md. Conductances are in µS, times in seconds.

One class per device model (:class:`PCMLikeNoiseModel`), one method per physical process; the
transform :class:`PCMWeight` maps a weight to a differential pair of conductances per crossbar
tile, runs the processes, and maps back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cimssm.hardware.noise import NoiseTransform, as_matrix, straight_through, tile_slices

_ZERO_CLIP = 1e-7  # aihwkit: floor of ĝ = g/g_max before its logarithm


def _randn(like: torch.Tensor, gen: torch.Generator | None, normal: torch.Tensor | None) -> torch.Tensor:
    if normal is not None:
        return normal.to(device=like.device, dtype=like.dtype)
    z = torch.randn(like.shape, generator=gen, dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype)


@dataclass
class PCMLikeNoiseModel:
    """Phase-change memory: programming noise, drift, 1/f read noise (aihwkit PCMLikeNoiseModel).

    Every stochastic method takes a ``torch.Generator`` ``gen`` (or pre-drawn standard normals
    ``normal`` of the same shape, which :class:`PCMWeight` keeps per chip). The ``*_scale`` fields
    multiply the corresponding noise std (1.0 = the published model); ``drift_scale`` multiplies
    ν as aihwkit's does.
    """

    g_max: float = 25.0  # µS
    t0: float = 20.0  # s, time of the programming read-out that drift is measured from
    t_read: float = 250e-9  # s, duration of one read
    prog_coeff: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    prog_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0
    drift_noise_scale: float = 1.0  # multiplies σ_ν only (0: every device drifts with μ_ν)

    # -- mapping (SinglePairConductanceConverter, g_min = 0)
    def to_conductances(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Differential pair: g+ = clip(W·scale, 0, g_max), g− = clip(−W·scale, 0, g_max).

        ``scale = g_max / max|W|`` per tile (broadcast to ``w``). Returns (2, *w.shape): [g+, g−].
        """
        g = w * scale
        return torch.stack([g.clamp(0.0, self.g_max), (-g).clamp(0.0, self.g_max)])

    @staticmethod
    def from_conductances(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """W = (g+ − g−) / scale."""
        return (g[0] - g[1]) / scale

    # -- programming
    def programming_noise_std(self, g_target: torch.Tensor) -> torch.Tensor:
        """σ_prog = (c0 + c1·ĝ + c2·ĝ²) · g_max/25 µS with ĝ = g/g_max (no clamp)."""
        g_hat = g_target / self.g_max
        c0, c1, c2 = self.prog_coeff
        return (c0 + c1 * g_hat + c2 * g_hat**2) * (self.g_max / 25.0)

    def program(
        self, g_target: torch.Tensor, gen: torch.Generator | None = None, normal: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Programming noise: g_prog = max(g + prog_noise_scale · σ_prog(ĝ) · N(0, 1), 0)."""
        z = _randn(g_target, gen, normal)
        g_prog = g_target + self.prog_noise_scale * self.programming_noise_std(g_target) * z
        return g_prog.clamp_min(0.0)

    # -- drift
    def drift_exponent_stats(self, g_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ_ν = clip(−0.0155·ln ĝ + 0.0244, 0.049, 0.1), σ_ν = clip(−0.0125·ln ĝ − 0.0059, 0.008, 0.045).

        ĝ = |g_target| / g_max floored at 1e-7.
        """
        log_g = torch.log((g_target.abs() / self.g_max).clamp_min(_ZERO_CLIP))
        mu = (-0.0155 * log_g + 0.0244).clamp(0.049, 0.1)
        sigma = (-0.0125 * log_g - 0.0059).clamp(0.008, 0.045)
        return mu, sigma

    def generate_drift_coefficients(
        self, g_target: torch.Tensor, gen: torch.Generator | None = None, normal: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ν = drift_scale · |μ_ν + drift_noise_scale · σ_ν · N(0, 1)| from the target conductance."""
        mu, sigma = self.drift_exponent_stats(g_target)
        z = _randn(g_target, gen, normal)
        return self.drift_scale * (mu + self.drift_noise_scale * sigma * z).abs()

    def apply_drift(self, g_prog: torch.Tensor, nu: torch.Tensor, t_inference: float) -> torch.Tensor:
        """g(t) = g_prog · (t/t0)^(−ν) with t = t_inference + t0 (identity at t_inference = 0)."""
        t = float(t_inference) + self.t0
        if t <= self.t0:
            return g_prog
        return g_prog * torch.exp(-nu * math.log(t / self.t0))

    # -- read noise
    def read_noise_std(self, g_prog: torch.Tensor, t_inference: float) -> torch.Tensor:
        """σ_read = Q_s·sqrt(ln((t + t_read)/(2·t_read))), Q_s = min(0.0088/max(ĝ_prog^0.65, 1e-3), 0.2).

        t = t_inference + t0; ĝ_prog = |g_prog| / g_max (accumulated 1/f noise since programming).
        """
        t = float(t_inference) + self.t0
        q_s = (0.0088 / ((g_prog.abs() / self.g_max) ** 0.65).clamp_min(1e-3)).clamp_max(0.2)
        return q_s * math.sqrt(math.log((t + self.t_read) / (2.0 * self.t_read)))

    def apply_read_noise(
        self,
        g_drift: torch.Tensor,
        g_prog: torch.Tensor,
        t_inference: float,
        gen: torch.Generator | None = None,
        normal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """g_final = max(g(t) + |g(t)| · read_noise_scale · σ_read · N(0, 1), 0)."""
        t = float(t_inference) + self.t0
        if t <= 0:
            return g_prog
        z = _randn(g_drift, gen, normal)
        sigma = self.read_noise_std(g_prog, t_inference)
        return (g_drift + g_drift.abs() * self.read_noise_scale * sigma * z).clamp_min(0.0)

    # -- compensation
    @staticmethod
    def drift_compensation_factor(w_prog: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """Global drift compensation α = r0 / r_t, r0 = mean|W_prog|, r_t = mean|W_t| (one tile).

        aihwkit reads the tile with one-hot inputs right after programming (reference) and at
        ``t``, and multiplies the outputs by α; reading with one-hot inputs returns the columns,
        so the read-out is mean|W|. r_t is floored at 1e-4·r0 (aihwkit floors it at 1e-4).
        """
        r0 = w_prog.abs().mean()
        r_t = w_t.abs().mean()
        return r0 / torch.maximum(r_t, (1e-4 * r0).clamp_min(1e-30))


class PCMWeight(NoiseTransform):
    """W -> PCM conductance pairs per tile -> programmed, drifted, read-noisy W at ``t_inference``.

    Per tile (at most ``tile_size`` x ``tile_size``, near-equal split of the matrix view
    (out, rest) of the tensor): ``scale = g_max / max|W_tile|``; both devices of each pair are
    programmed (:meth:`PCMLikeNoiseModel.program`), get drift exponents from their target
    conductance, drift to ``t`` and get read noise; W_t = (g+ − g−)/scale, then, with
    ``drift_compensation``, W_t · α_tile (α = mean|W_prog| / mean|W_t| of the tile).

    Draws: programming noise and drift exponents once per chip (``program(seed)``); read noise once
    per chip and inference time (``set_time(t)`` redraws it for ``(seed, t)`` and keeps the rest).
    The forward recomputes everything from its input weight, so the clean weight is never written
    and noise-aware training sees the current weight; the gradient passes straight through.
    """

    draw_names = ("z_prog", "z_nu", "z_read")
    time_draw_names = ("z_read",)

    def __init__(
        self,
        noise_model: PCMLikeNoiseModel | None = None,
        tile_size: int | None = 512,
        drift_compensation: bool = True,
        t_inference: float = 0.0,
        reference: torch.Tensor | float | None = None,
    ) -> None:
        super().__init__()
        self.noise_model = noise_model if noise_model is not None else PCMLikeNoiseModel()
        # HPD noise_reference=original: g_max maps to max(max|W| of the original matrix, max|W_tile|)
        self.reference = None if reference is None else float(reference)
        self.tile_size = tile_size
        self.drift_compensation = bool(drift_compensation)
        self.t_inference = float(t_inference)
        self._cache: tuple | None = None  # (weight, (version, ...), noisy weight); not a buffer

    def _per_tile(self, w2: torch.Tensor, fn) -> torch.Tensor:
        """A tensor shaped like ``w2`` holding ``fn(rows, cols)`` of each tile (loop over tiles)."""
        out = torch.empty_like(w2)
        for r, c in tile_slices(w2.shape[0], w2.shape[1], self.tile_size or max(w2.shape)):
            out[r, c] = fn(r, c)
        return out

    def tile_scale(self, w2: torch.Tensor) -> torch.Tensor:
        """g_max / max|W_tile| for every element of the matrix ``w2`` (1 for an all-zero tile);
        with ``reference``, g_max / max(max|W_tile|, reference)."""
        g_max = self.noise_model.g_max

        def scale(r, c):
            m = w2[r, c].abs().amax()
            if self.reference is not None:
                m = m.clamp_min(self.reference)
            return torch.where(m > 0, g_max / m.clamp_min(1e-30), torch.ones_like(m))

        return self._per_tile(w2, scale)

    def program(self, seed: int) -> None:
        super().program(seed)
        self._cache = None

    def set_time(self, t_inference: float) -> None:
        super().set_time(t_inference)
        self._cache = None

    def conductances(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage at the current inference time, for inspection.

        Keys: scale, g_target, g_prog, nu, g_drift, g_final (conductances (2, R, C): [g+, g−]),
        w_prog, w_t (weights (R, C), w_t after compensation), on the matrix view (R, C) of ``w``.
        """
        t = self.t_inference
        dev = self.noise_model
        w2 = as_matrix(w.detach())
        scale = self.tile_scale(w2)  # (R, C)
        g_target = dev.to_conductances(w2, scale)  # (2, R, C)
        g_prog = dev.program(g_target, normal=self.normal("z_prog", g_target.shape, g_target))
        nu = dev.generate_drift_coefficients(g_target, normal=self.normal("z_nu", g_target.shape, g_target))
        g_drift = dev.apply_drift(g_prog, nu, t)
        z_read = self.normal("z_read", g_target.shape, g_target)
        g_final = dev.apply_read_noise(g_drift, g_prog, t, normal=z_read)
        w_prog = dev.from_conductances(g_prog, scale)  # (R, C)
        w_t = dev.from_conductances(g_final, scale)
        if self.drift_compensation:
            alpha = self._per_tile(w2, lambda r, c: dev.drift_compensation_factor(w_prog[r, c], w_t[r, c]))
            w_t = alpha * w_t
        return {
            "scale": scale,
            "g_target": g_target,
            "g_prog": g_prog,
            "nu": nu,
            "g_drift": g_drift,
            "g_final": g_final,
            "w_prog": w_prog,
            "w_t": w_t,
        }

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Evaluation reads the same weight tensor every forward: reuse the result while neither the
        # tensor (same object, same in-place version), the chip nor the time changed.
        key = (w._version, w.dtype, w.device, self.drift_compensation)
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] is w and cache[1] == key:
            w_t = cache[2]
        else:
            w_t = self.conductances(w)["w_t"].reshape(w.shape)
            self._cache = (w, key, w_t)
        return straight_through(w, w_t)

    def extra_repr(self) -> str:
        return (
            f"tile_size={self.tile_size}, drift_compensation={self.drift_compensation}, "
            f"{self.noise_model}, {super().extra_repr()}"
        )
