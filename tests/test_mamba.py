"""Mamba-1 model: recurrent mode, gradients, taps, tying, interface, cross-check with mambapy."""

from fnmatch import fnmatchcase

import pytest
import torch
from torch import nn

from cimssm.models.mamba import MambaMixer, MambaModel, RMSNorm


def _tiny(**kwargs):
    torch.manual_seed(0)
    defaults = dict(d_model=16, n_layer=2, d_state=4, vocab_size=23, scan_chunk_size=4)
    return MambaModel(**{**defaults, **kwargs})


def _roll_out(model, x):
    state = model.allocate_state(x.shape[0])
    outs = []
    for t in range(x.shape[1]):
        out, state = model.step(x[:, t], state)
        outs.append(out)
    return torch.stack(outs, dim=1)


def _randomize(model, std=0.3):
    """Larger weights than the init, so the mixers' contribution is far above rounding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, std)


@torch.no_grad()
def test_step_equals_forward_tokens():
    model = _tiny().eval()
    _randomize(model)
    x = torch.randint(0, 23, (3, 11))
    logits = model(x)
    assert logits.shape == (3, 11, 23)
    torch.testing.assert_close(_roll_out(model, x), logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_step_equals_forward_float_input():
    model = _tiny(vocab_size=None, d_input=5, n_classes=7).eval()
    _randomize(model)
    x = torch.randn(2, 9, 5)
    out = model(x)
    assert out.shape == (2, 9, 7)
    torch.testing.assert_close(_roll_out(model, x), out, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = _tiny(tie_embeddings=False)
    model(torch.randint(0, 23, (2, 10))).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor
        self.calls = 0

    def forward(self, t):
        self.calls += 1
        return t * self.factor


@torch.no_grad()
def test_A_tap_is_applied_in_forward_and_step():
    model = _tiny().eval()
    _randomize(model)
    x = torch.randint(0, 23, (2, 6))
    clean = model(x)
    tap = _Scale(0.5)
    model.backbone.layers[1].mixer.A_tap = tap
    tapped = model(x)
    assert tap.calls == 1
    assert not torch.allclose(clean, tapped)
    torch.testing.assert_close(_roll_out(model, x), tapped, atol=1e-5, rtol=1e-5)
    assert tap.calls == 1 + 6


@torch.no_grad()
def test_state_tap_switches_to_slow_path():
    model = _tiny().eval()
    _randomize(model)
    x = torch.randint(0, 23, (2, 7))
    fast = model(x)
    identity_like = _Scale(1.0)
    model.backbone.layers[0].mixer.state_tap = identity_like
    slow = model(x)
    assert identity_like.calls == 7  # once per time step: the slow path ran
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)

    shrink = _Scale(0.9)
    model.backbone.layers[0].mixer.state_tap = shrink
    shrunk = model(x)
    assert not torch.allclose(shrunk, fast)
    torch.testing.assert_close(_roll_out(model, x), shrunk, atol=1e-5, rtol=1e-5)


def test_mixer_input_hook_fires_in_step_mode():
    model = _tiny().eval()
    seen = []
    model.backbone.layers[0].mixer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.randint(0, 23, (2, 5)))
        model.step(torch.randint(0, 23, (2,)), model.allocate_state(2))
    assert seen == [(2, 5, 16), (2, 16)]


def test_tied_head_shares_storage():
    model = _tiny()
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    untied = _tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.backbone.embeddings.weight.data_ptr()
    padded = _tiny(pad_vocab_size_multiple=8)
    assert padded.backbone.embeddings.weight.shape[0] == 24 and padded.tied
    assert padded(torch.randint(0, 23, (1, 3))).shape == (1, 3, 24)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_classification_shape(pool):
    model = _tiny(task="classification", n_classes=3, pool=pool)
    assert not hasattr(model, "lm_head")
    assert model(torch.randint(0, 23, (4, 8))).shape == (4, 3)
    float_model = _tiny(task="classification", vocab_size=None, d_input=2, n_classes=5, pool=pool)
    assert float_model(torch.randn(3, 6, 2)).shape == (3, 5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(d_model=0), "d_model"),
        (dict(d_state=-1), "d_state"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(task="regression"), "task"),
        (dict(pool="max"), "pool"),
        (dict(task="classification"), "n_classes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _tiny(**kwargs)


def test_module_names_and_optimizer_hints():
    model = _tiny(lr_ssm=1e-3)
    mixer = model.backbone.layers[1].mixer
    names = dict(model.named_parameters())
    for leaf in [
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        "D",
        "out_proj.weight",
    ]:
        assert f"backbone.layers.1.mixer.{leaf}" in names
    assert "backbone.layers.0.norm.weight" in names and "backbone.norm_f.weight" in names
    assert mixer.dt_rank == 1 and mixer.x_proj.weight.shape == (1 + 2 * 4, 32)
    torch.testing.assert_close(mixer.A_log[3], torch.log(torch.arange(1.0, 5.0)))
    for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias):
        assert p._optim == {"lr": 1e-3, "weight_decay": 0.0}
    assert _tiny().backbone.layers[0].mixer.D._optim == {"weight_decay": 0.0}
    dt = nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_hardware_parts_match_the_model():
    for model in (_tiny(), _tiny(task="classification", vocab_size=None, d_input=3, n_classes=2)):
        params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        modules = [n for n, _ in model.named_modules()]
        for part, spec in MambaModel.hardware_parts.items():
            assert spec["category"] in ("weight", "ssm", "act"), part
            pool = params if spec["kind"] == "param" else modules
            hits = [n for n in pool if any(fnmatchcase(n, g) for g in spec["targets"])]
            assert hits, part
    taps = MambaModel.hardware_parts["A"]["targets"] + MambaModel.hardware_parts["scan_state"]["targets"]
    model = _tiny()
    for name, module in model.named_modules():
        if any(fnmatchcase(name, g) for g in taps):
            assert isinstance(module, nn.Identity), name


def test_rms_norm():
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[3.0, -3.0, 3.0, -3.0]])
    torch.testing.assert_close(norm(x), x / 3)


def test_mixer_shapes():
    mixer = MambaMixer(8, d_state=3, d_conv=2, expand=3)
    assert mixer(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    conv_state, ssm_state = mixer.allocate_inference_cache(2)
    assert conv_state.shape == (2, 24, 2) and ssm_state.shape == (2, 24, 3)


def test_residual_stack_matches_mambapy():
    mambapy_mamba = pytest.importorskip("mambapy.mamba")
    model = _tiny(d_model=32, n_layer=2, d_state=8)
    _randomize(model)
    reference = mambapy_mamba.Mamba(mambapy_mamba.MambaConfig(d_model=32, n_layers=2, d_state=8))
    layers = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if ".layers." in k}
    reference.load_state_dict(layers, strict=True)

    x = torch.randn(2, 13, 32)
    hidden = x
    for layer in model.backbone.layers:
        hidden = layer(hidden)
    expected = reference(x)
    assert (expected - x).abs().max() > 1e-2  # the mixers do contribute
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)

    ours = dict(model.backbone.layers.named_parameters())
    theirs = dict(reference.layers.named_parameters())
    assert ours.keys() == theirs.keys()
    names = sorted(ours)
    grads = torch.autograd.grad(hidden.square().sum(), [ours[n] for n in names])
    grads_ref = torch.autograd.grad(expected.square().sum(), [theirs[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        scale = max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g, g_ref, atol=1e-4 * scale, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
