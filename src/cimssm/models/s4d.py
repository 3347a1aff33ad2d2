"""S4D: a diagonal state-space sequence model (Gu et al. 2022), as used by QS4D (arXiv 2507.06079).

Per channel h (H channels), a complex diagonal SSM with N/2 states (the conjugate half is implied,
hence the factor 2 and the real part below), B folded into C:

    A_n   = -exp(log_A_real_n) + i·A_imag_n           S4D-Lin init: A_n = -1/2 + i·π·n, n = 0..N/2-1
    Δ     = exp(log_dt)                               log Δ ~ U[log dt_min, log dt_max]
    dA_n  = exp(Δ·A_n)                                zero-order hold (ZOH)
    dB_n  = (exp(Δ·A_n) - 1) / A_n
    K[l]  = 2·Re( Σ_n C_n·dB_n·dA_n^l ),  l = 0..L-1  the convolution kernel
    y     = K * u + D·u                               causal convolution, by FFT of length >= 2L

The same SSM in recurrent (step) form, with a complex state x (B, H, N/2):

    x_t   = dA·x_{t-1} + dB·u_t
    y_t   = 2·Re( Σ_n C_n·x_t,n ) + D·u_t

A layer is  u -> GELU(y) -> dropout -> Conv1d(H, 2H, 1) -> GLU  ("mixing"); a block adds a
LayerNorm (pre- or post-), dropout and the residual.

Fast kernel: the Vandermonde powers dA^l are never built as exp of an (H, N/2, L) tensor. With
l = a·T + b (0 <= b < T),  dA^l = exp(Δ·A·a·T)·exp(Δ·A·b), so

    K[a·T + b] = 2·Re( Σ_n [C_n·dB_n·exp(Δ·A_n·a·T)] · exp(Δ·A_n·b) )

is one batched (real) matrix product (H, L/T, N) @ (H, N, T): only H·N/2·(L/T + T) exponentials.
``kernel_reference`` is the direct formula, kept for the tests.

Fast layer (same numbers, tests/test_fast_paths.py): the skip term is folded into the kernel,
K' = K + D·δ (its spectrum is K_f + D), so y = K' * u is one FFT convolution; the convolution
runs in chunks of the batch small enough to stay in cache, with a hand-written backward; and
the mixing Conv1d(H, 2H, 1) runs as a matrix product on the (B, L, H) layout the FFT writes.

Hardware hooks: every tensor QS4D quantizes passes through an ``nn.Identity`` tap (see
docs/architecture.md), called on every forward and every step; ``S4DModel.hardware_parts``
names them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from cimssm.models.common import POOLS as _POOLS
from cimssm.models.common import TASKS as _TASKS
from cimssm.models.common import has_hooks as _has_hooks


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def fft_length(n: int) -> int:
    """Smallest length >= n of the form 2^a·m, m in {1, 3, 5, 9, 15}: FFT sizes that run fast.

    Plain 5-smooth sizes with large odd factors (2000 = 2^4·5^3, 2187 = 3^7) measured slower than
    the next power of two on CPU; a small odd factor saves up to half of the padding.
    """
    best = None
    for m in (1, 3, 5, 9, 15):
        c = m
        while c < n:
            c *= 2
        best = c if best is None else min(best, c)
    return best


def kernel_reference(dtA: torch.Tensor, CB: torch.Tensor, L: int) -> torch.Tensor:
    """Direct S4D kernel K[l] = 2·Re(Σ_n CB_n·exp(dtA_n·l)), materialising (H, N/2, L).

    dtA = Δ·A (H, N/2) complex, CB = C·dB (H, N/2) complex. Slow; for tests and benchmarks.
    """
    powers = dtA.unsqueeze(-1) * torch.arange(L, device=dtA.device)  # (H, N/2, L)
    K = 2 * torch.einsum("hn,hnl->hl", CB, torch.exp(powers)).real  # (H, L)
    return K


def vandermonde_kernel(dtA: torch.Tensor, CB: torch.Tensor, L: int, block: int = 32) -> torch.Tensor:
    """Fast S4D kernel, same value as ``kernel_reference``: powers split as l = a·T + b.

    T = min(block, L). Everything past the (H, N/2) inputs is real arithmetic (complex exp is
    not vectorised on CPU): exp(x + iy) = e^x·(cos y + i·sin y), and the real part of the
    complex product is one real batched matmul, Re(P·Q) = [Re P, -Im P] @ [Re Q; Im Q].
    """
    T = max(1, min(block, L))
    n_blocks = -(-L // T)
    a = torch.arange(n_blocks, device=dtA.device, dtype=dtA.real.dtype) * T  # (L/T)
    b = torch.arange(T, device=dtA.device, dtype=dtA.real.dtype)  # (T)
    re, im = dtA.real, dtA.imag  # (H, N/2)
    CB_re, CB_im = 2 * CB.real.unsqueeze(1), 2 * CB.imag.unsqueeze(1)  # (H, 1, N/2)

    # outer = 2·CB·exp(dtA·a·T)
    mag = torch.exp(re.unsqueeze(1) * a.unsqueeze(-1))  # (H, L/T, N/2)
    phase = im.unsqueeze(1) * a.unsqueeze(-1)  # (H, L/T, N/2)
    cos, sin = torch.cos(phase), torch.sin(phase)  # (H, L/T, N/2)
    P_re = mag * (CB_re * cos - CB_im * sin)  # (H, L/T, N/2)
    P_im = mag * (CB_re * sin + CB_im * cos)  # (H, L/T, N/2)
    P = torch.cat([P_re, -P_im], dim=-1)  # (H, L/T, N)

    # inner = exp(dtA·b)
    mag = torch.exp(re.unsqueeze(-1) * b)  # (H, N/2, T)
    phase = im.unsqueeze(-1) * b  # (H, N/2, T)
    Q = mag.repeat(1, 2, 1) * torch.cat([torch.cos(phase), torch.sin(phase)], dim=-2)  # (H, N, T)

    K = torch.bmm(P, Q)  # (H, L/T, T)
    return K.reshape(K.shape[0], n_blocks * T)[:, :L]  # (H, L)


# Padded elements per chunk of the FFT convolution (4 MiB in fp32). A whole (B, H, 2L) tensor is
# tens of MiB: the allocator maps it fresh on every call and its page faults cost as much as the
# FFTs (measured at B 16, H 256, L 1024, 1 thread: 205 ms for the forward in one piece, 65 ms in
# chunks of this size, which also stay in cache from the rfft to the irfft).
FFT_CHUNK_NUMEL = 1 << 20


def _batch_chunk(batch: int, rows: int, n: int) -> int:
    """Batch elements per FFT chunk: about FFT_CHUNK_NUMEL padded values, at least one element."""
    return max(1, min(batch, FFT_CHUNK_NUMEL // max(1, rows * n)))


class _FFTCausalConv(torch.autograd.Function):
    """y[b, h, l] = Σ_{j<=l} K'[h, j]·u[b, h, l-j] with K' = K + D·δ_j (the skip term folded into
    the kernel: the spectrum of D·δ is D at every frequency), by FFT of length n >= 2L (no
    wrap-around), in chunks of the batch.

    u is (B, H, L) with any strides (a transposed (B, L, H) tensor is read in place); the output
    is (B, H, L), or (B, L, H) contiguous with ``time_last=False``, so the position-wise mixing
    that follows is one matrix product without a copy. Backward writes the gradients out as
    correlations (products with conjugate spectra) and recomputes rfft(u) chunk by chunk instead
    of keeping the (B, H, n/2+1) spectrum (about twice u in memory; keeping it measured only
    ~2 % faster).
    """

    @staticmethod
    def forward(ctx, u, K, D, time_last):  # noqa: D102
        batch, H, L = u.shape
        n = fft_length(2 * L)
        K_f = torch.fft.rfft(K, n=n)  # (H, n/2+1)
        if D is not None:
            K_f = K_f + D.unsqueeze(-1)  # K' = K + D·δ                             (H, n/2+1)
        y = u.new_empty((batch, H, L) if time_last else (batch, L, H))
        y_hl = y if time_last else y.transpose(1, 2)  # (B, H, L) view
        cb = _batch_chunk(batch, H, n)
        pad = u.new_zeros(cb, H, n)  # only [..., :L] is ever written: the tail stays zero
        for b0 in range(0, batch, cb):
            b1 = min(batch, b0 + cb)
            p = pad[: b1 - b0]
            p[..., :L].copy_(u[b0:b1])
            y_hl[b0:b1].copy_(torch.fft.irfft(torch.fft.rfft(p) * K_f, n=n)[..., :L])  # (b, H, L)
        ctx.save_for_backward(u, K_f)
        ctx.has_D, ctx.n, ctx.time_last = D is not None, n, time_last
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # noqa: D102
        u, K_f = ctx.saved_tensors
        n = ctx.n
        batch, H, L = u.shape
        need_u, need_K, need_D = ctx.needs_input_grad[:3]
        g_hl = grad_y if ctx.time_last else grad_y.transpose(1, 2)  # (B, H, L) view
        grad_u = grad_K = grad_D = None
        if need_u:  # in u's memory layout, so the transpose before this op needs no copy
            grad_u = (
                u.new_empty(batch, L, H).transpose(1, 2) if u.stride(1) == 1 else u.new_empty(batch, H, L)
            )
        gK_f = K_f.new_zeros(K_f.shape) if (need_K or need_D) else None  # (H, n/2+1)
        K_f_conj = K_f.conj()
        cb = _batch_chunk(batch, H, n)
        pad = u.new_zeros(cb, H, n)
        for b0 in range(0, batch, cb):
            b1 = min(batch, b0 + cb)
            p = pad[: b1 - b0]
            p[..., :L].copy_(g_hl[b0:b1])
            g_f = torch.fft.rfft(p)  # (b, H, n/2+1)
            # grad_u[j] = Σ_l grad_y[l]·K'[l-j]
            if need_u:
                grad_u[b0:b1].copy_(torch.fft.irfft(g_f * K_f_conj, n=n)[..., :L])
            # grad_K'[j] = Σ_b Σ_l grad_y[b, l]·u[b, l-j]
            if gK_f is not None:
                p[..., :L].copy_(u[b0:b1])
                gK_f += (g_f * torch.fft.rfft(p).conj()).sum(0)
        if gK_f is not None:
            grad_Kd = torch.fft.irfft(gK_f, n=n)[..., :L]  # (H, L)
            grad_K = grad_Kd if need_K else None
            grad_D = grad_Kd[:, 0].clone() if need_D and ctx.has_D else None
        return grad_u, grad_K, grad_D, None


# torch.compile runs this as it is (a graph break): inductor has no complex kernels, and tracing
# would unroll the chunk loop.
@torch.compiler.disable
def fft_causal_conv(
    u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None, time_last: bool = True
) -> torch.Tensor:
    """Causal convolution of u (B, H, L) with K (H, L) along L, plus D·u when D (H,) is given.

    Returns (B, H, L), or (B, L, H) with ``time_last=False``. Leading dims other than one batch
    dim are flattened (``time_last`` only). Computed in at least float32 (no half-precision FFT)
    and returned in u's dtype. Not twice differentiable.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    shape = u.shape
    if u.dim() != 3:
        if not time_last:
            raise ValueError(f"time_last=False needs u of shape (B, H, L), got {tuple(shape)}")
        u = u.reshape(-1, *shape[-2:])
    D = D.to(dtype) if D is not None else None
    y = _FFTCausalConv.apply(u.to(dtype), K.to(dtype), D, time_last)
    return y.reshape(shape).to(u.dtype) if time_last else y.to(u.dtype)


class S4DKernel(nn.Module):
    """Generates the S4D convolution kernel K (H, L) from diagonal A, C (B folded in) and Δ.

    Parameters (N = d_state, N/2 complex states per channel):
    ``log_A_real`` (H, N/2), ``A_imag`` (H, N/2), ``C`` (H, N/2, 2) real view of a complex tensor,
    ``log_dt`` (H,). When ``lr`` is given, ``log_A_real``, ``A_imag`` and ``log_dt`` carry the
    optimizer hint ``_optim = {"lr": lr, "weight_decay": 0.0}`` (lr=0.0 freezes them in effect).
    Taps ``A_real_tap``, ``A_imag_tap``, ``C_tap``, ``log_dt_tap`` see those tensors on every call.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        kernel_T: int = 32,
    ):
        super().__init__()
        _check(isinstance(d_model, int) and d_model > 0, "d_model", "a positive integer", d_model)
        _check(
            isinstance(d_state, int) and d_state > 0 and d_state % 2 == 0,
            "d_state",
            "a positive even integer (N/2 complex states, conjugate pairs)",
            d_state,
        )
        _check(0 < dt_min <= dt_max, "dt_min, dt_max", "0 < dt_min <= dt_max", (dt_min, dt_max))
        _check(isinstance(kernel_T, int) and kernel_T > 0, "kernel_T", "a positive integer", kernel_T)
        H, N2 = d_model, d_state // 2
        self.d_model, self.d_state, self.kernel_T = d_model, d_state, kernel_T

        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (H)
        C = torch.randn(H, N2, dtype=torch.cfloat)  # (H, N/2)
        log_A_real = torch.log(0.5 * torch.ones(H, N2))  # (H, N/2)
        A_imag = math.pi * torch.arange(N2, dtype=torch.float).repeat(H, 1)  # (H, N/2)

        self.C = nn.Parameter(torch.view_as_real(C))  # (H, N/2, 2)
        self.register("log_A_real", log_A_real, lr)
        self.register("A_imag", A_imag, lr)
        self.register("log_dt", log_dt, lr)

        self.A_real_tap = nn.Identity()
        self.A_imag_tap = nn.Identity()
        self.C_tap = nn.Identity()
        self.log_dt_tap = nn.Identity()

    def register(self, name: str, tensor: torch.Tensor, lr: float | None = None) -> None:
        """A parameter with its own optimizer settings (a hint read by the training code)."""
        self.register_parameter(name, nn.Parameter(tensor))
        if lr is not None:
            getattr(self, name)._optim = {"lr": lr, "weight_decay": 0.0}

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH discretisation from the tapped A, C, log Δ: returns (Δ·A, dB, C), complex (H, N/2).

        dA = exp(Δ·A); kept as its logarithm Δ·A because the kernel needs its powers.
        """
        A_real = self.A_real_tap(-torch.exp(self.log_A_real))  # (H, N/2)
        A_imag = self.A_imag_tap(self.A_imag)  # (H, N/2)
        C = self.C_tap(self.C)  # (H, N/2, 2)
        log_dt = self.log_dt_tap(self.log_dt)  # (H)

        A = torch.complex(A_real, A_imag)  # (H, N/2)
        C = torch.complex(C[..., 0], C[..., 1])  # (H, N/2)
        dt = torch.exp(log_dt)  # (H)
        dtA = A * dt.unsqueeze(-1)  # (H, N/2)
        dB = (torch.exp(dtA) - 1.0) / A  # (H, N/2)
        return dtA, dB, C

    def step_matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dA, dB, C) complex (H, N/2) for the recurrence x_t = dA·x + dB·u_t, y = 2·Re(C·x)."""
        dtA, dB, C = self.discretize()
        return torch.exp(dtA), dB, C

    def forward(self, L: int) -> torch.Tensor:
        """The kernel K (H, L)."""
        dtA, dB, C = self.discretize()  # (H, N/2) each
        # The kernel sums N/2 terms of powers up to L: keep its matmul out of reduced-precision autocast.
        with torch.autocast(device_type=dtA.device.type, enabled=False):
            K = vandermonde_kernel(dtA, C * dB, L, self.kernel_T)  # (H, L)
        return K


class S4DLayer(nn.Module):
    """One S4D layer on (B, L, H): SSM convolution + D skip, GELU, dropout, Conv1d/GLU mixing.

    ``forward(x)`` is the convolution mode; ``forward(x_t, state=state)`` (or ``step``) the
    recurrent mode on one position (B, H). Going through ``forward`` in both modes lets
    forward pre-hooks on this module (hardware input transforms) act in both.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        dropout: float = 0.0,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        kernel_T: int = 32,
    ):
        super().__init__()
        _check(0.0 <= dropout < 1.0, "dropout", "in [0, 1)", dropout)
        H = d_model
        self.d_model, self.d_state = d_model, d_state
        self.kernel = S4DKernel(d_model, d_state, dt_min=dt_min, dt_max=dt_max, lr=lr, kernel_T=kernel_T)
        self.D = nn.Parameter(torch.randn(H))
        self.input_tap = nn.Identity()
        self.kernel_tap = nn.Identity()
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.mixing = nn.Sequential(nn.Conv1d(H, 2 * H, kernel_size=1), nn.GLU(dim=-2))
        self._step_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x (B, L, H) -> (B, L, H); or, with ``state``, x (B, H) -> ((B, H), state)."""
        if state is not None:
            return self.step(x, state)
        L = x.shape[-2]
        u = self.input_tap(x.transpose(-1, -2))  # (B, H, L)
        K = self.kernel_tap(self.kernel(L))  # (H, L)
        if not self._mixing_is_plain():
            y = fft_causal_conv(u, K, self.D)  # K * u + D·u                      (B, H, L)
            y = self.dropout(self.activation(y))  # (B, H, L)
            y = self.mixing(y)  # (B, H, L)
            return y.transpose(-1, -2)  # (B, L, H)

        # The same maths in the (B, L, H) layout: Conv1d(H, 2H, 1) is a matrix product on the
        # last dim (a plain GEMM, faster than the convolution in forward and backward), and GLU
        # over channels becomes GLU over the last dim. The weight is read through the Conv1d,
        # so parametrizations on it (quantizers, noise) still apply.
        y = fft_causal_conv(u, K, self.D, time_last=False)  # K * u + D·u        (B, L, H)
        y = self.dropout(self.activation(y))  # (B, L, H)
        conv = self.mixing[0]
        y = F.linear(y, conv.weight.squeeze(-1), conv.bias)  # (B, L, 2H)
        return F.glu(y, dim=-1)  # (B, L, H)

    def _mixing_is_plain(self) -> bool:
        """Whether ``mixing`` is still Conv1d(k=1) + GLU with no hooks: hardware input/output
        transforms (DAC/ADC) are hooks on the Conv1d, and then it must be called as a module."""
        conv, glu = self.mixing[0], self.mixing[1]
        return (
            len(self.mixing) == 2
            and isinstance(conv, nn.Conv1d)
            and conv.kernel_size == (1,)
            and conv.stride == (1,)
            and conv.padding in ((0,), "valid")
            and conv.dilation == (1,)
            and conv.groups == 1
            and isinstance(glu, nn.GLU)
            and glu.dim in (-2, 1)
            and not any(_has_hooks(m) for m in (self.mixing, conv, glu))
        )

    def default_state(self, batch_size: int) -> torch.Tensor:
        """Zero recurrent state (B, H, N/2), complex of the parameters' precision."""
        p = next(self.kernel.parameters())  # a stored tensor: evaluates no parametrization
        return torch.zeros(
            batch_size, self.d_model, self.d_state // 2, dtype=p.dtype.to_complex(), device=p.device
        )

    def setup_step(self) -> None:
        """Cache the discretised (dA, dB, C) for ``step`` (detached: for inference).

        Call again after the parameters or the taps change; ``clear_step`` drops the cache.
        """
        with torch.no_grad():
            self._step_cache = tuple(t.detach() for t in self.kernel.step_matrices())

    def clear_step(self) -> None:
        self._step_cache = None

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: u_t (B, H), state (B, H, N/2) -> (y_t (B, H), new state).

        Uses the same tapped A, C, log Δ as the kernel; ``kernel_tap`` has no counterpart here
        (the kernel is never formed), so a transform on K alone is not seen by the recurrence.
        """
        u = self.input_tap(u_t)  # (B, H)
        if self._step_cache is not None:
            dA, dB, C = self._step_cache  # (H, N/2) each
        else:
            dA, dB, C = self.kernel.step_matrices()  # (H, N/2) each
        state = dA * state + dB * u.unsqueeze(-1)  # (B, H, N/2)
        y = 2 * (C * state).real.sum(-1).to(u.dtype)  # (B, H)
        y = y + u * self.D  # (B, H)

        y = self.dropout(self.activation(y))  # (B, H)
        y = self.mixing(y.unsqueeze(-1)).squeeze(-1)  # (B, H)
        return y, state


class S4DBlock(nn.Module):
    """LayerNorm + S4DLayer + dropout + residual.

    prenorm: x + dropout(layer(norm(x)));  postnorm: norm(x + dropout(layer(x))).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        dropout: float = 0.0,
        prenorm: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        kernel_T: int = 32,
    ):
        super().__init__()
        self.prenorm = prenorm
        self.norm = nn.LayerNorm(d_model)
        self.layer = S4DLayer(
            d_model, d_state, dropout=dropout, dt_min=dt_min, dt_max=dt_max, lr=lr, kernel_T=kernel_T
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, H) -> (B, L, H)."""
        if self.prenorm:
            return x + self.dropout(self.layer(self.norm(x)))
        return self.norm(x + self.dropout(self.layer(x)))

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B, H), state (B, H, N/2) -> (B, H), new state."""
        if self.prenorm:
            z, state = self.layer(self.norm(x_t), state=state)
            return x_t + self.dropout(z), state
        z, state = self.layer(x_t, state=state)
        return self.norm(x_t + self.dropout(z)), state


class S4DModel(nn.Module):
    """Encoder -> n_layer S4D blocks -> (final norm) -> decoder; per-position or pooled output.

    Token input (``vocab_size``): x (B, L) long, encoder nn.Embedding. Float input (``d_input``):
    x (B, L, d_input), encoder nn.Linear. ``task="lm"``: (B, L, n_out) with
    n_out = n_classes or vocab_size; ``task="classification"``: pooled over time (``pool`` "mean"
    or "last"), (B, n_classes). ``lr_ssm`` is the optimizer hint on log_A_real, A_imag, log_dt.
    """

    hardware_parts: dict[str, dict] = {
        "encoder": {"kind": "param", "category": "weight", "targets": ["encoder.weight"]},
        "decoder": {"kind": "param", "category": "weight", "targets": ["decoder.weight"]},
        "mixing": {"kind": "param", "category": "weight", "targets": ["layers.*.layer.mixing.0.weight"]},
        "A_real": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.A_real_tap"]},
        "A_imag": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.A_imag_tap"]},
        "C": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.C_tap"]},
        "log_dt": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.log_dt_tap"]},
        "kernel": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel_tap"]},
        # QS4D quantizes the SSM input with half the levels of the other SSM parts.
        "ssm_input": {
            "kind": "tap",
            "category": "ssm",
            "targets": ["layers.*.layer.input_tap"],
            "levels_factor": 0.5,
        },
        "activations": {"kind": "input", "category": "act", "targets": ["layers.*.layer", "decoder"]},
    }

    def __init__(
        self,
        d_model: int = 128,
        n_layer: int = 4,
        d_state: int = 64,
        dropout: float = 0.0,
        prenorm: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr_ssm: float | None = 1e-3,
        kernel_T: int = 32,
        task: str = "lm",
        vocab_size: int | None = None,
        d_input: int | None = None,
        n_classes: int | None = None,
        pool: str = "mean",
    ):
        super().__init__()
        _check(isinstance(d_model, int) and d_model > 0, "d_model", "a positive integer", d_model)
        _check(isinstance(n_layer, int) and n_layer > 0, "n_layer", "a positive integer", n_layer)
        _check(
            isinstance(d_state, int) and d_state > 0 and d_state % 2 == 0,
            "d_state",
            "a positive even integer (N/2 complex states, conjugate pairs)",
            d_state,
        )
        _check(task in _TASKS, "task", f"one of {_TASKS}", task)
        _check(pool in _POOLS, "pool", f"one of {_POOLS}", pool)
        _check(
            (vocab_size is None) != (d_input is None),
            "vocab_size / d_input",
            "exactly one given (vocab_size for token input, d_input for float input)",
            (vocab_size, d_input),
        )
        for name, v in (("vocab_size", vocab_size), ("d_input", d_input), ("n_classes", n_classes)):
            _check(v is None or (isinstance(v, int) and v > 0), name, "a positive integer or None", v)
        if task == "classification":
            _check(n_classes is not None, "n_classes", "given for task='classification'", n_classes)
        n_out = n_classes or vocab_size
        _check(n_out is not None, "n_classes", "given when vocab_size is not (float input)", n_classes)

        self.task, self.pool, self.prenorm = task, pool, prenorm
        self.d_model, self.n_out = d_model, n_out
        H = d_model
        self.encoder = nn.Embedding(vocab_size, H) if vocab_size is not None else nn.Linear(d_input, H)
        self.layers = nn.ModuleList(
            S4DBlock(H, d_state, dropout, prenorm, dt_min=dt_min, dt_max=dt_max, lr=lr_ssm, kernel_T=kernel_T)
            for _ in range(n_layer)
        )
        self.norm_f = nn.LayerNorm(H) if prenorm else None
        self.decoder = nn.Linear(H, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) long or (B, L, d_input) -> (B, L, n_out) (lm) or (B, n_classes)."""
        return self.forward_hidden(x)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def forward_hidden(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run the model from block ``start`` up to block ``stop`` (docs/architecture.md).

        ``start = 0``: x is the model input and the encoder runs first; ``start = i > 0``: x is the
        hidden state (B, L, H) entering block i. ``stop = None``: the output head (final norm,
        pooling, decoder) runs last and forward's output is returned; ``stop = j``: the hidden state
        entering block j (B, L, H). So ``forward_hidden(forward_hidden(x, 0, j), j) == forward(x)``.
        """
        h = self.encoder(x) if start == 0 else x  # (B, L, H)
        for block in self.layers[start:stop]:
            h = block(h)  # (B, L, H)
        if stop is not None:
            return h
        if self.norm_f is not None:
            h = self.norm_f(h)  # (B, L, H)
        if self.task == "classification":
            h = h.mean(dim=1) if self.pool == "mean" else h[:, -1]  # (B, H)
        return self.decoder(h)  # (B, L, n_out) or (B, n_classes)

    def layer_of(self, name: str) -> int:
        """Where a parameter or module name sits: -1 the encoder, i block i, n_layer the output
        head (final norm, decoder); -1 too for a name it does not know (it runs first)."""
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1])
        if parts[0] in ("norm_f", "decoder"):
            return self.n_layer
        return -1

    def allocate_state(self, batch_size: int) -> list[torch.Tensor]:
        """One zero complex state (B, H, N/2) per layer."""
        return [block.layer.default_state(batch_size) for block in self.layers]

    def setup_step(self) -> None:
        """Cache every layer's discretised matrices for fast inference stepping."""
        for block in self.layers:
            block.layer.setup_step()

    def clear_step(self) -> None:
        for block in self.layers:
            block.layer.clear_step()

    def step(self, x_t: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x_t (B,) long or (B, d_input) -> (out_t (B, n_out), new state).

        For task "lm" out_t equals forward's logits at that position. For "classification" it is
        the decoder applied to the current position's features (forward's output at the last
        step only when pool="last").
        """
        h = self.encoder(x_t)  # (B, H)
        new_state = []
        for block, s in zip(self.layers, state, strict=True):
            h, s = block.step(h, s)  # (B, H), (B, H, N/2)
            new_state.append(s)
        if self.norm_f is not None:
            h = self.norm_f(h)  # (B, H)
        return self.decoder(h), new_state  # (B, n_out)
