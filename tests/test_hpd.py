"""HPD (hardware/hpd.py): exact at full rank, best rank-r at truncation, analog targeting of the
factors under every noise profile, the noise reference scale, quantization, config errors."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import nn

from cimssm.config.validate import ConfigError
from cimssm.hardware.analog import analog_targets, apply_noise
from cimssm.hardware.hpd import (
    DIGITAL_PART,
    HPDConfigError,
    HPDLinear,
    analog_with_decomposition,
    apply_hpd,
    hpd_split,
    hpd_target_names,
)
from cimssm.hardware.quantize import apply_quantization
from cimssm.hardware.quantizers import UniformQuantizer
from cimssm.models.mamba import MambaModel
from cimssm.models.s4d import S4DModel


def tiny_mamba(seed: int = 0) -> MambaModel:
    torch.manual_seed(seed)
    return MambaModel(d_model=16, n_layer=2, d_state=4, vocab_size=24).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 24, (2, 9), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- the maths
def test_full_rank_reproduces_the_clean_layer():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=True)
    x = torch.randn(5, 12)
    hpd = HPDLinear.from_linear(lin)
    assert hpd.rank == 7 and hpd.analog.weight.shape == (7, 7) and hpd.digital.weight.shape == (7, 12)
    torch.testing.assert_close(hpd(x), lin(x), atol=1e-5, rtol=1e-5)
    # the factors: U·Σ has orthogonal columns of norm σ_i, Vᵀ orthonormal rows
    vt = hpd.v_t.weight.detach().double()
    torch.testing.assert_close(vt @ vt.T, torch.eye(7, dtype=torch.float64), atol=1e-5, rtol=0)
    sigma = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(hpd.u_sigma.weight.detach().double().norm(dim=0).numpy(), sigma, rtol=1e-5)


def test_truncated_rank_is_the_best_rank_r_approximation():
    torch.manual_seed(1)
    lin = nn.Linear(10, 8, bias=False)
    w = lin.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)  # independent reference (numpy)
    for r in (1, 3, 5):
        w_r = (u[:, :r] * s[:r]) @ vt[:r]
        hpd = HPDLinear.from_linear(lin, rank=r)
        np.testing.assert_allclose(hpd.weight.detach().double().numpy(), w_r, atol=1e-5)
        # Eckart–Young: the squared Frobenius error is the sum of the dropped σ²
        err = np.linalg.norm(w - hpd.weight.detach().double().numpy()) ** 2
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)
        x = torch.randn(4, 10)
        np.testing.assert_allclose(hpd(x).detach().numpy(), x.double().numpy() @ w_r.T, atol=1e-5)


def test_split_signs_are_deterministic_and_rank_checked():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    a, b = hpd_split(w), hpd_split(w.clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    pivots = b[1].gather(1, b[1].abs().argmax(1, keepdim=True))
    assert (pivots > 0).all()
    with pytest.raises(HPDConfigError, match=r"decomp.rank=5 .* 1..4"):
        hpd_split(w, rank=5)


# ----------------------------------------------------------------------------------- targeting
def test_targets_and_tied_head_is_untied_with_a_log(caplog):
    m = tiny_mamba()
    assert hpd_target_names(m, "lm_head") == ["lm_head"]
    assert hpd_target_names(m, "last_out_proj") == ["backbone.layers.1.mixer.out_proj"]
    assert len(hpd_target_names(m, "all_out_proj")) == 2
    assert hpd_target_names(m, "*.x_proj") == [
        "backbone.layers.0.mixer.x_proj",
        "backbone.layers.1.mixer.x_proj",
    ]
    with pytest.raises(HPDConfigError, match="decomp.target='nope' matches no linear layer"):
        hpd_target_names(m, "nope")
    x = tokens()
    clean = m(x)
    emb = m.backbone.embeddings.weight.detach().clone()
    assert m.tied
    with caplog.at_level(logging.WARNING, logger="cimssm"):
        apply_hpd(m, "lm_head")
    assert "unties it from backbone.embeddings.weight" in caplog.text
    assert isinstance(m.lm_head, HPDLinear) and not m.tied
    torch.testing.assert_close(m(x), clean, atol=1e-4, rtol=1e-4)
    assert torch.equal(m.backbone.embeddings.weight, emb)
    # the class's hardware_parts is untouched; the instance's names the factors
    assert "lm_head.analog.weight" in m.hardware_parts["lm_head"]["targets"]
    assert MambaModel.hardware_parts["lm_head"]["targets"] == ["lm_head.weight", "classifier.weight"]
    assert m.hardware_parts[DIGITAL_PART] == {
        "kind": "param", "category": "weight", "targets": ["lm_head.digital.weight"], "analog": False,
    }  # fmt: skip


def test_s4d_head_is_the_decoder():
    torch.manual_seed(0)
    m = S4DModel(d_model=8, n_layer=1, d_state=4, vocab_size=11).eval()
    x = torch.randint(0, 11, (2, 6))
    clean = m(x)
    assert apply_hpd(m, "lm_head") == ["decoder"]
    torch.testing.assert_close(m(x), clean, atol=1e-5, rtol=1e-5)
    with pytest.raises(HPDConfigError, match="last_out_proj"):
        apply_hpd(m, "last_out_proj")


@pytest.mark.parametrize("analog_factor", ["usigma", "vt"])
def test_only_the_analog_factor_is_analog(analog_factor):
    m = tiny_mamba()
    apply_hpd(m, "all_out_proj", analog_factor=analog_factor)
    names = analog_targets(m)
    assert "backbone.layers.1.mixer.out_proj.analog.weight" in names
    assert not any(".digital." in n for n in names)
    hpd = m.backbone.layers[1].mixer.out_proj
    analog_is = hpd.u_sigma if analog_factor == "usigma" else hpd.v_t
    assert hpd.analog is analog_is
    # the cost report (module globs) counts the digital factor as digital with the decomp globs
    from cimssm.cost import cost_report

    analog = analog_with_decomposition({}, {"method": "hpd"})
    assert analog["exclude"][:2] == ["*embeddings*", "*norm*"]
    layers = cost_report(m, analog_globs=(["*"], analog["exclude"]))["layers"]
    assert layers["backbone.layers.1.mixer.out_proj.analog"]["analog"]
    assert not layers["backbone.layers.1.mixer.out_proj.digital"]["analog"]


PROFILES = [
    {"kind": "gaussian", "level": 0.1},
    {"kind": "multiplicative", "level": 0.1},
    {"kind": "drift", "level": 0.1, "t_inference": [3600.0]},
    {"kind": "pcm", "level": 1.0},
    {"kind": "stuck", "level": 0.3, "mode": "gmax"},
]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p["kind"])
@pytest.mark.parametrize("analog_factor", ["usigma", "vt"])
def test_under_noise_only_the_analog_factor_changes(profile, analog_factor):
    m = tiny_mamba()
    apply_hpd(m, "lm_head", analog_factor=analog_factor)
    head = m.lm_head
    analog0, digital0 = head.analog.weight.detach().clone(), head.digital.weight.detach().clone()
    with apply_noise(m, profile, seed=3) as h:
        assert "lm_head.analog.weight" in h.targets and not any(".digital." in t for t in h.targets)
        assert torch.equal(head.digital.weight, digital0)
        assert not torch.equal(head.analog.weight, analog0)
    assert torch.equal(head.analog.weight, analog0)  # clean weights back bit for bit


@pytest.mark.parametrize("reference", ["factor", "original"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_noise_scale_follows_the_reference(reference, per_channel):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(12, 9))
    w = net[0].weight.detach().clone()
    apply_hpd(net, "0", noise_reference=reference)
    fac = net[0].analog.weight.detach().clone()  # U·Σ (9, r)
    level = 0.05
    with apply_noise(net, {"kind": "gaussian", "level": level, "per_channel": per_channel}, seed=0) as h:
        delta = net[0].analog.weight.detach() - fac
        eps = h.transforms[0].eps  # drawn at the first forward of the weight
    if reference == "original":
        scale = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    else:
        scale = fac.abs().amax(dim=1, keepdim=True) if per_channel else fac.abs().amax()
    torch.testing.assert_close(delta, level * scale * eps)
    assert fac.abs().amax() != w.abs().amax()  # the two references differ for this matrix


def test_pcm_maps_with_the_original_reference():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(8, 8))
    w_max = net[0].weight.detach().abs().amax()
    apply_hpd(net, "0", noise_reference="original")
    fac_max = net[0].analog.weight.detach().abs().amax()
    with apply_noise(net, {"kind": "pcm", "level": 1.0}, seed=0) as h:
        scale = h.transforms[0].tile_scale(net[0].analog.parametrizations.weight.original.detach())
    torch.testing.assert_close(scale.amax(), 25.0 / torch.maximum(w_max, fac_max))


def test_composes_with_quantization_digital_factor_at_its_own_bits():
    m = tiny_mamba()
    apply_quantization(m, {"weight_bits": 8, "act_bits": 8})
    x = tokens()
    quantized = m(x)
    apply_hpd(m, "lm_head", digital_bits=6)
    hpd = m.lm_head
    (qa,) = [t for t in hpd.analog.parametrizations.weight if isinstance(t, UniformQuantizer)]
    (qd,) = [t for t in hpd.digital.parametrizations.weight if isinstance(t, UniformQuantizer)]
    assert (qa.bits, qd.bits) == (8, 6)
    # the layer's activation quantizer moved with it
    assert hpd.hw_input is not None and any(isinstance(t, UniformQuantizer) for t in hpd.hw_input.transforms)
    out = m(x)
    assert (out - quantized).abs().max() < 0.05 * quantized.abs().max()
    with apply_noise(m, {"kind": "gaussian", "level": 0.05}, seed=1) as h:
        assert "lm_head.analog.weight" in h.targets
        assert not any(".digital." in t for t in h.targets)
    with pytest.raises(HPDConfigError, match="carries noise transforms"):
        with apply_noise(m, {"kind": "gaussian", "level": 0.05}, seed=1):
            apply_hpd(m, "last_out_proj")


# ----------------------------------------------------------------------------------- pipeline
def test_rank_larger_than_the_matrix_is_a_config_error(tiny_cfg):
    from cimssm.pipeline import build_datamodule, build_lit_module

    cfg = tiny_cfg(
        "mamba_tiny", "selective_copy", ["decomp=hpd", "decomp.target=last_out_proj", "decomp.rank=40"]
    )
    with pytest.raises(ConfigError) as err:
        build_lit_module(cfg, build_datamodule(cfg))
    msg = str(err.value)
    assert "\n" not in msg and "decomp.rank=40" in msg and "1..16" in msg


@pytest.mark.slow
def test_train_then_eval_with_hpd(tiny_cfg, tmp_path):
    from cimssm.pipeline import evaluate, train

    cfg = tiny_cfg(
        "mamba_tiny",
        "shakespeare_char",
        ["decomp=hpd", "decomp.target=lm_head", "noise=gauss_5pct", "noise.chips=2", "noise.eval_levels=[0.1]",
         "callbacks=default", "callbacks.rich_progress_bar=null"],
    )  # fmt: skip
    train(cfg)
    run = tmp_path / "run"
    cost = json.loads((run / "cost.json").read_text())["layers"]
    assert cost["lm_head.analog"]["analog"] and not cost["lm_head.digital"]["analog"]
    assert (run / "noise_eval_summary.csv").is_file()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            "eval",
            [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "decomp=hpd", "decomp.target=all_out_proj",
             "decomp.rank=8", "noise=gauss_5pct", "noise.chips=2", "noise.eval_levels=[0.1]", "limit_batches=2"],
        )  # fmt: skip
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "eval")
    metrics = evaluate(ecfg)
    assert "noise/ppl@0.1_t0" in metrics
    cost = json.loads((tmp_path / "eval" / "cost.json").read_text())["layers"]
    assert not cost["backbone.layers.0.mixer.out_proj.digital"]["analog"]


@pytest.mark.slow
def test_hf_checkpoint_through_train_and_eval(tiny_cfg, tmp_path):
    """model=mamba_hf model.path=...: train.py and eval.py (with HPD) on a tiny HF-format checkpoint."""
    from test_hf_import import CONFIG, _hf_tensors, _write

    from cimssm.pipeline import evaluate, train

    hf = _write(tmp_path / "hf", {**CONFIG, "vocab_size": 80}, _hf_tensors({**CONFIG, "vocab_size": 80}))
    cfg = tiny_cfg(
        "mamba_hf",
        "shakespeare_char",
        [f"model.path={hf}", "decomp=hpd", "decomp.target=lm_head", "callbacks=default",
         "callbacks.rich_progress_bar=null"],
    )  # fmt: skip
    train(cfg)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            "eval",
            [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "decomp=hpd",
             "decomp.target=last_out_proj", "limit_batches=1"],
        )  # fmt: skip
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "eval")
    assert math.isfinite(evaluate(ecfg)["test/loss"])
    small = tiny_cfg(
        "mamba_hf",
        "shakespeare_char",
        [f"model.path={_write(tmp_path / 'hf8', CONFIG, _hf_tensors(CONFIG))}"],
    )
    with pytest.raises(ConfigError, match="vocabulary \\(40 tokens\\) is smaller"):
        train(small)
