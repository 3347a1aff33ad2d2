"""Selective scan of Mamba-1 (Gu & Dao 2023, Algorithm 2), in plain PyTorch.

For each batch element, channel ``e`` and state index ``n``:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t        h_0 = 0,  h_t: (E, N)
    y_t = C_t · h_t + D ⊙ x_t                         y_t: (E,)

with shapes ``x, Δ: (B, L, E)``, ``A: (E, N)``, ``B, C: (B, L, N)``, ``D: (E,)``.

Three implementations:

- :func:`selective_scan_ref`: the recurrence as written, one autograd op per line and step.
  The reference the others are tested against.
- :func:`selective_scan`: the training path. A ``torch.autograd.Function`` whose forward runs
  the recurrence sequentially, vectorised over batch, channels and state, and whose backward
  runs the adjoint recurrence in reverse time. It keeps the state only at chunk boundaries
  (``chunk_size`` steps apart) and recomputes the states inside a chunk during the backward,
  so memory is ``O(B L E N / chunk_size)`` on top of the ``(B, L, E)`` inputs; the
  ``(chunk, B, E, N)`` work tensors live in a per-thread workspace reused across calls.
- :func:`selective_scan_with_state_fn`: the reference loop with a function applied to the
  state ``h_t`` after every update (hardware taps on the scan state). Slow, plain autograd.

:func:`selective_state_step` advances the recurrence by one step for generation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_SIZE = 16
_LOG2_E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Reference loops (plain autograd)
# ----------------------------------------------------------------------------------------------


def _scan_loop(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state_fn: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    batch, length, d_inner = x.shape
    h = x.new_zeros(batch, d_inner, A.shape[1])  # (B, E, N)
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, t, :, None] * A)  # (B, E, N)
        dBx = (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]  # (B, E, N)
        h = dA * h + dBx  # (B, E, N)
        if state_fn is not None:
            h = state_fn(h)
        ys.append((h * C[:, t, None, :]).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)  # (B, L, E)
    if D is not None:
        y = y + D * x
    return y


def selective_scan_ref(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> Tensor:
    """Reference selective scan: ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``, ``y_t = C_t h_t + D x_t``.

    A sequential loop of ordinary autograd ops; ``x, delta (B, L, E)``, ``A (E, N)``,
    ``B, C (B, L, N)``, ``D (E,)`` or None. Returns ``y (B, L, E)``.
    """
    return _scan_loop(x, delta, A, B, C, D, None)


def selective_scan_with_state_fn(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state_fn: Callable[[Tensor], Tensor],
) -> Tensor:
    """Selective scan with ``h_t <- state_fn(h_t)`` applied after every update.

    ``h_t = state_fn(exp(Δ_t A) h_{t-1} + Δ_t B_t x_t)``, ``y_t = C_t h_t + D x_t``; the
    transformed state is the one carried to the next step and read out by ``C_t``. This is how
    a non-identity ``state_tap`` (quantization or noise of the analog state) enters the scan.
    Plain autograd loop: slow, meant for evaluation and small runs.
    """
    return _scan_loop(x, delta, A, B, C, D, state_fn)


# ----------------------------------------------------------------------------------------------
# Fast scan: chunked forward, hand-written reverse-time backward
# ----------------------------------------------------------------------------------------------


class _Workspace(threading.local):
    """Scratch tensors reused across calls (per thread, so concurrent autograd threads never share).

    A fresh (chunk, B, E, N) tensor per call costs page faults that take as long as the maths.
    Nothing returned by the scan is a view of these tensors.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}


_WORKSPACE = _Workspace()


def _scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    key = (name, like.dtype, like.device)
    numel = math.prod(shape)
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        _WORKSPACE.buffers[key] = buf
    return buf[:numel].view(shape)


def clear_scan_workspace() -> None:
    """Free the scratch tensors of the calling thread (they are re-created on the next call)."""
    _WORKSPACE.buffers.clear()


def _chunk_states(
    dA: Tensor, hs: Tensor, delta_c: Tensor, u_c: Tensor, B_c: Tensor, A2_t: Tensor, h_prev: Tensor
) -> None:
    """Fill ``dA[i] = exp(Δ_i A)`` and ``hs[i + 1] = h_i`` for one chunk of ``n`` steps; ``hs[0] = h_prev``.

    State-major layout (N before E) so that every contraction below is a row-vector times
    matrix product over a contiguous E axis. dA: (n, B, N, E), hs: (n + 1, B, N, E),
    delta_c, u_c = Δ x: (n, B, E), B_c: (n, B, N), A2_t = A^T log2(e): (N, E).
    """
    torch.mul(delta_c.unsqueeze(-2), A2_t, out=dA)  # Δ_t A log2(e)              (n, B, N, E)
    torch.exp2(dA, out=dA)  # exp(Δ_t A); exp2 is faster than exp on CPU          (n, B, N, E)
    hs[0].copy_(h_prev)  # h_{t0 - 1}                                            (B, N, E)
    torch.mul(B_c.unsqueeze(-1), u_c.unsqueeze(-2), out=hs[1:])  # Δ_t B_t x_t  (n, B, N, E)
    h_views = hs.unbind(0)
    a_views = dA.unbind(0)
    for i in range(dA.shape[0]):
        h_views[i + 1].addcmul_(a_views[i], h_views[i])  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t


class SelectiveScanFn(torch.autograd.Function):
    """Selective scan with a hand-written backward (see the module docstring for the equations).

    Adjoint recurrence, with ``g_t = ∂loss/∂h_t`` and ``a_t = exp(Δ_t A)``:

        g_t = C_t ⊗ ∂y_t + a_{t+1} ⊙ g_{t+1}
        ∂C_t = Σ_e ∂y_t h_t           ∂(Δx)_t = Σ_n g_t B_t        ∂B_t = Σ_e g_t (Δx)_t
        s_t = g_t ⊙ h_{t-1} ⊙ a_t    (∂loss/∂(Δ_t A))
        ∂Δ_t = Σ_n s_t A + x_t ∂(Δx)_t    ∂A = Σ_{b,t} s_t Δ_t    ∂x_t = Δ_t ∂(Δx)_t + D ∂y_t

    Internally the state is kept as (B, N, E) and time-major, (L, B, ·), so that one step is one
    contiguous slab.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, chunk_size):  # noqa: D102
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        T = max(1, min(int(chunk_size), length))
        n_chunks = -(-length // T)
        delta_t = delta.transpose(0, 1)  # (L, B, E) view
        u_t = torch.mul(
            delta.transpose(0, 1), x.transpose(0, 1), out=x.new_empty(length, batch, d_inner)
        )  # Δ x (L, B, E)
        B_t = B.transpose(0, 1).contiguous()  # (L, B, N)
        C_t = C.transpose(0, 1).contiguous()  # (L, B, N)
        A2_t = (A * _LOG2_E).t().contiguous()  # A log2(e)                 (N, E)

        dA = _scratch("dA", (T, batch, d_state, d_inner), x)
        hs = _scratch("hs", (T + 1, batch, d_state, d_inner), x)
        checkpoints = x.new_empty(n_chunks, batch, d_state, d_inner)  # h before each chunk
        checkpoints[0].zero_()  # h_0 = 0
        y_t = x.new_empty(length, batch, d_inner)  # (L, B, E)
        for c in range(n_chunks):
            t0, t1 = c * T, min(length, (c + 1) * T)
            n = t1 - t0
            nb = n * batch
            _chunk_states(dA[:n], hs[: n + 1], delta_t[t0:t1], u_t[t0:t1], B_t[t0:t1], A2_t, checkpoints[c])
            # y_t = C_t · h_t                                                   (n B, 1, E)
            torch.bmm(
                C_t[t0:t1].view(nb, 1, d_state),
                hs[1 : n + 1].view(nb, d_state, d_inner),
                out=y_t[t0:t1].view(nb, 1, d_inner),
            )
            if c + 1 < n_chunks:
                checkpoints[c + 1].copy_(hs[n])
        y = y_t.transpose(0, 1)  # (B, L, E)
        y = torch.addcmul(y, x, D) if D is not None else y.contiguous()  # + D x

        ctx.chunk = T
        ctx.has_D = D is not None
        ctx.save_for_backward(x, delta, A, B_t, C_t, u_t, D if D is not None else x.new_empty(0), checkpoints)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # noqa: D102
        x, delta, A, B_t, C_t, u_t, D, checkpoints = ctx.saved_tensors
        # Contiguous in eager mode already; torch.compile may hand them back in another layout,
        # and the per-chunk ``view``s below need the (L, B, ·) one.
        B_t, C_t, u_t, checkpoints = (t.contiguous() for t in (B_t, C_t, u_t, checkpoints))
        T = ctx.chunk
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        n_chunks = checkpoints.shape[0]
        delta_t = delta.transpose(0, 1)  # (L, B, E) view
        gy_t = grad_y.transpose(0, 1).contiguous()  # (L, B, E)
        A_t = A.t().contiguous()  # (N, E)
        A2_t = A_t * _LOG2_E  # (N, E)

        dA = _scratch("dA", (T, batch, d_state, d_inner), x)
        hs = _scratch("hs", (T + 1, batch, d_state, d_inner), x)
        G = _scratch("G", (T, batch, d_state, d_inner), x)
        carry = x.new_zeros(batch, d_state, d_inner)  # a_{t1} g_{t1} from the next chunk
        g_u = x.new_empty(length, batch, d_inner)  # ∂(Δx)       (L, B, E)
        g_delta_s = x.new_empty(length, batch, d_inner)  # Σ_n s A   (L, B, E)
        g_B = x.new_empty(length, batch, d_state)  # (L, B, N)
        g_C = x.new_empty(length, batch, d_state)  # (L, B, N)
        g_A_t = torch.zeros_like(A_t)  # (N, E)

        for c in range(n_chunks - 1, -1, -1):
            t0, t1 = c * T, min(length, (c + 1) * T)
            n = t1 - t0
            nb = n * batch
            dA_c, hs_c, G_c = dA[:n], hs[: n + 1], G[:n]
            _chunk_states(dA_c, hs_c, delta_t[t0:t1], u_t[t0:t1], B_t[t0:t1], A2_t, checkpoints[c])

            # g_t = C_t ⊗ ∂y_t + a_{t+1} g_{t+1}                                (n, B, N, E)
            torch.mul(C_t[t0:t1].unsqueeze(-1), gy_t[t0:t1].unsqueeze(-2), out=G_c)
            g_views = G_c.unbind(0)
            a_views = dA_c.unbind(0)
            g_views[n - 1].add_(carry)
            for i in range(n - 2, -1, -1):
                g_views[i].addcmul_(a_views[i + 1], g_views[i + 1])
            torch.mul(a_views[0], g_views[0], out=carry)

            G_flat = G_c.view(nb, d_state, d_inner)
            # ∂C_t = Σ_e ∂y_t h_t                                                (n B, 1, N)
            torch.bmm(
                gy_t[t0:t1].view(nb, 1, d_inner),
                hs_c[1:].view(nb, d_state, d_inner).transpose(1, 2),
                out=g_C[t0:t1].view(nb, 1, d_state),
            )
            # ∂(Δx)_t = Σ_n B_t g_t                                              (n B, 1, E)
            torch.bmm(B_t[t0:t1].view(nb, 1, d_state), G_flat, out=g_u[t0:t1].view(nb, 1, d_inner))
            # ∂B_t = Σ_e g_t (Δx)_t                                              (n B, 1, N)
            torch.bmm(
                u_t[t0:t1].view(nb, 1, d_inner), G_flat.transpose(1, 2), out=g_B[t0:t1].view(nb, 1, d_state)
            )
            # s_t = g_t h_{t-1} a_t                                               (n, B, N, E)
            G_c.mul_(hs_c[:n]).mul_(dA_c)
            # Σ_n s_t A                                                           (n, B, E)
            torch.sum(torch.mul(G_c, A_t, out=hs_c[1:]), dim=2, out=g_delta_s[t0:t1])
            # ∂A += Σ_{b,t} s_t Δ_t                                                (N, E)
            G_c.mul_(delta_t[t0:t1].unsqueeze(-2))
            g_A_t += G_flat.sum(0)

        g_u = g_u.transpose(0, 1)  # (B, L, E)
        grad_x = g_u * delta  # Δ ∂(Δx)
        grad_delta = torch.addcmul(g_delta_s.transpose(0, 1), g_u, x)  # Σ_n s A + x ∂(Δx)
        grad_D = None
        if ctx.has_D:
            grad_x.addcmul_(grad_y, D)
            grad_D = (grad_y * x).sum((0, 1))
        return grad_x, grad_delta, g_A_t.t(), g_B.transpose(0, 1), g_C.transpose(0, 1), grad_D, None


# torch.compile runs this as it is (a graph break) and compiles around it: tracing the chunk loop
# would unroll L steps into the graph, and inductor re-lays out the saved time-major tensors.
@torch.compiler.disable
def selective_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Fast selective scan ``y = scan(x, Δ, A, B, C) + D x`` (same result as :func:`selective_scan_ref`).

    ``x, delta (B, L, E)``, ``A (E, N)``, ``B, C (B, L, N)``, ``D (E,)`` or None -> ``y (B, L, E)``.
    The state is saved every ``chunk_size`` steps for the backward and recomputed in between.
    """
    if x.dim() != 3 or delta.shape != x.shape:
        raise ValueError(f"x and delta must both be (B, L, E), got {tuple(x.shape)} and {tuple(delta.shape)}")
    batch, length, d_inner = x.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be (E={d_inner}, N), got {tuple(A.shape)}")
    expected_bc = (batch, length, A.shape[1])
    if tuple(B.shape) != expected_bc or tuple(C.shape) != expected_bc:
        raise ValueError(f"B and C must be {expected_bc}, got {tuple(B.shape)} and {tuple(C.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # The recurrence runs in float32 (float64 when given), whatever autocast made the inputs.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, delta, A, B, C = (t.to(dtype).contiguous() for t in (x, delta, A, B, C))
    if D is not None:
        D = D.to(dtype)
    if length == 0:
        return x + 0 * delta
    return SelectiveScanFn.apply(x, delta, A, B, C, D, chunk_size)


# ----------------------------------------------------------------------------------------------
# One step (generation)
# ----------------------------------------------------------------------------------------------


def selective_state_step(
    state: Tensor,
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Advance the recurrence one step, updating ``state`` in place; returns ``y_t``.

    ``h <- exp(Δ A) h + Δ B x`` (then ``h <- state_fn(h)``), ``y = C · h + D x``, with
    ``state (B, E, N)``, ``x, delta (B, E)``, ``A (E, N)``, ``B, C (B, N)``, ``D (E,)``.
    """
    state.mul_(torch.exp(delta.unsqueeze(-1) * A))  # exp(Δ A) h              (B, E, N)
    state.addcmul_((delta * x).unsqueeze(-1), B.unsqueeze(-2))  # + Δ B x       (B, E, N)
    if state_fn is not None:
        new_state = state_fn(state)
        if new_state is not state:
            state.copy_(new_state)
    y = torch.bmm(state, C.unsqueeze(-1)).squeeze(-1)  # C · h                  (B, E)
    if D is not None:
        y = y.addcmul_(D, x)
    return y
