"""apply_quantization / resolve_parts / calibrate / export on toy models that follow the contract
(docs/architecture.md: ``hardware_parts``, nn.Identity taps) and on tiny real models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cimssm.hardware.core import attach_param_transform
from cimssm.hardware.export import dequantize, export_quantized, load_quantized
from cimssm.hardware.quantize import (
    QuantSpec,
    apply_quantization,
    calibrate,
    is_quantized,
    quantizers,
    remove_quantization,
    resolve_parts,
)
from cimssm.hardware.quantizers import QuantConfigError, UniformQuantizer

# ---- toy models -------------------------------------------------------------------------------


class ToyKernel(nn.Module):
    def __init__(self, H, N):
        super().__init__()
        self.log_A_real = nn.Parameter(torch.log(0.5 + 0.2 * torch.rand(H, N // 2)))
        self.A_imag = nn.Parameter(
            math.pi * torch.arange(N // 2).float().repeat(H, 1) + 0.3 * torch.rand(H, N // 2)
        )
        self.C = nn.Parameter(torch.randn(H, N // 2, 2) * 0.5)
        self.log_dt = nn.Parameter(torch.linspace(math.log(1e-2), math.log(1e-1), H))
        self.A_real_tap, self.A_imag_tap = nn.Identity(), nn.Identity()
        self.C_tap, self.log_dt_tap = nn.Identity(), nn.Identity()

    def forward(self, L):
        A = torch.complex(self.A_real_tap(-torch.exp(self.log_A_real)), self.A_imag_tap(self.A_imag))
        C = torch.view_as_complex(self.C_tap(self.C).contiguous())
        dtA = A * torch.exp(self.log_dt_tap(self.log_dt)).unsqueeze(-1)  # (H, N/2)
        CB = C * (torch.exp(dtA) - 1) / A
        return 2 * torch.einsum("hn,hnl->hl", CB, torch.exp(dtA.unsqueeze(-1) * torch.arange(L))).real


class ToyS4DLayer(nn.Module):
    def __init__(self, H, N):
        super().__init__()
        self.kernel = ToyKernel(H, N)
        self.D = nn.Parameter(torch.randn(H))
        self.input_tap, self.kernel_tap = nn.Identity(), nn.Identity()
        self.mixing = nn.Sequential(nn.Conv1d(H, 2 * H, 1), nn.GLU(dim=-2))

    def forward(self, x):  # (B, L, H)
        u = self.input_tap(x.transpose(-1, -2))  # (B, H, L)
        L = u.shape[-1]
        K = self.kernel_tap(self.kernel(L))
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]
        y = F.gelu(y + u * self.D.unsqueeze(-1))
        return self.mixing(y).transpose(-1, -2)


class ToyBlock(nn.Module):
    def __init__(self, H, N):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.layer = ToyS4DLayer(H, N)

    def forward(self, x):
        return x + self.layer(self.norm(x))


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
        # Only in token-input models: a float-input model has no match.
        "embeddings": {"kind": "param", "category": "weight", "targets": ["embeddings.weight"]},
    }

    def __init__(self, d_input=3, H=8, N=4, n_layer=2, n_out=5):
        super().__init__()
        self.encoder = nn.Linear(d_input, H)
        self.layers = nn.ModuleList(ToyBlock(H, N) for _ in range(n_layer))
        self.decoder = nn.Linear(H, n_out)

    def forward(self, x):
        h = self.encoder(x)
        for block in self.layers:
            h = block(h)
        return self.decoder(h)


class ToyMixer(nn.Module):
    def __init__(self, D, E, N, R=2, k=3):
        super().__init__()
        self.E, self.N, self.R = E, N, R
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, k, groups=E, padding=k - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float().repeat(E, 1)))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=False)
        self.A_tap, self.state_tap = nn.Identity(), nn.Identity()

    def forward(self, x):  # (B, L, D)
        L = x.shape[1]
        xz = self.in_proj(x)
        u, z = xz.chunk(2, dim=-1)  # (B, L, E)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :L].transpose(1, 2))
        dt, Bm, Cm = self.x_proj(u).split([self.R, self.N, self.N], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, E)
        A = self.A_tap(-torch.exp(self.A_log))  # (E, N)
        h = x.new_zeros(x.shape[0], self.E, self.N)
        ys = []
        for t in range(L):
            h = (
                torch.exp(dt[:, t, :, None] * A) * h
                + dt[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
            )
            h = self.state_tap(h)
            ys.append((h * Cm[:, t, None, :]).sum(-1) + self.D * u[:, t])
        y = torch.stack(ys, 1) * F.silu(z)
        return self.out_proj(y)


class ToyMambaLayer(nn.Module):
    def __init__(self, D, E, N):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mixer = ToyMixer(D, E, N)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class ToyBackbone(nn.Module):
    def __init__(self, vocab, D, E, N, n_layer):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList(ToyMambaLayer(D, E, N) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(D)


class ToyMamba(nn.Module):
    hardware_parts = {
        "embeddings": {"kind": "param", "category": "weight", "targets": ["backbone.embeddings.weight"]},
        "lm_head": {"kind": "param", "category": "weight", "targets": ["lm_head.weight"]},
        **{
            p: {"kind": "param", "category": "weight", "targets": [f"backbone.layers.*.mixer.{p}.weight"]}
            for p in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
        },
        "A": {"kind": "tap", "category": "ssm", "targets": ["backbone.layers.*.mixer.A_tap"]},
        "D": {"kind": "param", "category": "ssm", "targets": ["backbone.layers.*.mixer.D"]},
        "scan_state": {"kind": "tap", "category": "ssm", "targets": ["backbone.layers.*.mixer.state_tap"]},
        "activations": {
            "kind": "input",
            "category": "act",
            "targets": ["backbone.layers.*.mixer", "lm_head", "classifier"],
        },
    }

    def __init__(self, vocab=11, D=8, E=16, N=4, n_layer=1):
        super().__init__()
        self.backbone = ToyBackbone(vocab, D, E, N, n_layer)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight  # tied

    def forward(self, ids):
        h = self.backbone.embeddings(ids)
        for layer in self.backbone.layers:
            h = layer(h)
        return self.lm_head(self.backbone.norm_f(h))


def _s4d(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyS4D(**kw).eval()


def _x(seed=1, B=2, L=16, d=3):
    return torch.randn(B, L, d, generator=torch.Generator().manual_seed(seed))


W8A8 = {"weight_bits": 8, "act_bits": 8, "ssm_bits": 8}
ALL2 = {"weight_bits": 2, "act_bits": 2, "ssm_bits": 2}
ALL_NONE = {"weight_bits": None, "act_bits": None, "ssm_bits": None, "parts": {"decoder": {"bits": None}}}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- spec and resolution ----------------------------------------------------------------------


def test_spec_from_dict_and_errors():
    spec = QuantSpec.from_dict({"mode": "ptq", "weight_bits": 4, "parts": {"mixing": {"bits": 6}}})
    assert spec.weight_bits == 4 and spec.default_scale == "running" and spec.parts["mixing"]["bits"] == 6
    assert QuantSpec.from_dict(None).weight_bits is None
    with pytest.raises(QuantConfigError, match="wieght_bits"):
        QuantSpec.from_dict({"wieght_bits": 8})
    with pytest.raises(QuantConfigError, match="mode"):
        QuantSpec.from_dict({"mode": "int8"})
    with pytest.raises(QuantConfigError, match=r"quant.act_bits.*1\.\.16.*got 0"):
        QuantSpec.from_dict({"act_bits": 0})
    with pytest.raises(QuantConfigError, match=r"quant.parts.C.bits.*got 20"):
        QuantSpec.from_dict({"parts": {"C": {"bits": 20}}})
    with pytest.raises(QuantConfigError, match="unknown key"):
        QuantSpec.from_dict({"parts": {"C": {"bitz": 4}}})


def test_spec_accepts_omegaconf():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"weight_bits": 8, "parts": {"C": {"bits": 4}}})
    spec = QuantSpec.from_dict(cfg)
    assert spec.parts == {"C": {"bits": 4}} and type(spec.parts["C"]) is dict


def test_resolve_parts_shorthands_overrides_and_half_levels():
    model = _s4d()
    spec = {
        "weight_bits": 8,
        "ssm_bits": 8,
        "act_bits": 6,
        "parts": {"decoder": {"bits": 4}, "C": {"bits": None}},
    }
    r = resolve_parts(model, spec)
    assert r["encoder"].bits == 8 and r["decoder"].bits == 4 and r["C"].bits is None
    assert r["activations"].bits == 6 and r["activations"].matched == (
        "layers.0.layer",
        "layers.1.layer",
        "decoder",
    )
    assert r["ssm_input"].levels == 128 and r["ssm_input"].bits == 7  # half the levels of 8 bit
    assert r["mixing"].matched == ("layers.0.layer.mixing.0.weight", "layers.1.layer.mixing.0.weight")
    assert r["embeddings"].matched == ()  # shorthand, no match: left alone


def test_unknown_part_is_an_error_listing_parts():
    with pytest.raises(QuantConfigError, match="lm_head") as err:
        resolve_parts(_s4d(), {"parts": {"lm_head": {"bits": 8}}})
    assert "encoder" in str(err.value) and "ssm_input" in str(err.value)


def test_explicit_bits_on_unmatched_glob_is_an_error():
    with pytest.raises(QuantConfigError, match=r"embeddings\.weight"):
        apply_quantization(_s4d(), {"parts": {"embeddings": {"bits": 8}}})
    # through the shorthand it is skipped
    assert "param:embeddings.weight" not in apply_quantization(_s4d(), {"weight_bits": 8})


def test_channel_granularity_of_activations_needs_ch_axis():
    with pytest.raises(QuantConfigError, match="ch_axis"):
        resolve_parts(_s4d(), {"act_bits": 8, "parts": {"activations": {"granularity": "channel"}}})
    r = resolve_parts(
        _s4d(), {"act_bits": 8, "parts": {"activations": {"granularity": "channel", "ch_axis": -1}}}
    )
    assert r["activations"].ch_axis == -1


# ---- apply ------------------------------------------------------------------------------------


def test_all_none_spec_is_bit_identical_and_keeps_state_dict_keys():
    model = _s4d()
    x = _x()
    y0, keys = model(x), list(model.state_dict())
    assert apply_quantization(model, ALL_NONE) == []
    assert apply_quantization(model, {}) == []
    assert not is_quantized(model)
    assert torch.equal(model(x), y0) and list(model.state_dict()) == keys


def test_w8a8_close_to_float_and_2bit_is_not():
    model, x = _s4d(), _x()
    y0 = model(x)
    attached = apply_quantization(model, W8A8)
    assert "param:encoder.weight" in attached and "tap:layers.1.layer.kernel_tap" in attached
    assert "input:decoder" in attached and is_quantized(model)
    assert _rel(model(x), y0) < 0.03
    remove_quantization(model)
    assert not is_quantized(model) and torch.equal(model(x), y0)  # clean weights restored bit for bit
    apply_quantization(model, ALL2)
    assert _rel(model(x), y0) > 0.2


def test_every_part_alone_changes_the_output():
    model, x = _s4d(), _x()
    y0 = model(x)
    for part in ToyS4D.hardware_parts:
        if part == "embeddings":
            continue
        apply_quantization(model, {"parts": {part: {"bits": 2}}})
        assert not torch.equal(model(x), y0), part
        assert remove_quantization(model) > 0


def test_double_apply_is_refused():
    model = _s4d()
    apply_quantization(model, W8A8)
    with pytest.raises(QuantConfigError, match="already quantized"):
        apply_quantization(model, W8A8)


def test_per_channel_weights_have_one_scale_per_output_channel():
    model = _s4d()
    apply_quantization(model, {"weight_bits": 4, "granularity": "channel", "scale": "running"})
    q = model.layers[0].layer.mixing[0].parametrizations.weight[0]
    assert isinstance(q, UniformQuantizer) and q.running_max.shape == (16,)
    w = model.layers[0].layer.mixing[0].parametrizations.weight.original
    assert torch.allclose(q.running_max, w.abs().amax(dim=(1, 2)))


def test_qat_gradients_reach_clean_weights():
    model, x = _s4d(), _x()
    apply_quantization(model, {**W8A8, "scale": "learned"})
    model.train()
    model(x).square().mean().backward()
    enc = model.encoder.parametrizations.weight
    assert enc.original.grad is not None and enc.original.grad.abs().sum() > 0
    assert model.layers[0].layer.kernel.log_A_real.grad.abs().sum() > 0
    clips = [q.clip_max for q in quantizers(model)]
    assert clips and all(c.grad is not None for c in clips)


def test_ptq_calibrate_then_frozen():
    model = _s4d()
    batches = [_x(seed=s) for s in range(5)]
    y0 = model(batches[0])
    apply_quantization(model, {"mode": "ptq", **W8A8})
    act = model.decoder.hw_input.transforms[0]
    assert act.scale_mode == "running" and not bool(act.initialized)
    n = calibrate(model, batches, num_batches=3)
    assert n == 3 and not model.training
    assert bool(act.initialized) and bool(act.frozen) and not act.calibrating
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(_x(seed=99) * 10)  # neither training mode nor large inputs move a frozen range
    model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert _rel(model(batches[0]), y0) < 0.05


def test_quantizers_follow_the_model_mode():
    model = _s4d()  # eval
    apply_quantization(model, {"mode": "ptq", **W8A8})
    assert all(not q.training for q in quantizers(model))
    model(_x())  # an eval forward before calibration does not set running ranges
    assert not bool(model.decoder.hw_input.transforms[0].initialized)
    model.train()
    assert all(q.training for q in quantizers(model))


def test_calibrate_running_max_is_max_over_batches():
    model = _s4d()
    apply_quantization(model, {"mode": "ptq", "parts": {"activations": {"bits": 8}}})
    batches = [(_x(seed=s), None) for s in range(3)]
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    calibrate(model, batches)  # tuples: model(batch[0])
    hook.remove()
    assert model.decoder.hw_input.transforms[0].running_max.item() == pytest.approx(max(seen).item())


@pytest.mark.parametrize("scale", ["max", "running", "learned"])
def test_state_dict_round_trip_gives_identical_quantized_outputs(scale):
    spec = {**W8A8, "scale": scale, "granularity": "channel", "weight_bits": 4}
    model, x = _s4d(seed=0), _x()
    apply_quantization(model, spec)
    model.train()
    model(x)  # running ranges move, learned clips initialise
    model.eval()
    y = model(x)
    fresh = _s4d(seed=5)
    apply_quantization(fresh, spec)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), y)


def test_tied_lm_head_quantization_leaves_embedding_lookup_clean():
    torch.manual_seed(0)
    model = ToyMamba().eval()
    emb = model.backbone.embeddings
    assert model.lm_head.weight is emb.weight
    clean = emb.weight.detach().clone()
    ids = torch.randint(0, 11, (2, 6))
    apply_quantization(model, {"parts": {"lm_head": {"bits": 2}}})
    original = model.lm_head.parametrizations.weight.original
    assert original is emb.weight  # still the same Parameter
    assert torch.equal(emb(ids), F.embedding(ids, clean))  # lookup uses the clean tensor
    assert not torch.equal(model.lm_head.weight, clean)  # the head sees the quantized one
    assert torch.equal(emb.weight, clean)
    remove_quantization(model)
    assert model.lm_head.weight is emb.weight


def test_toy_mamba_w8a8_close_2bit_not():
    torch.manual_seed(0)
    model = ToyMamba().eval()
    ids = torch.randint(0, 11, (2, 6))
    y0 = model(ids)
    spec = {**W8A8, "parts": {"scan_state": {"bits": None}}}
    apply_quantization(model, spec)
    assert _rel(model(ids), y0) < 0.03
    remove_quantization(model)
    apply_quantization(model, ALL2)
    assert _rel(model(ids), y0) > 0.2


def test_quantizer_composes_with_a_later_transform():
    model = _s4d()
    apply_quantization(model, {"parts": {"decoder": {"bits": 4}}})
    attach_param_transform(model, "decoder.weight", nn.Identity())
    assert remove_quantization(model) == 1
    assert len(model.decoder.parametrizations.weight) == 1


# ---- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_export_round_trip(tmp_path, suffix, symmetric):
    model = _s4d()
    apply_quantization(model, {**W8A8, "weight_bits": 4, "symmetric": symmetric, "granularity": "channel",
                               "parts": {"decoder": {"bits": 12, "granularity": "tensor"}}})  # fmt: skip
    path = tmp_path / f"q{suffix}"
    summary = export_quantized(model, path)
    tensors = load_quantized(path)
    assert json.loads((tmp_path / f"q{suffix}.json").read_text()) == summary
    assert set(summary["weights"]) == {"encoder.weight", "decoder.weight",
                                       "layers.0.layer.mixing.0.weight", "layers.1.layer.mixing.0.weight"}  # fmt: skip
    assert summary["runtime_quantizers"]  # taps and inputs are listed, not stored
    for name, info in summary["weights"].items():
        codes = tensors[f"{name}.int"]
        assert codes.element_size() == (2 if info["bits"] > 8 else 1) and not codes.is_floating_point()
        assert tensors[f"{name}.bits"].item() == info["bits"]
        w = model.get_parameter(name.replace(".weight", ".parametrizations.weight.original"))
        owner = model.get_submodule(name.rpartition(".")[0])
        assert torch.allclose(dequantize(tensors, name), owner.weight.detach(), atol=1e-6), name
        assert not torch.equal(owner.weight, w)
    assert summary["weights"]["decoder.weight"]["granularity"] == "tensor"
    assert tensors["encoder.weight.scale"].shape == (8,)
    with pytest.raises(FileExistsError, match="q"):
        export_quantized(model, path)


def test_export_without_quantized_weights(tmp_path):
    with pytest.raises(ValueError, match="no quantized weights"):
        export_quantized(_s4d(), tmp_path / "q.safetensors")


# ---- tiny real models -------------------------------------------------------------------------


def _real_s4d():
    s4d = pytest.importorskip("cimssm.models.s4d")
    torch.manual_seed(0)
    return s4d.S4DModel(d_model=8, n_layer=2, d_state=4, d_input=3, n_classes=5, task="lm").eval()


def test_real_s4d_quantization():
    model, x = _real_s4d(), _x()
    y0, keys = model(x), list(model.state_dict())
    assert apply_quantization(model, ALL_NONE) == []
    assert torch.equal(model(x), y0) and list(model.state_dict()) == keys
    assert resolve_parts(model, W8A8)["ssm_input"].levels == 128
    attached = apply_quantization(model, W8A8)
    assert len(attached) == 2 + 2 + 6 * 2 + 3  # encoder, decoder, mixing ×2, six taps ×2, inputs
    assert _rel(model(x), y0) < 0.03
    sd = model.state_dict()
    y8 = model(x)
    fresh = _real_s4d()
    apply_quantization(fresh, W8A8)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y8)
    remove_quantization(model)
    assert torch.equal(model(x), y0)
    apply_quantization(model, ALL2)
    assert _rel(model(x), y0) > 0.2


def test_real_s4d_ptq_calibrate():
    model = _real_s4d()
    apply_quantization(model, {"mode": "ptq", **W8A8})
    calibrate(model, [_x(seed=s) for s in range(2)])
    assert all(bool(q.frozen) for q in quantizers(model))


def _real_mamba():
    mamba = pytest.importorskip("cimssm.models.mamba")
    torch.manual_seed(0)
    return mamba.MambaModel(d_model=8, n_layer=1, d_state=4, vocab_size=11, task="lm").eval()


def test_real_mamba_quantization_and_tied_head():
    model = _real_mamba()
    ids = torch.randint(0, 11, (2, 6))
    y0, keys = model(ids), list(model.state_dict())
    assert apply_quantization(model, {**ALL_NONE, "parts": {"lm_head": {"bits": None}}}) == []
    assert torch.equal(model(ids), y0) and list(model.state_dict()) == keys
    spec = {**W8A8, "parts": {"scan_state": {"bits": None}}}
    attached = apply_quantization(model, spec)
    assert "param:lm_head.weight" in attached and "tap:backbone.layers.0.mixer.A_tap" in attached
    assert _rel(model(ids), y0) < 0.05
    remove_quantization(model)
    assert torch.equal(model(ids), y0)
    emb = model.backbone.embeddings
    if model.lm_head.weight is emb.weight:
        clean = emb.weight.detach().clone()
        apply_quantization(model, {"parts": {"lm_head": {"bits": 2}}})
        assert model.lm_head.parametrizations.weight.original is emb.weight
        assert torch.equal(emb(ids), F.embedding(ids, clean))
        remove_quantization(model)
    apply_quantization(model, ALL2)
    assert _rel(model(ids), y0) > 0.2


@pytest.mark.parametrize("scale", ["running", "learned"])
def test_export_round_trip_of_trained_scales(tmp_path, scale):
    model, x = _s4d(), _x()
    spec = {"weight_bits": 5, "symmetric": False, "granularity": "channel", "scale": scale}
    apply_quantization(model, spec)
    model.train()
    model(x).sum().backward()
    with torch.no_grad():
        for q in quantizers(model):
            if scale == "learned":
                q.clip_max.mul_(0.7)  # clip inside the weights
    model.eval()
    export_quantized(model, tmp_path / "w.safetensors")
    tensors = load_quantized(tmp_path / "w.safetensors")
    assert torch.allclose(dequantize(tensors, "encoder.weight"), model.encoder.weight.detach(), atol=1e-6)
    assert torch.allclose(dequantize(tensors, "decoder.weight"), model.decoder.weight.detach(), atol=1e-6)
