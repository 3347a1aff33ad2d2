"""cost_report: memory, MACs, tiles, ACE (QS4D formula, checked by hand) and energy."""

import json
import math

import pytest
import torch
from torch import nn

from cimssm.cost import DEFAULT_ENERGIES, cost_report, write_cost_json
from cimssm.hardware.quantize import apply_quantization, resolve_parts

# ---- toy models (structure only: the cost report never runs a forward) -------------------------


class Kernel(nn.Module):
    def __init__(self, H, N):
        super().__init__()
        self.log_A_real = nn.Parameter(torch.zeros(H, N // 2))
        self.A_imag = nn.Parameter(torch.ones(H, N // 2))
        self.C = nn.Parameter(torch.ones(H, N // 2, 2))
        self.log_dt = nn.Parameter(torch.zeros(H))
        self.A_real_tap, self.A_imag_tap = nn.Identity(), nn.Identity()
        self.C_tap, self.log_dt_tap = nn.Identity(), nn.Identity()


class S4DLikeLayer(nn.Module):
    def __init__(self, H, N):
        super().__init__()
        self.kernel = Kernel(H, N)
        self.D = nn.Parameter(torch.ones(H))
        self.input_tap, self.kernel_tap = nn.Identity(), nn.Identity()
        self.mixing = nn.Sequential(nn.Conv1d(H, 2 * H, 1), nn.GLU(dim=-2))


class Block(nn.Module):
    def __init__(self, H, N):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.layer = S4DLikeLayer(H, N)


class S4DLike(nn.Module):
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

    def __init__(self, d_input=3, H=6, N=4, n_layer=2, n_out=5):
        super().__init__()
        self.encoder = nn.Linear(d_input, H)
        self.layers = nn.ModuleList(Block(H, N) for _ in range(n_layer))
        self.decoder = nn.Linear(H, n_out)


class Mixer(nn.Module):
    def __init__(self, D, E, N, R, k):
        super().__init__()
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, k, groups=E, padding=k - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.A_log = nn.Parameter(torch.zeros(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=False)
        self.A_tap, self.state_tap = nn.Identity(), nn.Identity()


class MambaLayer(nn.Module):
    def __init__(self, *a):
        super().__init__()
        self.norm = nn.LayerNorm(a[0])
        self.mixer = Mixer(*a)


class Backbone(nn.Module):
    def __init__(self, vocab, D, E, N, R, k, n_layer):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList(MambaLayer(D, E, N, R, k) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(D)


class MambaLike(nn.Module):
    hardware_parts = {
        "embeddings": {"kind": "param", "category": "weight", "targets": ["backbone.embeddings.weight"]},
        "lm_head": {"kind": "param", "category": "weight", "targets": ["lm_head.weight"]},
        **{
            p: {"kind": "param", "category": "weight", "targets": [f"backbone.layers.*.mixer.{p}.weight"]}
            for p in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
        },
        "A": {"kind": "tap", "category": "ssm", "targets": ["backbone.layers.*.mixer.A_tap"]},
        "D": {"kind": "param", "category": "ssm", "targets": ["backbone.layers.*.mixer.D"]},
        "activations": {
            "kind": "input",
            "category": "act",
            "targets": ["backbone.layers.*.mixer", "lm_head"],
        },
    }

    def __init__(self, vocab=11, D=8, E=16, N=4, R=2, k=3, n_layer=2):
        super().__init__()
        self.backbone = Backbone(vocab, D, E, N, R, k, n_layer)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight


SPEC = {"weight_bits": 6, "ssm_bits": 4, "act_bits": 8, "parts": {"A_imag": {"bits": 5}, "C": {"bits": 3}}}


# ---- S4D --------------------------------------------------------------------------------------


def test_s4d_ace_matches_the_formula_by_hand():
    H, N, n_layer = 6, 4, 2
    model = S4DLike(H=H, N=N, n_layer=n_layer)
    r = cost_report(model, SPEC)
    # QS4D: ACE = H·N·(r_A + r_B + r_C)·r_act + H²·r_act·r_lin, B folded into C: r_B = r_C.
    r_A, r_C, r_act, r_lin = 5, 3, 8, 6  # r_A = max(A_real 4, A_imag 5)
    per_layer = H * N * (r_A + r_C + r_C) * r_act + H * H * r_act * r_lin
    assert per_layer == 3840
    layer = r["layers"]["layers.0.layer"]
    assert (layer["H"], layer["N"], layer["r_A"], layer["r_B"], layer["r_C"]) == (H, N, 5, 3, 3)
    assert layer["ace"] == per_layer
    assert r["total"]["ace"] == n_layer * per_layer
    fp32_per_layer = H * N * (32 * 3) * 32 + H * H * 32 * 32
    assert r["fp32_total"]["ace"] == n_layer * fp32_per_layer
    assert r["ratio_vs_fp32"]["ace"] == pytest.approx(per_layer / fp32_per_layer)


def test_s4d_params_memory_macs_tiles():
    H, N, d_in, n_out = 6, 4, 3, 5
    model = S4DLike(d_input=d_in, H=H, N=N, n_layer=2, n_out=n_out)
    r = cost_report(model, SPEC, analog_globs=(["layers.*", "encoder"], ["encoder"]), tile_size=4)
    L = r["layers"]
    assert r["total"]["params"] == sum(p.numel() for p in model.parameters())
    # encoder: weight at 6 bit, bias float
    assert L["encoder"]["memory_bytes"] == d_in * H * 6 / 8 + H * 4
    # SSM params: through taps (log_A_real 4, A_imag 5, C 3, log_dt 4 bit); D float
    N2 = N // 2
    assert (
        L["layers.0.layer"]["memory_bytes"] == (H * N2 * 4 + H * N2 * 5 + H * N2 * 2 * 3 + H * 4 + H * 32) / 8
    )
    assert L["layers.0.norm"]["role"] == "other" and L["layers.0.norm"]["memory_bytes"] == 2 * H * 4
    # MACs per token
    assert L["encoder"]["macs_per_token"] == d_in * H and not L["encoder"]["analog"]
    assert L["layers.0.layer.mixing.0"]["macs_per_token"] == H * 2 * H
    assert L["layers.0.layer.mixing.0"]["analog"] and not L["decoder"]["analog"]
    assert L["layers.0.layer"]["macs_per_token"] == 4 * H * N + H
    assert r["total"]["analog_macs_per_token"] == 2 * 2 * H * H
    assert r["total"]["macs_per_token"] == d_in * H + 2 * (2 * H * H + 4 * H * N + H) + H * n_out
    # tiles: mixing is rows H = 6 x cols 2H = 12 at t = 4
    assert L["layers.0.layer.mixing.0"]["tiles"] == math.ceil(6 / 4) * math.ceil(12 / 4) == 6
    assert r["total"]["tiles"] == 12
    assert L["layers.0.layer.mixing.0"]["dac_per_token"] == 6 * 3
    assert L["layers.0.layer.mixing.0"]["adc_per_token"] == 12 * 2


def test_memory_ratio_of_all_8_bit_weights():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(10, 7, bias=False))
    model.hardware_parts = {"fc": {"kind": "param", "category": "weight", "targets": ["fc.weight"]}}
    r = cost_report(model, {"weight_bits": 8})
    assert r["total"]["memory_bytes"] == 70
    assert r["ratio_vs_fp32"]["memory_bytes"] == 0.25
    assert r["ratio_vs_fp32"]["macs_per_token"] == 1.0


def test_energy_by_hand():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(10, 7, bias=False))
    model.hardware_parts = {
        "fc": {"kind": "param", "category": "weight", "targets": ["fc.weight"]},
        "act": {"kind": "input", "category": "act", "targets": ["fc"]},
    }
    e = {"analog_mac_pj": 0.05, "adc_pj": 2.0, "dac_pj": 0.5, "digital_mac_8bit_pj": 0.2}
    analog = cost_report(model, {"weight_bits": 4, "act_bits": 6}, tile_size=4, energies=e, seq_len=3)
    tiles, adc, dac = 3 * 2, 7 * 3, 10 * 2  # rows 10, cols 7 at t = 4
    assert analog["total"]["tiles"] == tiles
    expect = 70 * 0.05 + adc * 2.0 + dac * 0.5
    assert analog["total"]["energy_pj_per_token"] == pytest.approx(expect)
    assert analog["total"]["energy_pj_per_sequence"] == pytest.approx(3 * expect)
    digital = cost_report(model, {"weight_bits": 4, "act_bits": 6}, analog_globs=([], []), energies=e)
    # digital MAC at max(weight, act) = 6 bit, scaled (bits/8)^2 from the 8-bit energy
    assert digital["total"]["energy_pj_per_token"] == pytest.approx(70 * 0.2 * (6 / 8) ** 2)
    assert digital["fp32_total"]["energy_pj_per_token"] == pytest.approx(70 * 0.2 * 16)
    assert digital["energies"]["adc_pj"] == 2.0 and digital["energies"]["digital_bits_exponent"] == 2.0
    with pytest.raises(ValueError, match="adc"):
        cost_report(model, None, energies={"adc": 1.0})


def test_quant_forms_agree_and_attached_quantizers_are_read():
    model = S4DLike()
    by_spec = cost_report(model, SPEC)
    by_resolved = cost_report(model, resolve_parts(model, SPEC))
    assert by_spec["total"] == by_resolved["total"]
    apply_quantization(model, SPEC)
    by_model = cost_report(model)
    assert by_model["total"] == by_spec["total"]
    parts = cost_report(S4DLike(), {"decoder": 4})
    assert parts["layers"]["decoder"]["bits"] == 4 and parts["layers"]["encoder"]["bits"] == 32
    fp = cost_report(S4DLike())
    assert fp["total"] == fp["fp32_total"]
    assert all(v == 1.0 for v in fp["ratio_vs_fp32"].values() if v is not None)


def test_write_cost_json(tmp_path):
    r = cost_report(S4DLike(), SPEC, seq_len=16)
    path = write_cost_json(r, tmp_path / "sub" / "cost.json")
    back = json.loads(path.read_text())
    assert back["total"]["ace"] == r["total"]["ace"] and back["seq_len"] == 16
    assert set(DEFAULT_ENERGIES) == set(back["energies"])


# ---- Mamba ------------------------------------------------------------------------------------


def test_mamba_ace_and_tied_weights():
    vocab, D, E, N, R, k, n_layer = 11, 8, 16, 4, 2, 3, 2
    model = MambaLike(vocab, D, E, N, R, k, n_layer)
    spec = {"weight_bits": 6, "ssm_bits": 5, "act_bits": 8, "parts": {"out_proj": {"bits": 4}}}
    r = cost_report(model, spec)
    r_act, r_A = 8, 5
    weights = {"in_proj": (D * 2 * E, 6), "conv1d": (E * k, 6), "x_proj": (E * (R + 2 * N), 6),
               "dt_proj": (R * E, 6), "out_proj": (E * D, 4)}  # fmt: skip
    # ACE = Σ rows·cols·r_W·r_act + E·N·(r_A + r_B + r_C)·r_act, r_B = r_C = r_act
    per_layer = sum(n * b * r_act for n, b in weights.values()) + E * N * (r_A + r_act + r_act) * r_act
    mixer = r["layers"]["backbone.layers.0.mixer"]
    assert mixer["ace"] == per_layer and r["total"]["ace"] == n_layer * per_layer
    assert mixer["macs_per_token"] == 4 * E * N + E
    assert r["layers"]["backbone.layers.0.mixer.conv1d"]["macs_per_token"] == E * k
    assert r["layers"]["backbone.layers.0.mixer.in_proj"]["macs_per_token"] == D * 2 * E
    # tied embedding / lm_head weight counted once
    assert r["total"]["params"] == sum(p.numel() for p in model.parameters())
    assert r["layers"]["backbone.embeddings"]["memory_bytes"] == vocab * D * 6 / 8
    assert "params" not in r["layers"]["lm_head"] or r["layers"]["lm_head"]["params"] == 0
    assert r["layers"]["lm_head"]["macs_per_token"] == D * vocab


# ---- tiny real models -------------------------------------------------------------------------


def test_real_s4d_ace():
    s4d = pytest.importorskip("cimssm.models.s4d")
    H, N = 8, 4
    model = s4d.S4DModel(d_model=H, n_layer=2, d_state=N, d_input=3, n_classes=5, task="lm")
    r = cost_report(model, {"weight_bits": 8, "ssm_bits": 6, "act_bits": 7})
    per_layer = H * N * (6 + 6 + 6) * 7 + H * H * 7 * 8
    assert r["layers"]["layers.0.layer"]["ace"] == per_layer
    assert r["total"]["ace"] == 2 * per_layer
    assert r["total"]["params"] == sum(p.numel() for p in model.parameters())


def test_real_mamba_cost():
    mamba = pytest.importorskip("cimssm.models.mamba")
    model = mamba.MambaModel(d_model=8, n_layer=1, d_state=4, vocab_size=11, task="lm")
    r = cost_report(model, {"weight_bits": 8, "ssm_bits": 8, "act_bits": 8})
    mixer = model.backbone.layers[0].mixer
    E, N = mixer.A_log.shape
    entry = r["layers"]["backbone.layers.0.mixer"]
    ws = [getattr(mixer, n).weight.numel() for n in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")]
    assert entry["ace"] == sum(w * 8 * 8 for w in ws) + E * N * (8 + 8 + 8) * 8
    assert r["total"]["params"] == sum(p.numel() for p in model.parameters())
