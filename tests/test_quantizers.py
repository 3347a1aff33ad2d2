"""UniformQuantizer and fake_quantize: grid, error bound, STE, granularity, scale modes, validation."""

import pytest
import torch

from cimssm.hardware.quantizers import QuantConfigError, UniformQuantizer, fake_quantize


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_values_on_grid_and_error_within_half_step(bits):
    x = _x(64, 32)
    q = UniformQuantizer(bits)(x)
    step = x.abs().max() / (2 ** (bits - 1) - 1)
    codes = q / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().unique().numel() <= 2**bits - 1
    assert (q - x).abs().max() <= step / 2 + 1e-6
    assert codes.abs().max().round() == 2 ** (bits - 1) - 1  # the max is representable


def test_binary_is_sign_times_scale():
    x = _x(100)
    q = UniformQuantizer(1)(x)
    s = x.abs().max()
    assert set(q.unique().tolist()) <= {-s.item(), s.item()}
    assert torch.equal(q > 0, x >= 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_grid_zero_point(bits):
    x = _x(50, 20).abs() + 0.3  # all positive: the range is [0, max]
    x[0, 0] = 0.0
    quant = UniformQuantizer(bits, symmetric=False)
    q = quant(x)
    assert q.unique().numel() <= 2**bits
    step = x.max() / (2**bits - 1)
    assert (q - x).abs().max() <= step / 2 + 1e-6
    assert q[0, 0] == 0.0  # zero exactly representable
    codes, scale, zp = quant.quantize_to_int(x)
    assert codes.dtype == torch.uint8 if bits == 8 else codes.dtype == torch.int8
    assert torch.allclose((codes.float() - zp) * scale, q)


def test_levels_match_bits_and_half_levels():
    x = _x(40)
    for b in (2, 4, 8):
        assert torch.equal(UniformQuantizer(levels=2**b)(x), UniformQuantizer(b)(x))
    half = UniformQuantizer(levels=2**8 // 2)
    assert half.bits == 7 and half.qmax == 63
    with pytest.raises(QuantConfigError):
        UniformQuantizer(8, levels=16)


def test_ste_passes_gradient_unchanged_for_max_scale():
    x = _x(30).requires_grad_()
    g = _x(30, seed=1)
    UniformQuantizer(3)(x).backward(g)
    assert torch.equal(x.grad, g)


def test_ste_zeroes_gradient_outside_frozen_running_range():
    quant = UniformQuantizer(4, scale="running")
    quant.init_range(torch.tensor([-1.0, 1.0]))
    quant.freeze()
    x = torch.tensor([-3.0, -0.5, 0.2, 0.99, 1.5, 4.0], requires_grad=True)
    y = quant(x)
    assert y.abs().max() <= 1.0 + 1e-6  # clipped
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_learned_clip_gradients():
    quant = UniformQuantizer(4, scale="learned")
    quant.init_range(torch.tensor([1.0]))
    x = torch.tensor([-3.0, -0.5, 0.2, 0.7, 2.0], requires_grad=True)
    quant(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert quant.clip_max.grad is not None and quant.clip_max.grad.abs() > 0
    assert quant.clip_max._optim == {"weight_decay": 0.0}


def test_learned_clip_initialises_from_first_tensor():
    quant = UniformQuantizer(8, scale="learned")
    x = _x(20)
    y = quant(x)
    assert torch.allclose(quant.clip_max.detach(), x.abs().max())
    assert (y - x).abs().max() <= x.abs().max() / 127 / 2 + 1e-6


def test_per_channel_scales_are_per_channel():
    w = _x(4, 16)
    w[0] *= 100.0
    w[3] *= 0.01
    quant = UniformQuantizer(4, granularity="channel", ch_axis=0)
    q = quant(w)
    _, scale, zp = quant.quantize_to_int(w)
    assert scale.shape == (4,) and torch.equal(zp, torch.zeros(4, dtype=torch.int32))
    assert torch.allclose(scale, w.abs().amax(dim=1) / 7)
    for c in range(4):  # every channel within half of its own step
        assert (q[c] - w[c]).abs().max() <= scale[c] / 2 + 1e-6
    per_tensor = UniformQuantizer(4)(w)
    assert torch.count_nonzero(per_tensor[3]) == 0 and torch.count_nonzero(q[3]) > 0


def test_per_channel_last_axis():
    x = _x(2, 5, 3)
    quant = UniformQuantizer(8, granularity="channel", ch_axis=-1)
    _, scale, _ = quant.quantize_to_int(x)
    assert torch.allclose(scale, x.abs().amax(dim=(0, 1)) / 127)


def test_bits_none_is_identity():
    x = _x(7, 3)
    quant = UniformQuantizer(None)
    assert quant(x) is x
    assert list(quant.state_dict()) == []


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, "8", True])
def test_bad_bits_raise(bad):
    with pytest.raises(QuantConfigError, match=r"1\.\.16") as err:
        UniformQuantizer(bad)
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_settings_raise():
    with pytest.raises(QuantConfigError, match="granularity"):
        UniformQuantizer(8, granularity="row")
    with pytest.raises(QuantConfigError, match="scale"):
        UniformQuantizer(8, scale="mse")
    with pytest.raises(QuantConfigError, match="num_channels"):
        UniformQuantizer(8, granularity="channel", scale="learned")


def test_running_range_ema_in_training_frozen_in_eval():
    quant = UniformQuantizer(8, scale="running", momentum=0.5)
    quant.train()
    quant(torch.tensor([2.0, -1.0]))
    assert quant.running_max.item() == 2.0
    quant(torch.tensor([4.0]))
    assert quant.running_max.item() == 3.0  # 2 + 0.5·(4 - 2)
    quant.eval()
    y = quant(torch.tensor([10.0]))
    assert quant.running_max.item() == 3.0 and y.item() == pytest.approx(3.0)


def test_calibration_observes_max_then_freeze():
    quant = UniformQuantizer(8, scale="running")
    quant.eval()
    quant.calibrating = True
    x1, x2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    assert quant(x1) is x1  # observe only
    quant(x2)
    assert quant.running_max.item() == 3.0
    quant.freeze()
    assert not quant.calibrating and bool(quant.frozen)
    quant.train()
    quant(torch.tensor([100.0]))
    assert quant.running_max.item() == 3.0


def test_per_channel_running_range_is_sized_lazily_and_loads():
    quant = UniformQuantizer(8, scale="running", granularity="channel", ch_axis=1)
    x = _x(2, 3, 5)
    quant.train()
    quant(x)
    assert quant.running_max.shape == (3,)
    fresh = UniformQuantizer(8, scale="running", granularity="channel", ch_axis=1)
    fresh.load_state_dict(quant.state_dict())
    quant.eval()
    fresh.eval()
    assert torch.equal(fresh(x), quant(x))


def test_fake_quantize_function():
    x = torch.tensor([-1.3, -0.24, 0.0, 0.26, 0.74, 2.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.5), -2, 2)
    assert y.tolist() == [-1.0, -0.0, 0.0, 0.5, 0.5, 1.0]  # -2.6 and 4 clip to codes -2, 2
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    z = fake_quantize(torch.tensor([0.1, 0.9]), torch.tensor(0.25), 0, 3, zero_point=torch.tensor(1.0))
    assert z.tolist() == [0.0, 0.5]  # codes clamp at 3: (3 - 1)·0.25


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [1, 4, 8, 16])
def test_quantize_to_int_matches_forward(symmetric, granularity, bits):
    x = _x(6, 10)
    quant = UniformQuantizer(bits, symmetric=symmetric, granularity=granularity).eval()
    codes, scale, zp = quant.quantize_to_int(x)
    assert codes.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32)
    if bits <= 8:
        assert codes.element_size() == 1
    s = scale.reshape(-1, 1) if scale.dim() else scale
    z = zp.reshape(-1, 1).float() if zp.dim() else zp.float()
    assert torch.allclose((codes.float() - z) * s, quant(x), atol=1e-6)


def _lsq_reference(x, clip_max, clip_min, qmin, qmax, g):
    """The learned quantizer written with plain autograd (STE round), for the gradient check."""
    hi = (clip_max - clip_max * g).detach() + clip_max * g
    if clip_min is None:
        scale, zp = hi.abs() / qmax, None
    else:
        lo = (clip_min - clip_min * g).detach() + clip_min * g
        scale = (hi.abs() - lo) / (qmax - qmin)
        zp = (qmin - lo / scale).round().clamp(qmin, qmax).detach()
    v = x / scale if zp is None else x / scale + zp
    v = v.clamp(qmin, qmax)
    q = v + (v.round() - v).detach()
    return q * scale if zp is None else (q - zp) * scale


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_learned_gradients_match_autograd_reference(symmetric, granularity):
    x = (_x(4, 30) * 2).requires_grad_()
    quant = UniformQuantizer(3, symmetric=symmetric, granularity=granularity, scale="learned", num_channels=4)
    quant.init_range(x.detach() * 0.6)  # clip inside the data: some values are clipped
    y = quant(x)
    gy = _x(4, 30, seed=3)
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_()
    cmax = quant.clip_max.detach().clone().requires_grad_()
    cmin = None if symmetric else quant.clip_min.detach().clone().requires_grad_()
    view = (lambda t: t.reshape(-1, 1)) if granularity == "channel" else (lambda t: t)
    g = 1.0 / (30 * quant.qmax if granularity == "channel" else 120 * quant.qmax) ** 0.5
    ref = _lsq_reference(x2, view(cmax), None if symmetric else view(cmin), quant.qmin, quant.qmax, g)
    ref.backward(gy)
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)  # the reference is off by an ulp (·s/s)
    assert torch.equal(x.grad == 0, x2.grad == 0) and (x.grad == 0).any()
    assert torch.allclose(quant.clip_max.grad, cmax.grad, atol=1e-5)
    if not symmetric:
        assert torch.allclose(quant.clip_min.grad, cmin.grad, atol=1e-5)


@pytest.mark.parametrize("scale", ["max", "running", "learned"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_output_keeps_the_input_dtype(scale, granularity):
    x = _x(4, 6).to(torch.bfloat16).requires_grad_()
    quant = UniformQuantizer(4, granularity=granularity, scale=scale, num_channels=4).train()
    y = quant(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
