"""Targeting, profiles, apply_noise handles, noise-aware training and Monte-Carlo evaluation.

Built on toy models that follow docs/architecture.md (names, taps, ``hardware_parts``); the
real S4D / Mamba models are tested at the end when they can be imported.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cimssm.hardware.analog import (
    NoiseConfigError,
    analog_candidates,
    analog_targets,
    apply_noise,
    attach_training_noise,
    build_analog_config,
    build_noise_profile,
    remove_noise,
)
from cimssm.hardware.core import iter_transforms
from cimssm.hardware.montecarlo import chip_seed, monte_carlo_eval, summarize_rows
from cimssm.hardware.noise import GaussianWeightNoise


# ------------------------------------------------------------------------------------ toy models
class ToyMixer(nn.Module):
    def __init__(self, d: int, e: int, n: int):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, 3, groups=e, padding=2)
        self.x_proj = nn.Linear(e, n, bias=False)
        self.dt_proj = nn.Linear(n, e)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d, bias=False)
        self.A_tap = nn.Identity()

    def forward(self, h):  # (B, L, D)
        L = h.shape[1]
        u, z = self.in_proj(h).chunk(2, dim=-1)  # (B, L, E)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :L].transpose(1, 2))
        A = self.A_tap(-torch.exp(self.A_log))  # (E, N)
        dt = F.softplus(self.dt_proj(self.x_proj(u)))  # (B, L, E)
        y = u * torch.exp(dt * A.mean(-1)) + u * self.D
        return self.out_proj(y * F.silu(z))


class ToyBlock(nn.Module):
    def __init__(self, d, e, n):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mixer = ToyMixer(d, e, n)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class ToyBackbone(nn.Module):
    def __init__(self, vocab, d, e, n, n_layer):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyBlock(d, e, n) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(d)


class ToyMamba(nn.Module):
    """Mamba layout (architecture.md): backbone.embeddings, layers.*.mixer.*, A_tap, tied lm_head."""

    hardware_parts = {
        "embeddings": {"kind": "param", "category": "weight", "targets": ["backbone.embeddings.weight"]},
        "lm_head": {"kind": "param", "category": "weight", "targets": ["lm_head.weight"]},
        "in_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.in_proj.weight"],
        },
        "conv1d": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.conv1d.weight"],
        },
        "x_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.x_proj.weight"],
        },
        "dt_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.dt_proj.weight"],
        },
        "out_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.out_proj.weight"],
        },
        "A": {"kind": "tap", "category": "ssm", "targets": ["backbone.layers.*.mixer.A_tap"]},
        "D": {"kind": "param", "category": "ssm", "targets": ["backbone.layers.*.mixer.D"]},
        "activations": {
            "kind": "input",
            "category": "act",
            "targets": ["backbone.layers.*.mixer", "lm_head"],
        },
    }

    def __init__(self, vocab=11, d=8, e=16, n=4, n_layer=2, tied=True):
        super().__init__()
        self.backbone = ToyBackbone(vocab, d, e, n, n_layer)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(self, x):
        h = self.backbone.embeddings(x)
        for layer in self.backbone.layers:
            h = layer(h)
        return self.lm_head(self.backbone.norm_f(h))


class ToyKernel(nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.log_A_real = nn.Parameter(torch.full((h, n), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n).float().repeat(h, 1))
        self.C = nn.Parameter(torch.randn(h, n, 2))
        self.log_dt = nn.Parameter(torch.full((h,), math.log(0.01)))
        self.A_real_tap, self.A_imag_tap, self.C_tap, self.log_dt_tap = (nn.Identity() for _ in range(4))

    def forward(self, L):
        A = torch.complex(self.A_real_tap(-torch.exp(self.log_A_real)), self.A_imag_tap(self.A_imag))
        C = torch.view_as_complex(self.C_tap(self.C).contiguous())
        dtA = A * torch.exp(self.log_dt_tap(self.log_dt)).unsqueeze(-1)  # (H, N)
        K = dtA.unsqueeze(-1) * torch.arange(L)  # (H, N, L)
        return 2 * torch.einsum("hn,hnl->hl", C * (torch.exp(dtA) - 1) / A, torch.exp(K)).real


class ToyS4DLayer(nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.kernel = ToyKernel(h, n)
        self.D = nn.Parameter(torch.randn(h))
        self.kernel_tap, self.input_tap = nn.Identity(), nn.Identity()
        self.mixing = nn.Sequential(nn.Conv1d(h, 2 * h, 1), nn.GLU(dim=-2))

    def forward(self, u):  # (B, H, L)
        L = u.shape[-1]
        k = self.kernel_tap(self.kernel(L))
        u = self.input_tap(u)
        y = torch.fft.irfft(torch.fft.rfft(u, 2 * L) * torch.fft.rfft(k, 2 * L), 2 * L)[..., :L]
        return self.mixing(F.gelu(y + u * self.D.unsqueeze(-1)))


class ToyS4DBlock(nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.layer = ToyS4DLayer(h, n)

    def forward(self, x):  # (B, L, H)
        return x + self.layer(self.norm(x).transpose(1, 2)).transpose(1, 2)


class ToyS4D(nn.Module):
    hardware_parts = {
        "encoder": {"kind": "param", "category": "weight", "targets": ["encoder.weight"]},
        "decoder": {"kind": "param", "category": "weight", "targets": ["decoder.weight"]},
        "mixing": {"kind": "param", "category": "weight", "targets": ["layers.*.layer.mixing.0.weight"]},
        "A_real": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.A_real_tap"]},
        "A_imag": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.A_imag_tap"]},
        "C": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.C_tap"]},
        "log_dt": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel.log_dt_tap"]},
        "kernel": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.kernel_tap"]},
        "ssm_input": {"kind": "tap", "category": "ssm", "targets": ["layers.*.layer.input_tap"]},
        "activations": {"kind": "input", "category": "act", "targets": ["layers.*.layer", "decoder"]},
    }

    def __init__(self, d_input=3, h=8, n=4, n_layer=2, n_classes=5, vocab_size=None):
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, h) if vocab_size else nn.Linear(d_input, h)
        self.layers = nn.ModuleList(ToyS4DBlock(h, n) for _ in range(n_layer))
        self.decoder = nn.Linear(h, n_classes)

    def forward(self, x):
        h = self.encoder(x)
        for layer in self.layers:
            h = layer(h)
        return self.decoder(h.mean(dim=1))


def _mamba(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyMamba(**kw)


def _s4d(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyS4D(**kw)


TOKENS = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
FLOATS = torch.randn(3, 12, 3, generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    # same keys (detaching re-registers a parameter at the end of its module: order may change)
    assert sorted(now) == sorted(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ------------------------------------------------------------------------------------ targeting
def test_default_targets_mamba_weights_and_ssm_matrices():
    m = _mamba()
    names = analog_targets(m, None)
    expected = ["lm_head.weight"]
    for i in range(2):
        p = f"backbone.layers.{i}.mixer."
        expected += [
            p + s
            for s in ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight")
        ]
    expected += [f"backbone.layers.{i}.mixer.A_tap" for i in range(2)]
    expected += [f"backbone.layers.{i}.mixer.D" for i in range(2)]
    assert sorted(names) == sorted(expected)
    assert not any("embeddings" in n or "norm" in n or n.endswith("bias") for n in names)


def test_default_targets_s4d_excludes_log_dt_kernel_and_embedding_encoder():
    names = analog_targets(_s4d(vocab_size=9), None)
    assert "encoder.weight" not in names  # an nn.Embedding is a lookup, never a crossbar
    assert "decoder.weight" in names and "layers.1.layer.mixing.0.weight" in names
    for tap in ("A_real_tap", "A_imag_tap", "C_tap"):
        assert f"layers.0.layer.kernel.{tap}" in names
    assert not any("log_dt" in n or "kernel_tap" in n or "input_tap" in n for n in names)
    assert "encoder.weight" in analog_targets(_s4d(), None)  # a Linear encoder is analog


def test_include_exclude_globs_hit_exactly_the_named_modules():
    m = _mamba()
    names = analog_targets(m, {"include": ["backbone.layers.1.*"], "exclude": ["*conv1d*", "*.D"]})
    assert names == [
        "backbone.layers.1.mixer.in_proj.weight",
        "backbone.layers.1.mixer.x_proj.weight",
        "backbone.layers.1.mixer.dt_proj.weight",
        "backbone.layers.1.mixer.out_proj.weight",
        "backbone.layers.1.mixer.A_tap",
    ]
    with apply_noise(m, {"kind": "gaussian", "level": 0.1}, {"include": ["*out_proj*"]}, seed=0) as h:
        assert h.targets == [f"backbone.layers.{i}.mixer.out_proj.weight" for i in range(2)]
        hit = {
            name.split(".parametrizations")[0]
            for name, t in iter_transforms(m)
            if isinstance(t, GaussianWeightNoise)
        }
        assert hit == {f"backbone.layers.{i}.mixer.out_proj" for i in range(2)}


def test_glob_matching_nothing_is_an_error_naming_it():
    m = _mamba()
    with pytest.raises(NoiseConfigError, match="out_prj"):
        analog_targets(m, {"include": ["*out_prj*"]})
    with pytest.raises(NoiseConfigError, match="embeddings"):  # narrowing cannot widen
        analog_targets(m, None, narrow=["backbone.embeddings.weight"])
    with pytest.raises(NoiseConfigError, match="tile_size"):
        build_analog_config({"tile_size": 0})
    with pytest.raises(NoiseConfigError, match="analog.includes"):
        build_analog_config({"includes": ["*"]})


def test_profile_targets_narrow_the_set():
    m = _mamba()
    with apply_noise(m, {"kind": "gaussian", "level": 0.1, "targets": ["lm_head.weight"]}, seed=0) as h:
        assert h.targets == ["lm_head.weight"]
    with apply_noise(m, {"kind": "qs4d_A", "level": 0.01}, seed=0) as h:
        assert h.targets == ["backbone.layers.0.mixer.A_tap", "backbone.layers.1.mixer.A_tap"]
    s = _s4d()
    with apply_noise(s, {"kind": "qs4d_A", "level": 0.01}, seed=0) as h:
        assert sorted(h.targets) == sorted(
            f"layers.{i}.layer.kernel.{t}" for i in range(2) for t in ("A_real_tap", "A_imag_tap")
        )
    # analog.exclude applies before the profile: excluded A taps cannot come back
    with pytest.raises(NoiseConfigError):
        apply_noise(m, {"kind": "qs4d_A", "level": 0.01}, {"exclude": ["*A_tap"]}, seed=0)


def test_candidates_without_hardware_parts_are_linear_and_conv_weights():
    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 1))
    assert list(analog_candidates(m)) == ["1.weight", "3.weight"]


# ------------------------------------------------------------------------------------ tied head
def test_tied_head_noisy_in_matmul_clean_in_embedding_lookup():
    m = _mamba()
    emb = m.backbone.embeddings
    assert m.lm_head.weight is emb.weight
    clean = emb.weight.detach().clone()
    h = apply_noise(m, {"kind": "gaussian", "level": 0.2, "targets": ["lm_head.weight"]}, seed=1)
    assert torch.equal(emb(TOKENS), F.embedding(TOKENS, clean)), "embedding lookup stays clean"
    assert not torch.equal(m.lm_head.weight, clean), "the head's matmul sees the noisy weight"
    assert m.lm_head.parametrizations.weight.original is emb.weight, "still tied for training"
    x = torch.randn(4, 8)
    assert not torch.allclose(m.lm_head(x), x @ clean.T)
    h.remove()
    assert m.lm_head.weight is emb.weight and torch.equal(emb.weight, clean)


# ------------------------------------------------------------------------------------ apply_noise
PROFILES = [
    {"kind": "gaussian", "level": 0.05, "per_channel": True},
    {"kind": "multiplicative", "level": 0.05},
    {"kind": "drift", "level": 0.05, "t_inference": [3600.0]},
    {"kind": "pcm", "level": 1.0, "t_inference": [86400.0], "params": {"out_noise": 0.02}},
    {"kind": "stuck", "level": 0.05, "params": {"mode": "gmax"}},
    {"kind": "adc", "level": 0.01, "params": {"dac_bits": 6, "adc_bits": 6}},
    {"kind": "qs4d_A", "level": 0.05},
]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p["kind"])
@pytest.mark.parametrize("make,x", [(_mamba, TOKENS), (_s4d, FLOATS)], ids=["mamba", "s4d"])
def test_apply_noise_perturbs_reproduces_and_removes_bit_identically(profile, make, x):
    m = make()
    m.eval()
    state = _state(m)
    with torch.no_grad():
        y_clean = m(x)
        with apply_noise(m, profile, None, seed=0, chip=0) as h:
            assert len(h.targets) > 0
            y0 = m(x)
            assert not torch.equal(y0, y_clean)
            # no noise state in a checkpoint: only the clean tensors (parametrized ones renamed)
            keys = {k.replace(".parametrizations.", ".").removesuffix(".original") for k in m.state_dict()}
            assert keys == set(state)
        _assert_same_state(m, state)
        assert torch.equal(m(x), y_clean)
        with apply_noise(m, profile, None, seed=0, chip=0):
            assert torch.equal(m(x), y0), "same seed and chip: same chip"
        with apply_noise(m, profile, None, seed=0, chip=1):
            assert not torch.equal(m(x), y0), "another chip: other draws"
        with apply_noise(m, profile, None, seed=1, chip=0):
            assert not torch.equal(m(x), y0), "another seed: other draws"
    _assert_same_state(m, state)
    assert list(iter_transforms(m)) == []


def test_noise_composes_after_an_existing_transform():
    from cimssm.hardware.core import attach_param_transform, detach_transforms

    class Halve(nn.Module):  # stands in for a quantizer attached first
        def forward(self, w):
            return w * 0.5

    m = _mamba()
    q = Halve()
    attach_param_transform(m, "backbone.layers.0.mixer.out_proj.weight", q)
    lin = m.backbone.layers[0].mixer.out_proj
    clean = lin.parametrizations.weight.original.detach().clone()
    with apply_noise(
        m, {"kind": "multiplicative", "level": 0.0}, {"include": ["*layers.0*out_proj*"]}, seed=0
    ):
        assert torch.equal(lin.weight, clean * 0.5)
        assert [type(t).__name__ for t in lin.parametrizations.weight] == [
            "Halve",
            "MultiplicativeWeightNoise",
        ]
    assert [type(t).__name__ for t in lin.parametrizations.weight] == ["Halve"]
    detach_transforms(m, lambda t: t is q)
    assert torch.equal(lin.weight, clean)


def test_qs4d_A_redraws_every_forward_and_reproduces_on_rerun():
    m = _s4d()
    with torch.no_grad():
        with apply_noise(m, {"kind": "qs4d_A", "level": 0.02}, seed=4) as h:
            run1 = [m(FLOATS) for _ in range(3)]
            h.set_time(0.0)  # back to forward 0 of this chip
            run2 = [m(FLOATS) for _ in range(3)]
        with apply_noise(m, {"kind": "qs4d_A", "level": 0.02}, seed=4):
            run3 = [m(FLOATS) for _ in range(3)]
    assert not torch.equal(run1[0], run1[1]) and not torch.equal(run1[1], run1[2])
    for a, b, c in zip(run1, run2, run3):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_remove_noise_removes_every_handle():
    m = _mamba()
    state = _state(m)
    apply_noise(m, {"kind": "gaussian", "level": 0.1}, seed=0)
    apply_noise(m, {"kind": "qs4d_A", "level": 0.1}, seed=0)
    assert remove_noise(m) > 0
    _assert_same_state(m, state)


# ------------------------------------------------------------------------------------ profiles
def test_build_noise_profile_defaults_and_params():
    p = build_noise_profile({"kind": "pcm"})
    assert p["level"] == 1.0 and p["g_max"] == 25.0 and p["t0"] == 20.0 and p["drift_compensation"] is True
    assert p["t_inference"] == [86400.0] and p["eval_levels"] == [1.0] and p["name"] == "pcm"
    p = build_noise_profile(
        {"name": "drift_5pct", "kind": "drift", "level": 0.05, "params": {"compensation": False}}
    )
    assert p["compensation"] is False and p["name"] == "drift_5pct" and p["t_ref"] is None
    assert build_noise_profile(None)["kind"] == "none"
    # the config schema's layout (params dict, evaluate flag) is accepted
    p = build_noise_profile(
        {
            "name": "none",
            "kind": "none",
            "level": 0.0,
            "per_channel": False,
            "targets": None,
            "eval_levels": [0.0],
            "chips": 5,
            "t_inference": [0.0],
            "train": False,
            "train_scale": 1.0,
            "evaluate": False,
            "params": {},
        }
    )
    assert p["evaluate"] is False


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"kind": "gaussian", "level": -0.1}, "noise.level"),
        ({"kind": "gauss"}, "noise.kind"),
        ({"kind": "gaussian", "lvl": 0.1}, "noise.lvl"),
        ({"kind": "gaussian", "t_inference": 5.0}, "noise.t_inference"),
        ({"kind": "gaussian", "t_inference": [1.0, -2.0]}, r"noise.t_inference\[1\]"),
        ({"kind": "gaussian", "t_inference": ["1s"]}, r"noise.t_inference\[0\]"),
        ({"kind": "gaussian", "g_max": 25.0}, "noise.g_max"),
        ({"kind": "stuck", "level": 1.5}, "noise.level"),
        ({"kind": "stuck", "params": {"mode": "one"}}, "noise.mode"),
        ({"kind": "adc", "params": {"adc_bits": 40}}, "noise.adc_bits"),
        ({"kind": "pcm", "params": {"t0": 0}}, "noise.t0"),
        ({"kind": "drift", "params": {"t_ref": -1}}, "noise.t_ref"),
        ({"kind": "gaussian", "chips": 0}, "noise.chips"),
        ({"kind": "gaussian", "eval_levels": [0.1, -1]}, r"noise.eval_levels\[1\]"),
    ],
)
def test_invalid_profiles_name_key_value_and_allowed(cfg, key):
    with pytest.raises(NoiseConfigError, match=key) as info:
        build_noise_profile(cfg)
    assert "allowed" in str(info.value)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------ training
def test_training_noise_resamples_per_step_and_detaches():
    m = _mamba()
    state = _state(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the weights stay, so outputs compare draws
    h = attach_training_noise(m, {"kind": "gaussian", "level": 0.05}, None, seed=0, scale=2.0)
    assert h.level == pytest.approx(0.1)
    outs = []
    for step in range(3):
        h.resample(step)
        out = m(TOKENS)
        out.float().pow(2).mean().backward()
        assert m.backbone.layers[0].mixer.out_proj.parametrizations.weight.original.grad is not None
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    h.resample(1)
    assert torch.equal(m(TOKENS).detach(), outs[1]), "draws are keyed by (seed, step)"
    h.remove()
    _assert_same_state(m, state)


# ------------------------------------------------------------------------------------ Monte Carlo
def _accuracy_eval(model):
    with torch.no_grad():
        logits = model(FLOATS)
    return {
        "acc": float((logits.argmax(-1) == torch.tensor([0, 1, 2])).float().mean()),
        "logit0": float(logits[0, 0]),
    }


def test_chip_seed_is_stable():
    assert chip_seed(0, "gauss_5pct", 0.05, 1) == chip_seed(0, "gauss_5pct", 0.05, 1)
    assert chip_seed(0, "gauss_5pct", 0.05, 1) != chip_seed(0, "gauss_5pct", 0.05, 2)


def test_monte_carlo_rows_reproducible_and_clean_after():
    m = _s4d()
    state = _state(m)
    profile = {"name": "pcm_test", "kind": "pcm", "level": 1.0}
    levels, chips, times = [0.0, 1.0, 2.0], 3, [0.0, 3600.0]
    calls = []

    def evaluate(model):
        calls.append(1)
        return _accuracy_eval(model)

    rows = monte_carlo_eval(
        m, evaluate, profile, None, seed=0, levels=levels, chips=chips, t_inference=times, progress=False
    )
    assert len(calls) == (1 + 2 * chips) * len(times), "level 0 once per t, else every chip at every t"
    assert len(rows) == len(levels) * len(times) * chips
    for lv in levels:
        for t in times:
            sel = [r for r in rows if r["level"] == lv and r["t_inference"] == t]
            assert [r["chip"] for r in sel] == list(range(chips))
            if lv == 0.0:
                assert len({r["logit0"] for r in sel}) == 1 and [r["replicated"] for r in sel] == [
                    False,
                    True,
                    True,
                ]
            else:
                assert len({r["logit0"] for r in sel}) == chips
    r = rows[-1]
    assert (
        r["profile"] == "pcm_test"
        and r["status"] == "ok"
        and r["seed"] == chip_seed(0, "pcm_test", 2.0, chips - 1)
    )
    _assert_same_state(m, state)
    rows2 = monte_carlo_eval(
        m, _accuracy_eval, profile, None, seed=0, levels=levels, chips=chips, t_inference=times, progress=True
    )
    assert rows2 == rows
    rows3 = monte_carlo_eval(
        m,
        _accuracy_eval,
        profile,
        None,
        seed=1,
        levels=levels,
        chips=chips,
        t_inference=times,
        progress=False,
    )
    assert rows3 != rows

    summary = summarize_rows(rows)
    assert len(summary) == len(levels) * len(times)
    s = summary[0]
    assert s["level"] == 0.0 and s["chips"] == chips and s["acc_std"] == 0.0 and s["acc_ci95"] == 0.0
    s = summary[-1]
    vals = [r["logit0"] for r in rows if r["level"] == 2.0 and r["t_inference"] == 3600.0]
    mean = sum(vals) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    assert s["logit0_mean"] == pytest.approx(mean) and s["logit0_std"] == pytest.approx(std)
    assert s["logit0_ci95"] == pytest.approx(4.303 * std / math.sqrt(3))


def test_monte_carlo_programs_each_chip_once_per_level():
    m = _mamba()
    seen = []

    def evaluate(model):
        t = model.backbone.layers[0].mixer.out_proj.parametrizations.weight[0]
        seen.append((t.seed, t.t_inference, t.z_prog.clone() if t.z_prog is not None else None))
        return {"x": 1.0}

    monte_carlo_eval(
        m,
        evaluate,
        {"kind": "pcm"},
        None,
        seed=0,
        levels=[1.0],
        chips=2,
        t_inference=[10.0, 1e4],
        progress=False,
    )
    assert [s[1] for s in seen] == [10.0, 1e4, 10.0, 1e4]
    assert seen[0][0] == seen[1][0] != seen[2][0] == seen[3][0]


def test_monte_carlo_nan_metric_is_recorded_not_raised():
    m = _s4d()
    state = _state(m)
    count = iter(range(100))

    def evaluate(model):
        return {"loss": float("nan") if next(count) % 2 else 1.0}

    rows = monte_carlo_eval(
        m,
        evaluate,
        {"kind": "gaussian", "level": 0.1},
        None,
        seed=0,
        levels=[0.1],
        chips=4,
        t_inference=[0.0],
        progress=False,
    )
    assert [r["status"] for r in rows] == ["ok", "nan", "ok", "nan"]
    assert math.isnan(rows[1]["loss"])
    s = summarize_rows(rows)[0]
    assert s["loss_mean"] == 1.0 and s["loss_n"] == 2 and s["loss_nan"] == 2
    _assert_same_state(m, state)


# ------------------------------------------------------------------------------------ real models
def _real(module: str, cls: str):
    mod = pytest.importorskip(f"cimssm.models.{module}")
    if not hasattr(mod, cls):
        pytest.skip(f"{cls} not written yet")
    return getattr(mod, cls)


def _try_build(cls, **kwargs):
    try:
        return cls(**kwargs)
    except TypeError as e:  # constructor still changing
        pytest.skip(f"{cls.__name__}({kwargs}) failed: {e}")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p["kind"])
def test_real_s4d_noise_round_trip(profile):
    S4DModel = _real("s4d", "S4DModel")
    torch.manual_seed(0)
    m = _try_build(S4DModel, d_model=8, n_layer=1, d_state=4, task="classification", d_input=3, n_classes=5)
    m.eval()
    state = _state(m)
    with torch.no_grad():
        y = m(FLOATS)
        names = analog_targets(m, None)
        assert "layers.0.layer.kernel.A_real_tap" in names and "decoder.weight" in names
        with apply_noise(m, profile, None, seed=0):
            assert not torch.equal(m(FLOATS), y)
        assert torch.equal(m(FLOATS), y)
    _assert_same_state(m, state)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p["kind"])
def test_real_mamba_tied_head_and_round_trip(profile):
    MambaModel = _real("mamba", "MambaModel")
    torch.manual_seed(0)
    m = _try_build(MambaModel, d_model=8, n_layer=1, d_state=4, task="lm", vocab_size=11)
    m.eval()
    state = _state(m)
    with torch.no_grad():
        y = m(TOKENS)
        names = analog_targets(m, None)
        assert "lm_head.weight" in names and not any("embeddings" in n for n in names)
        with apply_noise(m, profile, None, seed=0):
            assert not torch.equal(m(TOKENS), y)
            emb = m.backbone.embeddings
            assert torch.equal(emb(TOKENS), F.embedding(TOKENS, state["backbone.embeddings.weight"]))
        assert torch.equal(m(TOKENS), y)
    _assert_same_state(m, state)


def test_real_s4d_monte_carlo():
    S4DModel = _real("s4d", "S4DModel")
    torch.manual_seed(0)
    m = _try_build(S4DModel, d_model=8, n_layer=1, d_state=4, task="classification", d_input=3, n_classes=5)
    m.eval()
    state = _state(m)
    profile = {"name": "qs4d_A", "kind": "qs4d_A", "eval_levels": [0.0, 0.01], "chips": 2}
    rows = monte_carlo_eval(m, _accuracy_eval, profile, None, seed=0, progress=False)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert rows == monte_carlo_eval(m, _accuracy_eval, profile, None, seed=0, progress=False)
    _assert_same_state(m, state)


def test_drift_5pct_profile_meaning_on_a_layer():
    lin = nn.Linear(300, 300, bias=False)
    nn.init.constant_(lin.weight, 0.3)
    model = nn.Sequential(lin)
    profile = {"name": "drift_5pct", "kind": "drift", "level": 0.05, "t_inference": [86400.0]}
    with apply_noise(model, profile, None, seed=0):
        w = lin.weight
        assert (w.std() / w.mean()).item() == pytest.approx(0.05, rel=0.03)
        assert w.mean().item() == pytest.approx(0.3, rel=1e-4)  # compensation removes the decay
    profile["params"] = {"compensation": False}
    with apply_noise(model, profile, None, seed=0):
        assert lin.weight.mean().item() == pytest.approx(
            0.3 * (86420 / 20) ** -0.05 * math.sqrt(1.0025), rel=3e-3
        )


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p["kind"])
def test_noise_after_real_quantization_and_removal_order(profile):
    quantize = pytest.importorskip("cimssm.hardware.quantize")
    if not hasattr(quantize, "apply_quantization"):
        pytest.skip("quantization not written yet")
    m = _s4d()
    m.eval()
    state = _state(m)
    with torch.no_grad():
        y_clean = m(FLOATS)
        quantize.apply_quantization(m, {"weight_bits": 6, "ssm_bits": 8, "act_bits": 8})
        y_quant = m(FLOATS)
        with apply_noise(m, profile, None, seed=0):
            assert not torch.equal(m(FLOATS), y_quant)
        assert torch.equal(m(FLOATS), y_quant), "removing noise keeps the quantizers"
        quantize.remove_quantization(m)
        assert torch.equal(m(FLOATS), y_clean)
    _assert_same_state(m, state)
