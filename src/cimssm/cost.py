"""Hardware cost of a (quantized) model: memory, MACs per token, crossbar tiles, ACE and energy.

``cost_report`` walks the model once and makes one entry per matrix layer (``nn.Linear``,
``nn.Conv1d``), embedding, SSM block and other parameter owner (norms), with:

- ``params`` and ``memory_bytes`` = Σ params × bits / 8 (a float parameter counts 32 bits; a
  parameter quantized through a tap, e.g. S4D's ``A_real_tap`` on ``log_A_real``, counts the tap's
  bits; tied weights count once, at the widest of their uses);
- ``macs_per_token``, split analog / digital: Linear in·out; Conv1d out·(in/groups)·kernel;
  the SSMs in recurrent form (below). Norms, nonlinearities and bias adds are not counted; a
  classification head applied once to the pooled sequence is still counted per token (an upper
  bound);
- crossbar ``tiles`` = ceil(rows/t)·ceil(cols/t) of each analog matrix at tile size t (rows =
  inputs, cols = outputs; a grouped Conv1d is laid out block-diagonally, rows = in·kernel),
  with ``dac_per_token`` = rows·ceil(cols/t) input conversions (each tile drives its rows) and
  ``adc_per_token`` = cols·ceil(rows/t) output conversions (each tile digitises its columns);
- ``ace`` (arithmetic computation effort, QS4D arXiv 2507.06079) per SSM block, see below;
- ``energy_pj_per_token`` from per-operation energies (``DEFAULT_ENERGIES``).

SSM blocks are found by duck typing on the module layout of docs/architecture.md:

S4D (a module with a ``kernel`` holding ``log_A_real`` (H, N/2); N = d_state, N/2 complex modes).
Recurrent form per token: H·N/2 complex state updates x = dA·x + dB·u (4 + 2 real MACs) and the
read-out 2·Re(C·x) (2 real MACs), i.e. 8 real MACs per complex mode, plus the D skip:

    macs_ssm = 8·H·N/2 + H = 4·H·N + H            (digital)
    ACE      = H·N·(r_A + r_B + r_C)·r_act + H²·r_act·r_lin        (QS4D)

with r the bits of each part (32 when left in float). B is folded into C in S4D (there is no
separate B parameter), so r_B := r_C. r_A is the wider of the A_real and A_imag parts, r_act the
bits of the layer's input (the ``activations`` part), r_lin those of the mixing layer weight.
The H² term follows the paper; the Conv1d(H, 2H, 1) mixing layer itself has 2·H² weights.

Mamba (a module with ``A_log`` (E, N) and ``in_proj``). Recurrent (selective-scan) form per
token and state element: dA = exp(Δ·A), Δ·B·x, h = dA·h + Δ·B·x, y = C·h, counted as 4 MACs
(the exponential as one), plus the D skip:

    macs_ssm = 4·E·N + E                            (digital)
    ACE      = Σ_W rows·cols·r_W·r_act + E·N·(r_A + r_B + r_C)·r_act

the sum over the block's in_proj, conv1d, x_proj, dt_proj and out_proj weights (rows·cols = the
weight's element count, r_W its bits). B and C are input-dependent activations (outputs of
x_proj), so r_B = r_C = r_act; r_A is the bits of the A part (``A_tap`` or ``A_log``).

``ratio_vs_fp32`` divides each total by the same total of the same model with every part in float
(32 bits): 0.25 for the memory of an all-8-bit model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from cimssm.hardware.core import match_names
from cimssm.hardware.quantize import QuantSpec, ResolvedPart, attached_bits, hardware_parts, resolve_parts

FLOAT_BITS = 32

# Per-operation energies in pJ. Order-of-magnitude defaults; give your technology's own numbers.
# - digital MAC: Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm): 8-bit integer multiply
#   0.2 pJ + 8-bit add 0.03 pJ = 0.23 pJ. Scaled as (bits/8)^2 (multiplier area ~ bits²), which
#   gives 3.7 pJ at 32 bit, near the 4.6 pJ of a 32-bit float multiply-add in the same table.
# - analog MAC: 0.03 pJ per multiply-accumulate in the crossbar array, within the 10–100 fJ
#   commonly quoted for PCM/RRAM arrays (IBM: Le Gallo et al., "A 64-core mixed-signal in-memory
#   compute chip based on phase-change memory", Nature Electronics 2023; Rasch et al.,
#   "Hardware-aware training for large-scale and diverse deep learning inference workloads using
#   in-memory computing-based accelerators", Nature Communications 2023); converters dominate.
# - ADC: 1 pJ per 8-bit conversion (Murmann, "ADC Performance Survey 1997–2023": SAR ADCs at a
#   Walden figure of merit of a few fJ/conversion-step; 2^8 steps ≈ 1 pJ).
# - DAC: 0.1 pJ per input (row) conversion, an assumption (pulse-width input drivers are far
#   cheaper than ADCs).
DEFAULT_ENERGIES: dict[str, float] = {
    "digital_mac_8bit_pj": 0.23,
    "digital_bits_exponent": 2.0,
    "analog_mac_pj": 0.03,
    "adc_pj": 1.0,
    "dac_pj": 0.1,
}

# Parameters that reach the computation only through a tap (docs/architecture.md): their stored
# precision is that of the tap.
TAP_OF_PARAM = {
    "log_A_real": "A_real_tap",
    "A_imag": "A_imag_tap",
    "C": "C_tap",
    "log_dt": "log_dt_tap",
    "A_log": "A_tap",
}
MAMBA_MATRICES = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
_HIDDEN = (".parametrizations.", ".hw_input", ".hw_output", ".transforms.")


def is_s4d_block(m: nn.Module) -> bool:
    return hasattr(getattr(m, "kernel", None), "log_A_real")


def is_mamba_block(m: nn.Module) -> bool:
    return hasattr(m, "A_log") and hasattr(m, "in_proj")


def _clean(name: str) -> str:
    return name.replace(".parametrizations.", ".").removesuffix(".original")


def _bits_map(model: nn.Module, quant: Any) -> dict[tuple[str, str], int]:
    """{(kind, name): bits} from a spec, resolved parts, {part: bits}, or (None) the attached quantizers."""
    if quant is None:
        return attached_bits(model)
    if isinstance(quant, Mapping) and quant and all(isinstance(v, ResolvedPart) for v in quant.values()):
        resolved = dict(quant)
    elif isinstance(quant, QuantSpec) or (
        isinstance(quant, Mapping) and set(quant) <= {f.name for f in fields(QuantSpec)}
    ):
        resolved = resolve_parts(model, quant)
    elif isinstance(quant, Mapping) and set(quant) <= set(hardware_parts(model)):
        resolved = resolve_parts(model, {"parts": {k: {"bits": v} for k, v in quant.items()}})
    else:
        raise TypeError(
            "quant must be None (read the attached quantizers), a quant spec, resolve_parts' output "
            f"or a {{part: bits}} mapping; got {quant!r}"
        )
    out: dict[tuple[str, str], int] = {}
    for part in resolved.values():
        if part.bits is None:
            continue
        for name in part.matched:
            key = (part.kind, name)
            out[key] = min(out.get(key, part.bits), part.bits)
    return out


def _analog_globs(analog_globs: Any) -> tuple[list[str], list[str]]:
    if analog_globs is None:
        return ["*"], []
    if isinstance(analog_globs, Mapping):
        return list(analog_globs.get("include") or []), list(analog_globs.get("exclude") or [])
    if isinstance(analog_globs, str):
        return [analog_globs], []
    seq = list(analog_globs)
    if len(seq) == 2 and all(isinstance(g, Sequence) and not isinstance(g, str) for g in seq):
        return list(seq[0]), list(seq[1])
    return [str(g) for g in seq], []


def _digital_mac_pj(bits: int, e: Mapping[str, float]) -> float:
    return e["digital_mac_8bit_pj"] * (bits / 8) ** e["digital_bits_exponent"]


class _Bits:
    def __init__(self, model: nn.Module, bmap: dict[tuple[str, str], int]):
        self.model, self.bmap = model, bmap

    def param(self, name: str) -> int:
        b = self.bmap.get(("param", name))
        if b is not None:
            return b
        owner, _, leaf = name.rpartition(".")
        if leaf in TAP_OF_PARAM:
            tap = f"{owner}.{TAP_OF_PARAM[leaf]}" if owner else TAP_OF_PARAM[leaf]
            b = self.bmap.get(("tap", tap))
        return FLOAT_BITS if b is None else b

    def act(self, module_name: str) -> int:
        """Input bits of a module: its own input quantizer, else the nearest ancestor's."""
        name = module_name
        while True:
            b = self.bmap.get(("input", name))
            if b is not None:
                return b
            if not name:
                return FLOAT_BITS
            name = name.rpartition(".")[0]


def _matrix_entry(name: str, m: nn.Module, bits: _Bits, analog: bool, t: int, e: Mapping) -> dict:
    if isinstance(m, nn.Linear):
        rows, cols, macs = m.in_features, m.out_features, m.in_features * m.out_features
    else:  # Conv1d
        k = m.kernel_size[0]
        rows, cols = m.in_channels * k, m.out_channels  # grouped: block-diagonal layout
        macs = m.out_channels * (m.in_channels // m.groups) * k
    w_bits, a_bits = bits.param(f"{name}.weight"), bits.act(name)
    entry = {
        "type": type(m).__name__,
        "role": "matrix",
        "analog": analog,
        "rows": rows,
        "cols": cols,
        "bits": w_bits,
        "act_bits": a_bits,
        "macs_per_token": macs,
        "analog_macs_per_token": macs if analog else 0,
        "digital_macs_per_token": 0 if analog else macs,
        "tiles": math.ceil(rows / t) * math.ceil(cols / t) if analog else 0,
        "dac_per_token": rows * math.ceil(cols / t) if analog else 0,
        "adc_per_token": cols * math.ceil(rows / t) if analog else 0,
    }
    if analog:
        entry["energy_pj_per_token"] = (
            macs * e["analog_mac_pj"]
            + entry["adc_per_token"] * e["adc_pj"]
            + entry["dac_per_token"] * e["dac_pj"]
        )
    else:
        entry["energy_pj_per_token"] = macs * _digital_mac_pj(max(w_bits, a_bits), e)
    return entry


def _first_matrix(m: nn.Module) -> str | None:
    for sub, mod in m.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv1d):
            return sub
    return None


def _s4d_entry(name: str, m: nn.Module, bits: _Bits, e: Mapping) -> dict:
    H, N2 = m.kernel.log_A_real.shape
    N = 2 * N2
    k = f"{name}.kernel"
    r_A = max(bits.param(f"{k}.log_A_real"), bits.param(f"{k}.A_imag"))
    r_C = bits.param(f"{k}.C")
    r_B = r_C  # B is folded into C in S4D
    r_act = bits.act(name)
    mixing = getattr(m, "mixing", None)
    lin = _first_matrix(mixing) if mixing is not None else None
    r_lin = (
        FLOAT_BITS if lin is None else bits.param(".".join(s for s in (name, "mixing", lin, "weight") if s))
    )
    ace = H * N * (r_A + r_B + r_C) * r_act + H * H * r_act * r_lin
    macs = 4 * H * N + H
    return {
        "type": type(m).__name__,
        "role": "ssm",
        "ssm": "s4d",
        "analog": False,
        "H": H,
        "N": N,
        "r_A": r_A,
        "r_B": r_B,
        "r_C": r_C,
        "r_act": r_act,
        "r_lin": r_lin,
        "ace": ace,
        "bits": max(r_A, r_C),
        "act_bits": r_act,
        "macs_per_token": macs,
        "analog_macs_per_token": 0,
        "digital_macs_per_token": macs,
        "energy_pj_per_token": macs * _digital_mac_pj(max(r_A, r_C, r_act), e),
    }


def _mamba_entry(name: str, m: nn.Module, bits: _Bits, e: Mapping) -> dict:
    E, N = m.A_log.shape
    r_A = bits.param(f"{name}.A_log")
    r_act = bits.act(name)
    r_B = r_C = r_act  # B, C are input-dependent activations (x_proj outputs)
    matrices = {}
    for sub in MAMBA_MATRICES:
        mod = getattr(m, sub, None)
        w = getattr(mod, "weight", None)
        if w is not None:
            matrices[sub] = (w.numel(), bits.param(f"{name}.{sub}.weight"))
    ace = sum(n * r_w * r_act for n, r_w in matrices.values()) + E * N * (r_A + r_B + r_C) * r_act
    macs = 4 * E * N + E
    return {
        "type": type(m).__name__,
        "role": "ssm",
        "ssm": "mamba",
        "analog": False,
        "E": E,
        "N": N,
        "r_A": r_A,
        "r_B": r_B,
        "r_C": r_C,
        "r_act": r_act,
        "r_W": {k: v[1] for k, v in matrices.items()},
        "ace": ace,
        "bits": r_A,
        "act_bits": r_act,
        "macs_per_token": macs,
        "analog_macs_per_token": 0,
        "digital_macs_per_token": macs,
        "energy_pj_per_token": macs * _digital_mac_pj(max(r_A, r_act), e),
    }


def _report(model: nn.Module, bmap: dict, include: list, exclude: list, t: int, e: Mapping) -> dict:
    bits = _Bits(model, bmap)
    modules = {n: m for n, m in model.named_modules() if not any(h in n + "." for h in _HIDDEN)}
    layers: dict[str, dict] = {}
    ssm_names: list[str] = []
    for name, m in modules.items():
        if isinstance(m, nn.Linear | nn.Conv1d):
            analog = bool(match_names([name], include, exclude))
            layers[name] = _matrix_entry(name, m, bits, analog, t, e)
        elif isinstance(m, nn.Embedding):
            layers[name] = {"type": "Embedding", "role": "embedding", "analog": False,
                            "bits": bits.param(f"{name}.weight")}  # fmt: skip
        elif is_s4d_block(m):
            layers[name] = _s4d_entry(name, m, bits, e)
            ssm_names.append(name)
        elif is_mamba_block(m):
            layers[name] = _mamba_entry(name, m, bits, e)
            ssm_names.append(name)

    # Parameters and memory: each parameter object once, at the widest bits of its names.
    by_id: dict[int, tuple[str, int, int]] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        name = _clean(raw)
        b = bits.param(name)
        first, numel, b0 = by_id.get(id(p), (name, p.numel(), 0))
        by_id[id(p)] = (first, numel, max(b, b0))
    for name, numel, b in by_id.values():
        owner = name.rpartition(".")[0]
        key = owner if owner in layers and layers[owner]["role"] in ("matrix", "embedding") else None
        if key is None:
            key = next((s for s in ssm_names if owner == s or owner.startswith(s + ".")), None)
        if key is None:
            key = owner
            if key not in layers:
                mod = modules.get(owner, model)
                layers[key] = {"type": type(mod).__name__, "role": "other", "analog": False}
        entry = layers[key]
        entry["params"] = entry.get("params", 0) + numel
        entry["memory_bytes"] = entry.get("memory_bytes", 0.0) + numel * b / 8

    for entry in layers.values():
        for k in ("params", "memory_bytes", "macs_per_token", "analog_macs_per_token",
                  "digital_macs_per_token", "tiles", "adc_per_token", "dac_per_token",
                  "energy_pj_per_token"):  # fmt: skip
            entry.setdefault(k, 0)
    keys = ("params", "memory_bytes", "macs_per_token", "analog_macs_per_token", "digital_macs_per_token",
            "tiles", "adc_per_token", "dac_per_token", "energy_pj_per_token")  # fmt: skip
    total = {k: sum(entry[k] for entry in layers.values()) for k in keys}
    total["ace"] = sum(layers[s]["ace"] for s in ssm_names)
    return {"layers": layers, "total": total}


def cost_report(
    model: nn.Module,
    quant: Any = None,
    analog_globs: Any = None,
    tile_size: int = 512,
    energies: Mapping[str, float] | None = None,
    seq_len: int | None = None,
) -> dict:
    """Per-layer and total cost of ``model`` (see the module docstring for every formula).

    Args:
        quant: a quant spec (mapping or ``QuantSpec``), ``resolve_parts``' output, a
            ``{part: bits}`` mapping, or None to read the quantizers attached to the model.
        analog_globs: ``(include, exclude)`` globs over module names (or a mapping with those
            keys, or a list of include globs) choosing the analog Linear/Conv1d layers; None:
            every one. SSM scans and embeddings are digital.
        tile_size: crossbar tile size t (t × t).
        energies: overrides of ``DEFAULT_ENERGIES`` (pJ).
        seq_len: when given, totals per sequence (= per token × seq_len) are added.

    Returns ``{"layers": {name: entry}, "total": {...}, "fp32_total": {...}, "ratio_vs_fp32":
    {...}, "tile_size", "seq_len", "energies"}``.
    """
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    e = dict(DEFAULT_ENERGIES)
    if energies:
        unknown = sorted(set(energies) - set(DEFAULT_ENERGIES))
        if unknown:
            raise ValueError(f"energies: unknown key(s) {unknown}; allowed: {sorted(DEFAULT_ENERGIES)}")
        e.update({k: float(v) for k, v in energies.items()})
    include, exclude = _analog_globs(analog_globs)
    report = _report(model, _bits_map(model, quant), include, exclude, tile_size, e)
    fp32 = _report(model, {}, include, exclude, tile_size, e)["total"]
    if seq_len is not None:
        for tot in (report["total"], fp32):
            for k in ("macs", "analog_macs", "digital_macs", "adc", "dac"):
                tot[f"{k}_per_sequence"] = tot[f"{k}_per_token"] * seq_len
            tot["energy_pj_per_sequence"] = tot["energy_pj_per_token"] * seq_len
    report["fp32_total"] = fp32
    report["ratio_vs_fp32"] = {k: (v / fp32[k] if fp32[k] else None) for k, v in report["total"].items()}
    report.update({"tile_size": tile_size, "seq_len": seq_len, "energies": e})
    return report


def write_cost_json(report: Mapping, path: str | Path) -> Path:
    """Write a cost report as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    return path
