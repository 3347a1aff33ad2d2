"""Every fast path against its plain reference: forward values and gradients (atol 1e-4 in fp32,
looser in bf16), odd sequence lengths and length 1.

Fast paths: the chunked FFT convolution with the skip term folded into the kernel, the S4D
mixing as a matrix product on (B, L, H), the Vandermonde kernel, the selective scan, the
Monte-Carlo evaluation with clean-prefix reuse and cached weight perturbations, bf16 evaluation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cimssm.evaluation import ModelEvaluator, evaluate_model
from cimssm.hardware.analog import apply_noise
from cimssm.hardware.montecarlo import clean_prefix_stop, monte_carlo_eval
from cimssm.models import s4d as s4d_module
from cimssm.models.mamba import MambaModel
from cimssm.models.s4d import S4DLayer, S4DModel, fft_causal_conv, kernel_reference, vandermonde_kernel
from cimssm.models.scan import selective_scan, selective_scan_ref

LENGTHS = [1, 7, 37]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, g))


def _assert_grads_close(got, want, names, atol):
    for name, a, b in zip(names, got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


# ------------------------------------------------------------------------------------ S4D
def _direct_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    L = u.shape[-1]
    return torch.stack([sum(K[:, j] * u[..., pos - j] for j in range(pos + 1)) for pos in range(L)], dim=-1)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("time_last", [True, False])
def test_fft_conv_with_skip_matches_direct(L, time_last, monkeypatch):
    # Several batch chunks: the chunk size is made tiny.
    monkeypatch.setattr(s4d_module, "FFT_CHUNK_NUMEL", 16)
    torch.manual_seed(0)
    x = torch.randn(5, L, 3, dtype=torch.float64, requires_grad=True)  # (B, L, H): u is its transpose
    K = torch.randn(3, L, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    u = x.transpose(1, 2)  # (B, H, L), not contiguous
    direct = _direct_causal_conv(u, K) + u * D.unsqueeze(-1)
    y = fft_causal_conv(u, K, D, time_last=time_last)
    y = y if time_last else y.transpose(1, 2)
    torch.testing.assert_close(y, direct)
    g = torch.randn_like(direct)
    _assert_grads_close(_grads(y, [x, K, D], g), _grads(direct, [x, K, D], g), "xKD", 1e-10)


def test_fft_conv_gradient_of_kernel_only():
    K = torch.randn(2, 9, requires_grad=True)
    u = torch.randn(4, 2, 9)
    y = fft_causal_conv(u, K)
    (gK,) = torch.autograd.grad(y.square().sum(), [K])
    (gK_ref,) = torch.autograd.grad(_direct_causal_conv(u, K).square().sum(), [K])
    torch.testing.assert_close(gK, gK_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("L", [1, 5, 33, 100])
def test_vandermonde_kernel_gradients_match_reference(L):
    torch.manual_seed(1)
    H, N2 = 4, 6
    dtA = torch.complex(-torch.rand(H, N2) * 0.5, torch.randn(H, N2)).requires_grad_()
    CB = torch.randn(H, N2, dtype=torch.cfloat, requires_grad=True)
    K = vandermonde_kernel(dtA, CB, L, block=8)
    K_ref = kernel_reference(dtA, CB, L)
    torch.testing.assert_close(K, K_ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(K_ref)
    _assert_grads_close(_grads(K, [dtA, CB], g), _grads(K_ref, [dtA, CB], g), ["dtA", "CB"], 1e-4)


class PlainS4D(nn.Module):
    """The layer written plainly (direct kernel, autograd through the FFTs, Conv1d + GLU on (B, H, L))."""

    def __init__(self, layer: S4DLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layer
        L = x.shape[1]
        u = x.transpose(1, 2)  # (B, H, L)
        dtA, dB, C = lay.kernel.discretize()
        K = kernel_reference(dtA, C * dB, L)  # (H, L)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]
        y = F.gelu(y + u * lay.D.unsqueeze(-1))
        return lay.mixing(y).transpose(1, 2)  # (B, L, H)


@pytest.mark.parametrize("L", LENGTHS)
def test_s4d_layer_matches_plain_reference(L):
    torch.manual_seed(2)
    layer = S4DLayer(8, 6, dt_min=1e-2, dt_max=0.3)
    x = torch.randn(3, L, 8, requires_grad=True)
    y, y_ref = layer(x), PlainS4D(layer)(x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    params = [x, *layer.parameters()]
    names = ["x", *(n for n, _ in layer.named_parameters())]
    g = torch.randn_like(y)
    _assert_grads_close(_grads(y, params, g), _grads(y_ref, params, g), names, 1e-4)


def test_s4d_mixing_fast_path_equals_module_path_and_keeps_parametrizations():
    from torch.nn.utils import parametrize

    torch.manual_seed(3)
    layer = S4DLayer(6, 4)
    x = torch.randn(2, 11, 6)
    assert layer._mixing_is_plain()
    fast = layer(x)
    # A forward hook (how DAC/ADC transforms attach) sends the layer down the module path.
    calls = []
    handle = layer.mixing[0].register_forward_hook(lambda m, a, out: calls.append(1))
    assert not layer._mixing_is_plain()
    torch.testing.assert_close(layer(x), fast, atol=1e-6, rtol=1e-6)
    assert calls == [1]
    handle.remove()

    class Halve(nn.Module):
        def forward(self, w):
            return 0.5 * w

    parametrize.register_parametrization(layer.mixing[0], "weight", Halve())
    assert layer._mixing_is_plain()  # still the fast path, and it sees the parametrized weight
    expected = PlainS4D(layer)(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), fast)


def test_s4d_bf16_autocast_close_to_fp32():
    torch.manual_seed(4)
    model = S4DModel(d_model=16, n_layer=2, d_state=8, vocab_size=11)
    x = torch.randint(0, 11, (2, 37))
    y32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = model(x)
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------ scan
def _scan_inputs(batch, length, E, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, E, generator=g)
    delta = torch.rand(batch, length, E, generator=g) * 0.5 + 0.01
    A = -torch.rand(E, N, generator=g) * 2 - 0.1
    B = torch.randn(batch, length, N, generator=g) * 0.5
    C = torch.randn(batch, length, N, generator=g) * 0.5
    D = torch.randn(E, generator=g)
    return [t.requires_grad_() for t in (x, delta, A, B, C, D)]


@pytest.mark.parametrize("L", LENGTHS)
def test_selective_scan_matches_reference(L):
    inputs = _scan_inputs(2, L, 5, 3)
    y, y_ref = selective_scan(*inputs, chunk_size=4), selective_scan_ref(*inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    _assert_grads_close(
        _grads(y, inputs, g), _grads(y_ref, inputs, g), ["x", "delta", "A", "B", "C", "D"], 1e-4
    )


def test_selective_scan_bf16_inputs_close_to_fp32():
    inputs = _scan_inputs(2, 19, 4, 3)
    y32 = selective_scan(*inputs)
    y16 = selective_scan(*(t.detach().bfloat16() for t in inputs))
    assert y16.dtype == torch.float32  # the recurrence runs in float32 whatever the inputs
    torch.testing.assert_close(y16, y32.detach(), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------ forward_hidden
def _models():
    torch.manual_seed(5)
    return [
        S4DModel(d_model=8, n_layer=3, d_state=4, vocab_size=13),
        MambaModel(d_model=8, n_layer=3, d_state=4, vocab_size=13),
        S4DModel(d_model=8, n_layer=3, d_state=4, d_input=2, n_classes=4, task="classification"),
        MambaModel(
            d_model=8, n_layer=3, d_state=4, d_input=2, n_classes=4, task="classification", pool="last"
        ),
    ]


@pytest.mark.parametrize("index", range(4))
def test_forward_hidden_splits_forward_exactly(index):
    model = _models()[index].eval()
    x = torch.randint(0, 13, (2, 9)) if getattr(model, "task", "lm") == "lm" else torch.randn(2, 9, 2)
    with torch.no_grad():
        full = model(x)
        assert model.forward_hidden(x, 0, 0).shape == (2, 9, 8)  # the input layer alone
        for stop in range(1, model.n_layer + 1):
            h = model.forward_hidden(x, 0, stop)
            assert h.shape == (2, 9, 8)
            assert torch.equal(model.forward_hidden(h, stop), full)
            assert torch.equal(
                model.forward_hidden(model.forward_hidden(h, stop, model.n_layer), model.n_layer), full
            )


def test_layer_of_names():
    s4d, mamba = _models()[:2]
    assert s4d.layer_of("encoder.weight") == -1
    assert s4d.layer_of("layers.2.layer.mixing.0.weight") == 2
    assert s4d.layer_of("layers.1.layer.kernel.A_real_tap") == 1
    assert s4d.layer_of("decoder.weight") == s4d.layer_of("norm_f.weight") == 3
    assert mamba.layer_of("backbone.embeddings.weight") == -1
    assert mamba.layer_of("backbone.layers.0.mixer.parametrizations.weight.original") == 0
    assert mamba.layer_of("backbone.layers.2.mixer.A_tap") == 2
    assert mamba.layer_of("lm_head.weight") == mamba.layer_of("backbone.norm_f.weight") == 3
    assert mamba.layer_of("something.else") == -1


# ------------------------------------------------------------------------------------ Monte-Carlo
def _lm_batches(n=2, L=7, vocab=13):
    g = torch.Generator().manual_seed(6)
    return [
        (torch.randint(0, vocab, (2, L), generator=g), torch.randint(0, vocab, (2, L), generator=g))
        for _ in range(n)
    ]


GAUSS = {"name": "gauss", "kind": "gaussian", "level": 0.2, "eval_levels": [0.0, 0.2], "chips": 2}
QS4D_A = {"name": "qa", "kind": "qs4d_A", "level": 0.05, "eval_levels": [0.05], "chips": 2}


@pytest.mark.parametrize(
    ("index", "analog", "profile", "stop"),
    [
        (0, {"include": ["layers.2.*", "decoder.*"]}, GAUSS, 2),
        (0, {"include": ["decoder.*"]}, GAUSS, 3),
        (0, None, GAUSS, 0),
        (0, {"include": ["layers.1.*"]}, QS4D_A, 1),  # per-forward draws: the counters must line up
        (1, {"include": ["backbone.layers.2.*", "lm_head.*"]}, GAUSS, 2),
        (1, None, GAUSS, 0),
    ],
)
def test_monte_carlo_prefix_reuse_gives_the_naive_rows(index, analog, profile, stop):
    model = _models()[index]
    batches = _lm_batches()
    assert clean_prefix_stop(model, profile, analog) == stop

    def naive(m):  # a closure: no prefix reuse
        return evaluate_model(m, batches, "lm")

    fast = monte_carlo_eval(model, ModelEvaluator(lambda: batches, "lm"), profile, analog, 0, progress=False)
    plain = monte_carlo_eval(model, naive, profile, analog, 0, progress=False)
    assert fast == plain
    # and the hand-written loop (one chip at a time, the whole model, no weight cache)
    level = profile["eval_levels"][-1]
    for chip in range(profile["chips"]):
        with apply_noise(model, profile, analog, 0, level, chip, 0.0):
            want = evaluate_model(model, batches, "lm")
        got = next(r for r in fast if r["level"] == level and r["chip"] == chip)
        assert got["loss"] == want["loss"]


def test_prefix_cache_over_its_cap_falls_back_to_full_forwards():
    model = _models()[1]
    batches = _lm_batches()
    analog = {"include": ["lm_head.*"]}
    capped = ModelEvaluator(lambda: batches, "lm", max_cache_bytes=1)  # only the first batch is cached
    rows = monte_carlo_eval(model, capped, GAUSS, analog, 0, progress=False)
    assert rows == monte_carlo_eval(
        model, ModelEvaluator(lambda: batches, "lm"), GAUSS, analog, 0, progress=False
    )
    with capped.reuse_prefix(model, 3):
        assert [hidden for _, _, hidden in capped._prefix[1]] == [True, False]


def test_evaluator_bf16_close_to_fp32_and_max_batches():
    model = _models()[0]
    batches = _lm_batches(n=4)
    m32 = ModelEvaluator(lambda: batches, "lm", max_batches=2)(model)
    assert m32 == evaluate_model(model, batches[:2], "lm")
    m16 = ModelEvaluator(lambda: batches, "lm", max_batches=2, dtype=torch.bfloat16)(model)
    assert abs(m16["loss"] - m32["loss"]) < 5e-2
