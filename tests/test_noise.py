"""Noise transforms of hardware/noise.py: statistics match their definitions, seeding, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cimssm.hardware.core import attach_input_transform, attach_output_transform, detach_transforms
from cimssm.hardware.noise import (
    ADCQuantization,
    ConductanceDrift,
    DACQuantization,
    GaussianWeightNoise,
    MultiplicativeWeightNoise,
    QS4DForwardNoise,
    StuckAtFaults,
    chip_seed,
    stable_seed,
    tile_slices,
)


def _weight(shape=(256, 200), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _programmed(t, seed=1):
    t.program(seed)
    return t


# ------------------------------------------------------------------------------------ seeding
def test_stable_seed_is_stable_and_normalises_numbers():
    import numpy as np

    assert stable_seed(1, "a", 0.05) == stable_seed(np.int64(1), "a", np.float64(0.05))
    assert stable_seed(1, "a", 0.05) != stable_seed(1, "a", 0.06)
    assert 0 <= stable_seed("x") < 2**63
    # pinned: must never change across processes/versions (chips split across processes)
    assert chip_seed(0, "gauss_5pct", 0.05, 3) == chip_seed(0, "gauss_5pct", 0.05, 3)
    assert chip_seed(0, "p", 0.05, 0) != chip_seed(0, "p", 0.05, 1)
    assert chip_seed(0, "p", 0.05, 0) != chip_seed(1, "p", 0.05, 0)
    assert chip_seed(0, "p", 0.05, 0) != chip_seed(0, "q", 0.05, 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianWeightNoise(0.05),
        lambda: MultiplicativeWeightNoise(0.05),
        lambda: StuckAtFaults(0.1, "gmax"),
        lambda: _timed(ConductanceDrift(0.05), 3600.0),
    ],
    ids=["gaussian", "multiplicative", "stuck", "drift"],
)
def test_same_seed_same_draws_different_seed_different(make):
    w = _weight()
    a, b, c = make(), make(), make()
    a.program(7)
    b.program(7)
    c.program(8)
    wa, wb, wc = a(w), b(w), c(w)
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert torch.equal(a(w), wa), "a chip's draws are fixed: every forward gives the same W'"
    a.program(8)
    assert torch.equal(a(w), wc), "reprogramming with a seed reproduces that seed's chip"


def _timed(t, time):
    t.set_time(time)
    return t


def test_draws_are_non_persistent_buffers():
    t = _programmed(GaussianWeightNoise(0.05))
    t(_weight())
    assert t.eps is not None
    assert t.state_dict() == {}


# ------------------------------------------------------------------------------------ statistics
def test_gaussian_std_relative_to_max_per_tensor():
    w = _weight((400, 250))
    level = 0.03
    out = _programmed(GaussianWeightNoise(level))(w)
    z = (out - w) / (level * w.abs().max())
    assert abs(z.mean().item()) < 0.01
    assert z.std().item() == pytest.approx(1.0, abs=0.01)


def test_gaussian_std_relative_to_max_per_channel():
    w = _weight((300, 300)) * torch.linspace(0.1, 3.0, 300).unsqueeze(1)  # rows with different ranges
    level = 0.05
    out = _programmed(GaussianWeightNoise(level, per_channel=True))(w)
    z = (out - w) / (level * w.abs().amax(dim=1, keepdim=True))
    assert z.std().item() == pytest.approx(1.0, abs=0.01)
    row_std = (out - w).std(dim=1)
    ratio = (w[-1].abs().max() / w[0].abs().max()).item()
    assert (row_std[-1] / row_std[0]).item() == pytest.approx(ratio, rel=0.2)


def test_gaussian_level_zero_is_identity():
    w = _weight()
    assert torch.equal(_programmed(GaussianWeightNoise(0.0))(w), w)


def test_multiplicative_relative_std():
    w = _weight((400, 250))
    out = _programmed(MultiplicativeWeightNoise(0.1))(w)
    rel = out / w - 1
    assert rel.mean().item() == pytest.approx(0.0, abs=0.002)
    assert rel.std().item() == pytest.approx(0.1, rel=0.01)


def test_drift_relative_spread_equals_level_at_t_ref():
    level, t_ref = 0.05, 86400.0
    w = torch.full((300, 300), 0.7)
    for compensation in (False, True):
        d = _timed(_programmed(ConductanceDrift(level, t_ref=t_ref, compensation=compensation)), t_ref)
        out = d(w)
        assert (out.std() / out.mean()).item() == pytest.approx(level, rel=0.02)
    # with compensation the mean decay is removed exactly (mean|W| restored)
    assert out.mean().item() == pytest.approx(0.7, rel=1e-5)


def test_drift_mean_decay_without_compensation():
    level, t, t0, nu = 0.05, 3600.0, 20.0, 0.06
    d = _timed(_programmed(ConductanceDrift(level, t0=t0, nu_mean=nu, compensation=False)), t)
    out = d(torch.ones(400, 400))
    # log-normal mean: exp(-μ·L + σ²L²/2) = ((t+t0)/t0)^(-μ) · sqrt(1 + level²)
    expected = ((t + t0) / t0) ** (-nu) * math.sqrt(1 + level**2)
    assert out.mean().item() == pytest.approx(expected, rel=2e-3)


def test_drift_t_ref_fixed_spread_grows_with_time_and_zero_time_is_identity():
    d = _programmed(ConductanceDrift(0.05, t_ref=3600.0, compensation=False))
    w = torch.ones(300, 300)
    d.set_time(0.0)
    assert torch.equal(d(w), w)
    spreads = []
    for t in (60.0, 3600.0, 86400.0):
        d.set_time(t)
        out = d(w)
        spreads.append((out.std() / out.mean()).item())
    assert spreads[0] < spreads[1] < spreads[2]
    assert spreads[1] == pytest.approx(0.05, rel=0.02)


def test_drift_keeps_chip_across_times():
    d = _programmed(ConductanceDrift(0.05))
    w = _weight()
    d.set_time(100.0)
    d(w)
    eps = d.eps.clone()
    d.set_time(1e5)
    d(w)
    assert torch.equal(d.eps, eps)


@pytest.mark.parametrize("mode", ["zero", "gmax"])
def test_stuck_rate_and_values(mode):
    w = _weight((300, 300))
    w[0, 0] = 0.0
    rate = 0.1
    s = _programmed(StuckAtFaults(rate, mode, tile_size=None))
    out = s(w)
    changed = out != w
    assert changed.float().mean().item() == pytest.approx(rate, abs=0.005)
    if mode == "zero":
        assert torch.all(out[changed] == 0)
    else:
        g_max = w.abs().max()
        assert torch.allclose(out[changed].abs(), g_max.expand(int(changed.sum())))
        assert torch.all(torch.sign(out[changed]) == torch.where(w[changed] < 0, -1.0, 1.0))


def test_stuck_gmax_uses_tile_max():
    w = torch.ones(8, 8) * 0.5
    w[:4, :4] *= 4  # tile (0, 0) has max 2.0, the others 0.5
    s = _programmed(StuckAtFaults(1.0, "gmax", tile_size=4))
    out = s(w)
    assert torch.all(out[:4, :4] == 2.0) and torch.all(out[4:, :] == 0.5) and torch.all(out[:, 4:] == 0.5)


def test_tile_split_is_near_equal():
    rows = [r for r, _ in tile_slices(1100, 10, 512)]
    assert [r.stop - r.start for r in rows] == [367, 367, 366]
    assert len(tile_slices(512, 512, 512)) == 1


def test_qs4d_noise_redrawn_every_forward_and_reproducible():
    a = -torch.rand(16, 8) - 0.5
    level = 0.01
    q = _programmed(QS4DForwardNoise(level), seed=3)
    first = [q(a) for _ in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    q.program(3)
    again = [q(a) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    q.program(4)
    assert not torch.equal(q(a), first[0])
    # std = level·(max − min), over many forwards
    q.program(5)
    z = torch.stack([(q(a) - a) for _ in range(200)]) / (level * (a.max() - a.min()))
    assert z.std().item() == pytest.approx(1.0, abs=0.02)


def test_gradients_pass_for_noise_aware_training():
    w = _weight((20, 10)).requires_grad_()
    for t in (GaussianWeightNoise(0.05), MultiplicativeWeightNoise(0.05), QS4DForwardNoise(0.05)):
        t.program(0)
        (g,) = torch.autograd.grad(t(w).sum(), w)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    d = _timed(_programmed(ConductanceDrift(0.05)), 100.0)
    (g,) = torch.autograd.grad(d(w).sum(), w)
    assert g.abs().sum() > 0


# ------------------------------------------------------------------------------------ DAC / ADC
def _linear_with_io(dac_bits, adc_bits, out_bound=10.0, out_noise=0.0, in_bound=None):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    model = nn.Sequential(lin)
    dac = DACQuantization(dac_bits, in_bound=in_bound)
    adc = ADCQuantization(dac, lin, adc_bits, out_bound, out_noise)
    attach_input_transform(model, "0", dac)
    attach_output_transform(model, "0", adc)
    dac.program(0)
    adc.program(0)
    return model, lin, dac, adc


def test_dac_quantizes_inputs_to_bits():
    model, lin, dac, _ = _linear_with_io(3, None, out_bound=None)
    x = torch.randn(5, 16)
    s = x.abs().amax(dim=-1, keepdim=True)
    xq = dac(x)
    levels = torch.round(xq / s * 3)
    assert torch.allclose(xq / s * 3, levels, atol=1e-5)  # n = 2^(3-1) - 1 = 3 levels per side
    assert (xq - x).abs().max() <= (s / 6).max() + 1e-6


def test_adc_quantizes_and_bounds_outputs():
    model, lin, dac, adc = _linear_with_io(None, 4, out_bound=2.0)
    x = torch.randn(64, 16)
    y = model(x)
    scale = x.abs().amax(dim=-1, keepdim=True) * lin.weight.abs().max()
    y_n = y / scale
    assert y_n.abs().max() <= 2.0 + 1e-5
    step = 2.0 / 7
    assert torch.allclose(y_n / step, torch.round(y_n / step), atol=1e-4)
    n = detach_transforms(model, lambda m: m in (dac, adc))
    assert n == 2 and not hasattr(lin, "hw_input") and not hasattr(lin, "hw_output")
    torch.testing.assert_close(model(x), lin(x))


def test_adc_output_noise_std_and_reproducibility():
    model, lin, dac, adc = _linear_with_io(None, None, out_bound=None, out_noise=0.05)
    x = torch.randn(2000, 16)
    y_clean = x @ lin.weight.T + lin.bias
    y1, y2 = model(x), model(x)
    assert not torch.equal(y1, y2), "output noise is new at every forward"
    scale = x.abs().amax(dim=-1, keepdim=True) * lin.weight.abs().max()
    assert ((y1 - y_clean) / scale).std().item() == pytest.approx(0.05, rel=0.03)
    adc.program(0)
    assert torch.equal(model(x), y1)


def test_dac_adc_on_conv1d_channels():
    conv = nn.Conv1d(4, 6, 1)
    model = nn.Sequential(conv)
    dac = DACQuantization(None, channel_dim=1)
    adc = ADCQuantization(dac, conv, bits=8, out_bound=10.0)
    attach_input_transform(model, "0", dac)
    attach_output_transform(model, "0", adc)
    x = torch.randn(2, 4, 5)
    y = model(x)
    assert dac.last_scale.shape == (2, 1, 5)
    torch.testing.assert_close(y, conv._conv_forward(x, conv.weight, conv.bias), atol=0.1, rtol=0.05)
