"""PCM statistical model (hardware/pcm.py) against the formulas and figures of papers/NOTES.md."""

from __future__ import annotations

import math

import pytest
import torch

from cimssm.hardware.noise import generator
from cimssm.hardware.pcm import PCMLikeNoiseModel, PCMWeight

DAY = 86400.0
N = 100_000  # devices per Monte-Carlo estimate: standard error of a mean ≈ 0.04/316 ≈ 1.3e-4


def _pair_at(g_hat: float, n: int = N) -> torch.Tensor:
    """(2, n) target conductances of a weight at ĝ = g_hat: g+ = ĝ·g_max, g− = 0 (both programmed)."""
    return torch.stack([torch.full((n,), g_hat * 25.0), torch.zeros(n)])


def _weight_stats(g: torch.Tensor) -> tuple[float, float]:
    w = (g[0] - g[1]) / 25.0
    return w.mean().item(), w.std().item()


# ------------------------------------------------------------------------------------ processes
def test_programming_noise_std_polynomial():
    m = PCMLikeNoiseModel()
    g = torch.tensor([0.0, 12.5, 25.0])
    expected = [0.26348, 0.26348 + 1.9650 * 0.5 - 1.1731 * 0.25, 0.26348 + 1.9650 - 1.1731]
    torch.testing.assert_close(m.programming_noise_std(g), torch.tensor(expected))
    # scales with g_max / 25
    m50 = PCMLikeNoiseModel(g_max=50.0)
    torch.testing.assert_close(m50.programming_noise_std(2 * g), 2 * torch.tensor(expected))


def test_drift_exponent_statistics_and_clips():
    m = PCMLikeNoiseModel()
    mu, sigma = m.drift_exponent_stats(torch.tensor([12.5, 0.0, 25.0, 25.0 * math.exp(-3)]))
    torch.testing.assert_close(mu, torch.tensor([0.049, 0.1, 0.049, 0.0155 * 3 + 0.0244]))
    torch.testing.assert_close(sigma, torch.tensor([0.008, 0.045, 0.008, 0.0125 * 3 - 0.0059]))
    nu = m.generate_drift_coefficients(torch.full((N,), 12.5), generator(0))
    assert (nu >= 0).all()
    assert nu.mean().item() == pytest.approx(0.049, abs=2e-4)
    assert nu.std().item() == pytest.approx(0.008, rel=0.02)


def test_drift_identity_at_zero_and_power_law():
    m = PCMLikeNoiseModel()
    g = torch.rand(1000) * 25
    nu = m.generate_drift_coefficients(g, generator(1))
    assert torch.equal(m.apply_drift(g, nu, 0.0), g), "t = t_inference + t0: no drift at t_inference = 0"
    for t in (1.0, 3600.0, DAY):
        torch.testing.assert_close(m.apply_drift(g, nu, t), g * ((t + 20.0) / 20.0) ** (-nu))


def test_mean_conductance_decays_as_power_law():
    m = PCMLikeNoiseModel()
    g = torch.full((N,), 12.5)
    nu = m.generate_drift_coefficients(g, generator(2))
    for t in (100.0, DAY):
        ratio = (m.apply_drift(g, nu, t).mean() / g.mean()).item()
        expected = torch.mean(((t + 20.0) / 20.0) ** (-nu)).item()
        assert ratio == pytest.approx(expected, rel=1e-5)
        # and close to the power law with the mean exponent μ_ν = 0.049
        assert ratio == pytest.approx(((t + 20.0) / 20.0) ** (-0.049), rel=0.01)


def test_read_noise_std():
    m = PCMLikeNoiseModel()
    g = torch.full((N,), 12.5)
    q_s = 0.0088 / 0.5**0.65
    for t in (0.0, DAY):
        expected = q_s * math.sqrt(math.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
        torch.testing.assert_close(m.read_noise_std(g, t), torch.full((N,), expected))
        out = m.apply_read_noise(g, g, t, generator(3))
        assert (out / g - 1).std().item() == pytest.approx(expected, rel=0.01)
    # Q_s is capped at 0.2 for tiny conductances
    assert m.read_noise_std(torch.tensor([0.0]), 0.0).item() == pytest.approx(
        0.2 * math.sqrt(math.log((20.0 + 250e-9) / 5e-7))
    )


# ------------------------------------------------------------------------------------ NOTES.md figures
def test_reference_figures_one_device_at_half_gmax():
    """NOTES.md: ĝ = 0.5: programmed 0.4958 ± 0.0386; 1 day 0.3305 ± 0.0413; compensated α ≈ 1.50, std 0.062."""
    m = PCMLikeNoiseModel()
    g_target = _pair_at(0.5)
    gen = generator(2024)
    g_prog = m.program(g_target, gen)
    mean, std = _weight_stats(g_prog)
    assert mean == pytest.approx(0.4958, abs=6e-4)
    assert std == pytest.approx(0.0386, abs=6e-4)

    nu = m.generate_drift_coefficients(g_target, gen)
    g_day = m.apply_read_noise(m.apply_drift(g_prog, nu, DAY), g_prog, DAY, gen)
    mean_day, std_day = _weight_stats(g_day)
    assert mean_day == pytest.approx(0.3305, abs=6e-4)
    assert std_day == pytest.approx(0.0413, abs=6e-4)

    w_prog = (g_prog[0] - g_prog[1]) / 25.0
    w_day = (g_day[0] - g_day[1]) / 25.0
    alpha = m.drift_compensation_factor(w_prog, w_day).item()
    assert alpha == pytest.approx(1.50, abs=0.01)
    assert (alpha * w_day).std().item() == pytest.approx(0.062, abs=1e-3)


def test_pcm_weight_reproduces_reference_figures():
    """Through the transform: a tile of weights at half its max maps to ĝ = 0.5."""
    w = torch.full((250, 400), 0.5)
    w[0, 0] = 1.0  # max|W| = 1 -> scale = g_max, ĝ = 0.5 for the others
    t = PCMWeight(tile_size=512, drift_compensation=False)
    t.program(11)
    t.set_time(0.0)
    st = t.conductances(w)
    assert st["w_prog"].flatten()[1:].mean().item() == pytest.approx(0.4958, abs=6e-4)
    assert st["w_prog"].flatten()[1:].std().item() == pytest.approx(0.0386, abs=6e-4)
    t.set_time(DAY)
    day = t(w).flatten()[1:]
    assert day.mean().item() == pytest.approx(0.3305, abs=6e-4)
    assert day.std().item() == pytest.approx(0.0413, abs=6e-4)
    t.drift_compensation = True
    comp = t(w).flatten()[1:]
    assert (comp.mean() / day.mean()).item() == pytest.approx(1.50, abs=0.01)
    assert comp.std().item() == pytest.approx(0.062, abs=1e-3)


# ------------------------------------------------------------------------------------ the transform
def _matrix(seed=0, shape=(300, 200)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_compensation_restores_mean_output():
    w = _matrix()
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(1)).abs()  # positive inputs
    y_clean = (w @ x).abs().mean()
    t = PCMWeight(tile_size=512, drift_compensation=False)
    t.program(5)
    t.set_time(30 * DAY)
    y_drift = (t(w) @ x).abs().mean()
    t.drift_compensation = True
    y_comp = (t(w) @ x).abs().mean()
    assert (y_drift / y_clean).item() < 0.7  # a month of drift loses a third of the signal
    assert (y_comp / y_clean).item() == pytest.approx(1.0, abs=0.05)


def test_set_time_keeps_programming_and_redraws_read_noise_per_time():
    w = _matrix()
    t = PCMWeight()
    t.program(3)
    t.set_time(DAY)
    a = t.conductances(w)
    z_read_day = t.z_read.clone()
    t.set_time(10 * DAY)
    b = t.conductances(w)
    assert torch.equal(a["g_prog"], b["g_prog"]) and torch.equal(a["nu"], b["nu"])
    assert not torch.equal(t.z_read, z_read_day)
    t.set_time(DAY)
    c = t.conductances(w)
    assert torch.equal(a["g_final"], c["g_final"]), "read noise is keyed by (chip, t)"
    t.program(4)
    assert not torch.equal(t.conductances(w)["g_prog"], a["g_prog"])


def test_every_forward_same_weight_within_a_chip():
    w = _matrix()
    t = PCMWeight()
    t.program(0)
    t.set_time(DAY)
    assert torch.equal(t(w), t(w))
    assert t.state_dict() == {}


def test_per_tile_scale():
    w = torch.ones(10, 10) * 0.1
    w[:5, :5] = 1.0  # tiles (5x5 with tile_size 5): one at max 1.0, three at max 0.1
    t = PCMWeight(tile_size=5)
    scale = t.tile_scale(w)
    assert torch.all(scale[:5, :5] == 25.0) and torch.all(scale[5:, :] == 250.0)
    assert torch.all(scale[:, 5:] == 250.0)
    # every tile uses its full conductance range
    g = t.noise_model.to_conductances(w, scale)
    assert torch.allclose(g[0], torch.full_like(w, 25.0))


def test_level_zero_is_deterministic_mean_drift():
    w = _matrix()
    dev = PCMLikeNoiseModel(prog_noise_scale=0.0, read_noise_scale=0.0, drift_noise_scale=0.0)
    t = PCMWeight(dev, drift_compensation=True)
    t.program(0)
    t.set_time(0.0)
    torch.testing.assert_close(t(w), w, rtol=1e-5, atol=1e-6)
    t.set_time(DAY)
    a = t(w)
    t.program(1)
    assert torch.equal(t(w), a), "no randomness left at level 0"


def test_shapes_vectors_and_3d_taps():
    for shape in [(7,), (6, 4, 2), (8, 3, 1)]:
        w = torch.randn(shape)
        t = PCMWeight(tile_size=4)
        t.program(0)
        t.set_time(60.0)
        out = t(w)
        assert out.shape == w.shape and torch.isfinite(out).all()


def test_gradient_straight_through():
    w = _matrix(shape=(8, 6)).requires_grad_()
    t = PCMWeight()
    t.program(0)
    t.set_time(DAY)
    (g,) = torch.autograd.grad((t(w) * 2).sum(), w)
    torch.testing.assert_close(g, torch.full_like(w, 2.0))


def test_cached_result_follows_in_place_weight_changes():
    w = _matrix(shape=(20, 10)).clone()
    t = PCMWeight()
    t.program(0)
    t.set_time(DAY)
    a = t(w)
    assert t(w) is a or torch.equal(t(w), a)
    with torch.no_grad():
        w.mul_(2.0)  # e.g. an optimizer step or load_state_dict
    b = t(w)
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, t.conductances(w)["w_t"])
