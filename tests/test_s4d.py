"""S4D: kernel against the ZOH formulas, fast kernel against the direct one, convolution against
recurrence, taps, shapes, gradients, optimizer hints and argument checks."""

from __future__ import annotations

import cmath
import math
from fnmatch import fnmatchcase

import pytest
import torch
from torch import nn

from cimssm.models.s4d import (
    S4DBlock,
    S4DKernel,
    S4DLayer,
    S4DModel,
    fft_causal_conv,
    fft_length,
    kernel_reference,
    vandermonde_kernel,
)


class Recorder(nn.Module):
    """Counts its calls and scales its input (so a skipped tap shows in the output)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.calls = 0
        self.scale = scale

    def forward(self, x):
        self.calls += 1
        return x * self.scale


def _direct_kernel(kernel: S4DKernel, L: int) -> list[list[float]]:
    """K[h][l] = 2·Re(Σ_n C_n·(exp(Δ·A_n) − 1)/A_n·exp(Δ·A_n·l)), one scalar at a time."""
    H, N2 = kernel.A_imag.shape
    out = []
    for h in range(H):
        dt = math.exp(kernel.log_dt[h].item())
        row = []
        for pos in range(L):
            acc = 0j
            for n in range(N2):
                A = complex(-math.exp(kernel.log_A_real[h, n].item()), kernel.A_imag[h, n].item())
                C = complex(kernel.C[h, n, 0].item(), kernel.C[h, n, 1].item())
                acc += C * (cmath.exp(dt * A) - 1) / A * cmath.exp(dt * A * pos)
            row.append(2 * acc.real)
        out.append(row)
    return out


def test_kernel_matches_zoh_formula():
    torch.manual_seed(0)
    k = S4DKernel(2, 6, dt_min=1e-2, dt_max=0.5, kernel_T=2).double()
    with torch.no_grad():
        k.log_A_real.add_(0.3 * torch.randn_like(k.log_A_real))  # not only the init values
    L = 9
    expected = torch.tensor(_direct_kernel(k, L), dtype=torch.float64)
    torch.testing.assert_close(k(L), expected, atol=1e-10, rtol=1e-10)


def test_s4d_lin_init():
    k = S4DKernel(4, 8, lr=1e-3)
    A_real = -torch.exp(k.log_A_real)
    torch.testing.assert_close(A_real, torch.full((4, 4), -0.5))
    torch.testing.assert_close(k.A_imag, math.pi * torch.arange(4.0).expand(4, 4))
    assert k.C.shape == (4, 4, 2)
    assert k.log_dt.shape == (4,)
    assert (k.log_dt >= math.log(1e-3)).all() and (k.log_dt <= math.log(1e-1)).all()


@pytest.mark.parametrize("L", [1, 7, 33, 100, 1024])
def test_fast_kernel_matches_reference(L):
    torch.manual_seed(1)
    k = S4DKernel(8, 16, kernel_T=32)
    params = [k.log_A_real, k.A_imag, k.C, k.log_dt]
    weight = torch.randn(8, L)

    K_fast = k(L)
    grads_fast = torch.autograd.grad((K_fast * weight).sum(), params)
    dtA, dB, C = k.discretize()
    K_ref = kernel_reference(dtA, C * dB, L)
    grads_ref = torch.autograd.grad((K_ref * weight).sum(), params)

    assert K_fast.shape == (8, L)
    assert (K_fast - K_ref).abs().max() <= 1e-5 * K_ref.abs().max()
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)


def test_vandermonde_block_sizes_agree():
    torch.manual_seed(2)
    dtA = torch.complex(-torch.rand(3, 5, dtype=torch.float64), 3 * torch.randn(3, 5, dtype=torch.float64))
    CB = torch.randn(3, 5, dtype=torch.complex128)
    ref = kernel_reference(dtA, CB, 50)
    for block in (1, 4, 7, 50, 64):
        torch.testing.assert_close(vandermonde_kernel(dtA, CB, 50, block), ref)


def test_fft_length():
    for n in (1, 2, 14, 200, 2000, 2048, 2049, 3000):
        m = fft_length(n)
        assert m >= n
        odd = m
        while odd % 2 == 0:
            odd //= 2
        assert odd in (1, 3, 5, 9, 15)
    assert fft_length(2048) == 2048


def _step_through(model_or_layer, xs, state, step):
    outs = []
    for t in range(xs.shape[1]):
        out, state = step(xs[:, t], state)
        outs.append(out)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("L", [1, 13])
def test_lm_convolution_equals_recurrence(prenorm, L):
    torch.manual_seed(3)
    model = S4DModel(d_model=8, n_layer=2, d_state=6, prenorm=prenorm, vocab_size=11).double().eval()
    x = torch.randint(0, 11, (2, L))
    with torch.no_grad():
        y_conv = model(x)
        y_step = _step_through(model, x, model.allocate_state(2), model.step)
        model.setup_step()
        y_cached = _step_through(model, x, model.allocate_state(2), model.step)
        model.clear_step()
    assert y_conv.shape == (2, L, 11)
    torch.testing.assert_close(y_step, y_conv, atol=1e-4, rtol=0)
    torch.testing.assert_close(y_cached, y_conv, atol=1e-4, rtol=0)


def test_float_input_model_and_layer_convolution_equal_recurrence_fp32():
    torch.manual_seed(4)
    model = S4DModel(d_model=8, n_layer=2, d_state=4, prenorm=False, d_input=3, n_classes=5).eval()
    x = torch.randn(2, 17, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            _step_through(model, x, model.allocate_state(2), model.step), model(x), atol=1e-4, rtol=0
        )

    layer = S4DLayer(6, 8, dt_min=1e-2, dt_max=0.3).eval()
    u = torch.randn(3, 21, 6)
    with torch.no_grad():
        y_step = _step_through(layer, u, layer.default_state(3), layer.step)
        torch.testing.assert_close(y_step, layer(u), atol=1e-4, rtol=0)


def test_block_step_pre_and_post_norm():
    torch.manual_seed(5)
    for prenorm in (True, False):
        block = S4DBlock(6, 4, prenorm=prenorm).double().eval()
        x = torch.randn(2, 9, 6, dtype=torch.float64)
        with torch.no_grad():
            y_step = _step_through(block, x, block.layer.default_state(2), block.step)
            torch.testing.assert_close(y_step, block(x), atol=1e-8, rtol=0)


KERNEL_TAPS = ("A_real_tap", "A_imag_tap", "C_tap", "log_dt_tap")


@pytest.mark.parametrize("tap", [*(f"kernel.{t}" for t in KERNEL_TAPS), "kernel_tap", "input_tap"])
def test_taps_are_called(tap):
    torch.manual_seed(6)
    model = S4DModel(d_model=4, n_layer=2, d_state=4, vocab_size=7).eval()
    x = torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        clean = model(x)
        recorders = []
        for i in range(2):
            r = Recorder(scale=0.5)
            model.set_submodule(f"layers.{i}.layer.{tap}", r)
            recorders.append(r)
        scaled = model(x)
        assert all(r.calls == 1 for r in recorders)
        assert not torch.allclose(clean, scaled)
        if tap != "kernel_tap":  # the recurrence never forms K
            state = model.allocate_state(2)
            out_scaled, _ = model.step(x[:, 0], state)
            assert all(r.calls == 2 for r in recorders)
            for i in range(2):
                model.set_submodule(f"layers.{i}.layer.{tap}", nn.Identity())
            out_clean, _ = model.step(x[:, 0], model.allocate_state(2))
            assert not torch.allclose(out_clean, out_scaled)


def test_step_input_hook_applies_to_layer():
    # Hardware input transforms are forward pre-hooks on layers.*.layer; step goes through forward.
    layer = S4DLayer(4, 4).eval()
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        layer(torch.randn(2, 3, 4))
        layer(torch.randn(2, 4), state=layer.default_state(2))
    assert seen == [(2, 3, 4), (2, 4)]


def test_shapes_classification_and_lm():
    torch.manual_seed(7)
    lm = S4DModel(d_model=8, n_layer=1, d_state=4, vocab_size=10)
    assert lm(torch.randint(0, 10, (3, 12))).shape == (3, 12, 10)
    for pool in ("mean", "last"):
        clf = S4DModel(
            d_model=8, n_layer=2, d_state=4, task="classification", d_input=2, n_classes=4, pool=pool
        )
        assert clf(torch.randn(3, 12, 2)).shape == (3, 4)
    tok_clf = S4DModel(d_model=8, n_layer=1, d_state=4, task="classification", vocab_size=10, n_classes=3)
    assert tok_clf(torch.randint(0, 10, (2, 5))).shape == (2, 3)


def test_classification_last_pool_matches_last_step():
    torch.manual_seed(8)
    model = (
        S4DModel(d_model=6, n_layer=2, d_state=4, task="classification", d_input=2, n_classes=3, pool="last")
        .double()
        .eval()
    )
    x = torch.randn(2, 7, 2, dtype=torch.float64)
    with torch.no_grad():
        steps = _step_through(model, x, model.allocate_state(2), model.step)
        torch.testing.assert_close(steps[:, -1], model(x))


@pytest.mark.parametrize("prenorm", [True, False])
def test_gradients_reach_every_parameter(prenorm):
    torch.manual_seed(9)
    model = S4DModel(d_model=6, n_layer=2, d_state=4, prenorm=prenorm, vocab_size=9)
    model(torch.randint(0, 9, (2, 8))).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_optimizer_hints():
    model = S4DModel(d_model=4, n_layer=2, d_state=4, vocab_size=5, lr_ssm=2e-3)
    hinted = {n for n, p in model.named_parameters() if hasattr(p, "_optim")}
    assert hinted == {
        f"layers.{i}.layer.kernel.{p}" for i in range(2) for p in ("log_A_real", "A_imag", "log_dt")
    }
    for n, p in model.named_parameters():
        if n in hinted:
            assert p._optim == {"lr": 2e-3, "weight_decay": 0.0}
    plain = S4DModel(d_model=4, n_layer=1, d_state=4, vocab_size=5, lr_ssm=None)
    assert not any(hasattr(p, "_optim") for p in plain.parameters())


def test_module_names_and_hardware_parts():
    model = S4DModel(d_model=4, n_layer=2, d_state=4, vocab_size=5)
    params = dict(model.named_parameters())
    assert params["layers.1.layer.kernel.C"].shape == (4, 2, 2)
    assert params["layers.0.layer.D"].shape == (4,)
    assert isinstance(model.norm_f, nn.LayerNorm)
    assert S4DModel(d_model=4, n_layer=1, d_state=4, vocab_size=5, prenorm=False).norm_f is None
    modules = dict(model.named_modules())
    assert isinstance(modules["layers.0.norm"], nn.LayerNorm)
    assert isinstance(modules["layers.0.layer.mixing"][0], nn.Conv1d)
    assert isinstance(modules["layers.0.layer.mixing"][1], nn.GLU)

    assert set(model.hardware_parts) == {
        "encoder",
        "decoder",
        "mixing",
        "A_real",
        "A_imag",
        "C",
        "log_dt",
        "kernel",
        "ssm_input",
        "activations",
    }
    for part, spec in model.hardware_parts.items():
        names = params if spec["kind"] == "param" else modules
        for glob in spec["targets"]:
            matched = [n for n in names if fnmatchcase(n, glob)]
            assert matched, (part, glob)
            if spec["kind"] == "tap":
                assert all(isinstance(modules[n], nn.Identity) for n in matched), part
    assert model.hardware_parts["ssm_input"]["levels_factor"] == 0.5
    act = [
        n for n in modules if any(fnmatchcase(n, g) for g in model.hardware_parts["activations"]["targets"])
    ]
    assert act == ["layers.0.layer", "layers.1.layer", "decoder"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"d_model": 0, "vocab_size": 5}, "d_model"),
        ({"d_state": 5, "vocab_size": 5}, "d_state"),
        ({"d_state": 0, "vocab_size": 5}, "d_state"),
        ({"n_layer": 0, "vocab_size": 5}, "n_layer"),
        ({}, "vocab_size"),
        ({"vocab_size": 5, "d_input": 3}, "d_input"),
        ({"vocab_size": 5, "task": "regression"}, "task"),
        ({"vocab_size": 5, "pool": "max"}, "pool"),
        ({"vocab_size": 5, "task": "classification"}, "n_classes"),
        ({"d_input": 3}, "n_classes"),
        ({"vocab_size": 5, "dropout": 1.5}, "dropout"),
        ({"vocab_size": 5, "dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        S4DModel(**{"d_model": 4, "n_layer": 1, "d_state": 4, **kwargs})


@pytest.mark.parametrize("L", [1, 6, 11])
def test_fft_causal_conv_value_and_gradients(L):
    torch.manual_seed(10)
    u = torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True)
    K = torch.randn(3, L, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, L, dtype=torch.float64)
    direct = torch.stack([sum(K[:, j] * u[..., pos - j] for j in range(pos + 1)) for pos in range(L)], dim=-1)
    y = fft_causal_conv(u, K)
    torch.testing.assert_close(y, direct)
    grads = torch.autograd.grad(y, (u, K), g)
    grads_direct = torch.autograd.grad(direct, (u, K), g)
    for a, b in zip(grads, grads_direct):
        torch.testing.assert_close(a, b)
