"""The fast selective scan against the reference loop: outputs and every gradient."""

import pytest
import torch

from cimssm.models.scan import (
    selective_scan,
    selective_scan_ref,
    selective_scan_with_state_fn,
    selective_state_step,
)


def _inputs(batch, length, d_inner, d_state, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, d_inner, generator=g, dtype=dtype)
    delta = torch.rand(batch, length, d_inner, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(d_inner, d_state, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, length, d_state, generator=g, dtype=dtype) * 0.5
    C = torch.randn(batch, length, d_state, generator=g, dtype=dtype) * 0.5
    D = torch.randn(d_inner, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, delta, A, B, C, D)]


@pytest.mark.parametrize(("length", "chunk"), [(1, 4), (5, 2), (64, 16), (300, 64)])
def test_fast_scan_matches_reference(length, chunk):
    inputs = _inputs(2, length, 6, 4)
    y = selective_scan(*inputs, chunk_size=chunk)
    y_ref = selective_scan_ref(*inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad_y)
    names = ["x", "delta", "A", "B", "C", "D"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        # dA sums over B * L terms; compare relative to its size.
        atol = 1e-5 * max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g, g_ref, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


def test_fast_scan_without_D_and_noncontiguous_inputs():
    x, delta, A, B, C, _ = _inputs(2, 9, 5, 3)
    BC = torch.cat([B, C], dim=-1).detach().requires_grad_()
    B2, C2 = BC.split(3, dim=-1)  # strided views, as x_proj's split gives
    y = selective_scan(x, delta, A, B2, C2, None, chunk_size=4)
    y_ref = selective_scan_ref(x, delta, A, B2, C2, None)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(y.square().sum(), [x, BC])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, BC])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    inputs = _inputs(2, 7, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_size=3), inputs)


def test_state_fn_identity_equals_reference():
    inputs = _inputs(2, 20, 4, 3)
    y = selective_scan_with_state_fn(*inputs, state_fn=lambda h: h)
    torch.testing.assert_close(y, selective_scan_ref(*inputs))


def test_state_fn_is_applied_every_step():
    inputs = _inputs(1, 6, 2, 2)
    calls = []

    def halve(h):
        calls.append(h.shape)
        return 0.5 * h

    y = selective_scan_with_state_fn(*inputs, state_fn=halve)
    assert len(calls) == 6 and calls[0] == (1, 2, 2)
    assert not torch.allclose(y, selective_scan_ref(*inputs))


def test_step_matches_scan():
    x, delta, A, B, C, D = (t.detach() for t in _inputs(2, 10, 4, 3))
    state = torch.zeros(2, 4, 3)
    ys = [selective_state_step(state, x[:, t], delta[:, t], A, B[:, t], C[:, t], D) for t in range(10)]
    torch.testing.assert_close(torch.stack(ys, 1), selective_scan_ref(x, delta, A, B, C, D))


def test_bad_shapes_raise():
    x, delta, A, B, C, D = _inputs(1, 4, 3, 2)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x, delta, A[:2], B, C, D)
    with pytest.raises(ValueError, match="B and C"):
        selective_scan(x, delta, A, B[:, :3], C, D)
