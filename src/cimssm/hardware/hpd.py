"""Hybrid projection decomposition (HPD, arXiv 2508.11935): one matrix split into an analog and a
digital factor.

A linear layer ``y = W x + b`` with W (out, in) is factored by the SVD

    W = U Σ Vᵀ,   U (out, k), Σ (k, k), V (in, k),  k = min(out, in)
    y = (U Σ) · (Vᵀ x) + b

and computed as two matrices in sequence: ``U Σ`` (out, r) is the same shape as an ordinary weight
and sits on the analog crossbar; ``Vᵀ`` (r, in) is kept in exact digital hardware (HPD's split).
With ``rank = r < k`` only the r largest singular values are kept, so ``(U Σ)_r Vᵀ_r`` is the best
rank-r approximation of W in the Frobenius and spectral norms (Eckart–Young). The swapped split
(``analog_factor="vt"``: Vᵀ analog, U Σ digital) is an ablation.

The decomposition is a module swap (:class:`HPDLinear` replaces the ``nn.Linear``) applied after
training or after a checkpoint is loaded, never during training, so checkpoints keep the plain
layers. Analog targeting follows the swap: the model gets an instance-level ``hardware_parts`` in
which the analog factor joins the part of the layer it came from (``lm_head``, ``out_proj``, ...)
and the digital factor sits in the part ``hpd_digital``, marked ``"analog": False``, which no
analog noise and no analog cost ever reaches.

Noise reference (the paper's open point): noise specified relative to max|W| of a tensor can take
that max from the analog factor itself (``noise_reference="factor"``: max|U Σ|) or from the
original matrix (``"original"``: max|W|, per output row for per-channel noise when U Σ is the
analog factor, whose rows are W's output channels). The analog factor's ``nn.Linear`` then holds
the buffer ``noise_reference_abs_max`` which the weight-noise transforms read.

Lightning-free (``hardware/`` never imports Lightning).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from cimssm.hardware.core import _input_pre_hook, _output_hook, match_names
from cimssm.hardware.noise import NoiseTransform
from cimssm.hardware.quantizers import UniformQuantizer

log = logging.getLogger("cimssm")

__all__ = [
    "ANALOG_FACTORS",
    "DIGITAL_EXCLUDE_GLOBS",
    "DIGITAL_PART",
    "NOISE_REFERENCES",
    "TARGETS",
    "HPDConfigError",
    "HPDLinear",
    "analog_with_decomposition",
    "apply_decomposition",
    "apply_hpd",
    "best_rank_approximation",
    "check_decomposition",
    "hpd_split",
    "hpd_target_names",
]

TARGETS = ("lm_head", "last_out_proj", "all_out_proj")
ANALOG_FACTORS = ("usigma", "vt")
NOISE_REFERENCES = ("factor", "original")
DIGITAL_PART = "hpd_digital"
# Module and parameter globs of every digital factor: added to ``analog.exclude`` so the cost
# report (which decides analog by module name) counts the digital factor as digital.
DIGITAL_EXCLUDE_GLOBS = ("*.digital", "*.digital.weight")
_HEADS = ("lm_head", "classifier", "decoder")


class HPDConfigError(ValueError):
    """A ``decomp`` setting that does not fit the model (names key, value and what is allowed)."""


# ------------------------------------------------------------------------------------- the maths
@torch.no_grad()
def hpd_split(weight: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U Σ, Vᵀ)`` of ``weight`` (out, in): ``U Σ`` (out, r), ``Vᵀ`` (r, in), ``U Σ Vᵀ ≈ W``.

    The SVD runs in float64 (the factors are cast back to ``weight``'s dtype), so at full rank the
    product matches W to float32 rounding. Signs are fixed so that the largest-magnitude entry of
    each row of Vᵀ is positive (the SVD's sign ambiguity would otherwise depend on the LAPACK build).
    ``rank`` (default full, ``min(out, in)``) keeps the ``rank`` largest singular values.
    """
    if weight.dim() != 2:
        raise HPDConfigError(f"hpd_split needs a matrix (out, in), got shape {tuple(weight.shape)}")
    k = min(weight.shape)
    r = k if rank is None else int(rank)
    if not 1 <= r <= k:
        raise HPDConfigError(
            f"decomp.rank={rank} is not allowed: must be in 1..{k} (min(out, in) of a "
            f"{weight.shape[0]}x{weight.shape[1]} matrix)"
        )
    w64 = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)  # (out, k), (k,), (k, in)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    # Deterministic signs: flip (u_i, v_i) together so that max-|.| entry of v_i is > 0.
    pivot = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # (r,)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(vh.dtype)
    u_sigma = u * (s * sign).unsqueeze(0)  # (out, r)
    v_t = vh * sign.unsqueeze(1)  # (r, in)
    return u_sigma.to(weight.dtype).contiguous(), v_t.to(weight.dtype).contiguous()


@torch.no_grad()
def best_rank_approximation(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """W_r = Σ_{i<r} σ_i u_i v_iᵀ, the best rank-r approximation (Eckart–Young), in float64."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def _reference_buffers(weight: torch.Tensor, noise_reference: str, analog_factor: str):
    """(max|W| scalar, max|W| per output row (out, 1) or None) when the reference is the original."""
    if noise_reference != "original":
        return None, None
    a = weight.detach().abs()
    rows = a.amax(dim=1, keepdim=True) if analog_factor == "usigma" else None
    return a.amax(), rows


class HPDLinear(nn.Module):
    """``y = (U Σ)(Vᵀ x) + b``: a linear layer as an analog and a digital factor.

    Submodules ``analog`` and ``digital`` are ``nn.Linear`` layers; which of them holds U Σ is set
    by ``analog_factor`` ("usigma": ``analog`` = U Σ (r -> out, with the layer's bias),
    ``digital`` = Vᵀ (in -> r); "vt": the reverse). ``u_sigma`` and ``v_t`` name the two factors
    whatever their placement; ``weight`` is their product U Σ Vᵀ (for inspection).

    With ``noise_reference="original"`` the analog ``nn.Linear`` carries non-persistent buffers
    ``noise_reference_abs_max`` (max|W|) and, for U Σ analog, ``noise_reference_abs_max_rows``
    (max|W| per output row): weight-noise transforms scale their noise by these instead of the
    factor's own max.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        analog_factor: str = "usigma",
        noise_reference: str = "factor",
    ) -> None:
        super().__init__()
        if analog_factor not in ANALOG_FACTORS:
            raise HPDConfigError(
                f"decomp.analog_factor={analog_factor!r} is not allowed: one of {ANALOG_FACTORS}"
            )
        if noise_reference not in NOISE_REFERENCES:
            raise HPDConfigError(
                f"decomp.noise_reference={noise_reference!r} is not allowed: one of {NOISE_REFERENCES}"
            )
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.analog_factor = analog_factor
        self.noise_reference = noise_reference
        u_sigma = nn.Linear(rank, out_features, bias=bias)  # (out, r)
        v_t = nn.Linear(in_features, rank, bias=False)  # (r, in)
        if analog_factor == "usigma":
            self.analog, self.digital = u_sigma, v_t
        else:
            self.digital, self.analog = u_sigma, v_t
        self.analog.register_buffer("noise_reference_abs_max", None, persistent=False)
        self.analog.register_buffer("noise_reference_abs_max_rows", None, persistent=False)

    @property
    def u_sigma(self) -> nn.Linear:
        return self.analog if self.analog_factor == "usigma" else self.digital

    @property
    def v_t(self) -> nn.Linear:
        return self.digital if self.analog_factor == "usigma" else self.analog

    @property
    def weight(self) -> torch.Tensor:
        """U Σ Vᵀ (out, in) as the factors compute it now (quantized / noisy when transformed)."""
        return self.u_sigma.weight @ self.v_t.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.u_sigma.bias

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        analog_factor: str = "usigma",
        noise_reference: str = "factor",
    ) -> HPDLinear:
        """The HPD of ``linear``'s weight as it computes now (its quantizers applied, if any)."""
        weight = linear.weight.detach()  # the parametrized value when quantized
        u_sigma, v_t = hpd_split(weight, rank)
        r = u_sigma.shape[1]
        out = cls(
            linear.in_features,
            linear.out_features,
            r,
            linear.bias is not None,
            analog_factor,
            noise_reference,
        )
        out = out.to(device=weight.device, dtype=weight.dtype)
        out.u_sigma.weight.copy_(u_sigma)
        out.v_t.weight.copy_(v_t)
        if linear.bias is not None:
            out.u_sigma.bias.copy_(linear.bias.detach())
        ref, rows = _reference_buffers(weight, noise_reference, analog_factor)
        out.analog.noise_reference_abs_max = ref
        out.analog.noise_reference_abs_max_rows = rows
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u_sigma(self.v_t(x))  # (..., in) -> (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"analog_factor={self.analog_factor}, noise_reference={self.noise_reference}"
        )


# ------------------------------------------------------------------------------------- targeting
def _block_index(name: str) -> int:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _linear_names(model: nn.Module) -> list[str]:
    hidden = (".parametrizations.", ".hw_input", ".hw_output", ".transforms.")
    return [
        n
        for n, m in model.named_modules()
        if n and isinstance(m, nn.Linear) and not any(h in n + "." for h in hidden)
    ]


def hpd_target_names(model: nn.Module, target: str) -> list[str]:
    """Module names of the linear layers ``decomp.target`` selects.

    ``lm_head``: the model's output head (``lm_head``, else ``classifier``, else S4D's ``decoder``);
    ``last_out_proj``: the ``out_proj`` of the last block; ``all_out_proj``: every block's
    ``out_proj``; anything else is an fnmatch glob over the ``nn.Linear`` module names.
    """
    linears = _linear_names(model)
    if target == "lm_head":
        names = [h for h in _HEADS if h in linears][:1]
    elif target in ("last_out_proj", "all_out_proj"):
        outs = sorted(match_names(linears, ["*out_proj"]), key=_block_index)
        names = outs[-1:] if target == "last_out_proj" else outs
    else:
        names = match_names(linears, [target])
    if not names:
        raise HPDConfigError(
            f"decomp.target={target!r} matches no linear layer of {type(model).__name__}: use one of "
            f"{list(TARGETS)} or a glob over its linear layers {linears}"
        )
    return names


def check_decomposition(model: nn.Module, decomp: Mapping[str, Any]) -> list[str]:
    """Validate ``decomp`` against ``model`` without changing it; returns the target names.

    A rank larger than a target matrix allows is an :class:`HPDConfigError` naming the layer.
    """
    d = dict(decomp)
    if d.get("method", "none") == "none":
        return []
    if d.get("method") != "hpd":
        raise HPDConfigError(f"decomp.method={d.get('method')!r} is not allowed: none or hpd")
    names = hpd_target_names(model, str(d.get("target", "last_out_proj")))
    rank = d.get("rank")
    for name in names:
        lin = model.get_submodule(name)
        k = min(lin.in_features, lin.out_features)
        if rank is not None and not 1 <= int(rank) <= k:
            raise HPDConfigError(
                f"decomp.rank={rank} is not allowed: {name} is {lin.out_features}x{lin.in_features}, "
                f"so the rank must be in 1..{k} (or null for full rank)"
            )
    return names


# ------------------------------------------------------------------------------------- the swap
def _weight_quantizer(linear: nn.Linear) -> UniformQuantizer | None:
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    qs = [t for t in linear.parametrizations["weight"] if isinstance(t, UniformQuantizer) and t.levels]
    return qs[0] if qs else None


def _factor_quantizer(weight: torch.Tensor, template: UniformQuantizer | None, bits: int | None, part: str):
    """A weight quantizer for a factor: ``template``'s grid (the layer's own), or ``bits``.

    Scales come from max|factor| (``scale="max"``): the factor is a fixed matrix, so its range is
    exact and needs no calibration (also after PTQ).
    """
    if template is None and bits is None:
        return None
    if template is not None:
        kw = dict(levels=template.levels, symmetric=template.symmetric, granularity=template.granularity)
    else:
        kw = dict(bits=int(bits), symmetric=True, granularity="tensor")
    q = UniformQuantizer(scale="max", ch_axis=0, num_channels=weight.shape[0], **kw)
    q.part = part
    return q.to(weight.device)


def _part_of(parts: Mapping[str, dict], param_name: str) -> str | None:
    for part, spec in parts.items():
        if spec.get("kind") == "param" and match_names([param_name], spec.get("targets", [])):
            return part
    return None


def _tied_with(model: nn.Module, linear: nn.Linear, name: str) -> list[str]:
    """Other parameter names that share ``linear``'s weight tensor (a tied embedding)."""
    w = (
        linear.parametrizations["weight"].original
        if parametrize.is_parametrized(linear, "weight")
        else linear.weight
    )
    own = f"{name}.weight"
    out = []
    for pname, p in model.named_parameters(remove_duplicate=False):
        clean = pname.replace(".parametrizations.", ".").removesuffix(".original")
        if p is w and clean != own:
            out.append(clean)
    return out


@torch.no_grad()
def apply_hpd(
    model: nn.Module,
    target: str = "last_out_proj",
    rank: int | None = None,
    analog_factor: str = "usigma",
    noise_reference: str = "factor",
    digital_bits: int | None = None,
) -> list[str]:
    """Swap the layers ``target`` selects for :class:`HPDLinear`; returns their module names.

    - The factors come from each layer's weight as it computes now (its quantizer applied), so at
      full rank and without further quantization the new layer's output equals the old one's to
      float tolerance.
    - Quantization: the analog factor gets a quantizer with the layer's own grid when the layer
      was quantized (its part's bits); the digital factor gets ``digital_bits`` (None: float).
      Input (activation) transforms of the layer move to the new module, so the DAC side is kept.
    - Analog targeting: ``model.hardware_parts`` becomes an instance copy in which the analog
      factor's weight joins the layer's part and the digital factor's the non-analog part
      ``hpd_digital``.
    - A tied LM head is untied: the embedding keeps the trained matrix, the head becomes the two
      factors; this is logged.
    - A layer carrying noise transforms cannot be decomposed (decompose clean weights, then add noise).
    """
    names = check_decomposition(model, {"method": "hpd", "target": target, "rank": rank})
    if analog_factor not in ANALOG_FACTORS:
        raise HPDConfigError(
            f"decomp.analog_factor={analog_factor!r} is not allowed: one of {ANALOG_FACTORS}"
        )
    if noise_reference not in NOISE_REFERENCES:
        raise HPDConfigError(
            f"decomp.noise_reference={noise_reference!r} is not allowed: one of {NOISE_REFERENCES}"
        )
    given = getattr(model, "hardware_parts", None)
    # A model without parts offers every Linear / Conv1d weight (hardware/analog.py): keep that.
    parts = (
        copy.deepcopy(dict(given))
        if given is not None
        else {"weight": {"kind": "param", "category": "weight", "targets": ["*weight"]}}
    )
    digital_targets: list[str] = list(parts.get(DIGITAL_PART, {}).get("targets", []))
    for name in names:
        old = model.get_submodule(name)
        if any(isinstance(m, NoiseTransform) for m in old.modules()):
            raise HPDConfigError(
                f"decomp: {name} carries noise transforms; decompose the clean model, then add noise"
            )
        tied = _tied_with(model, old, name)
        if tied:
            log.warning(
                "HPD of %s unties it from %s: the embedding keeps the trained matrix, the head becomes "
                "the factors U·Σ and Vᵀ",
                name,
                ", ".join(tied),
            )
        new = HPDLinear.from_linear(old, rank, analog_factor, noise_reference)
        template = _weight_quantizer(old)
        part = _part_of(parts, f"{name}.weight")
        for module, q in (
            (new.analog, _factor_quantizer(new.analog.weight, template, None, part or "weight")),
            (new.digital, _factor_quantizer(new.digital.weight, None, digital_bits, DIGITAL_PART)),
        ):
            if q is not None:
                parametrize.register_parametrization(module, "weight", q)
        for attr in ("hw_input", "hw_output"):  # activation / DAC-ADC transforms stay on the layer
            chain = old._modules.get(attr)
            if chain is not None:
                getattr(old, f"_{attr}_hook").remove()
                setattr(new, attr, chain)
                hook = _input_pre_hook if attr == "hw_input" else _output_hook
                register = new.register_forward_pre_hook if attr == "hw_input" else new.register_forward_hook
                setattr(new, f"_{attr}_hook", register(hook))
        new.train(old.training)
        model.set_submodule(name, new)
        if part is not None:
            parts[part] = {**parts[part], "targets": [*parts[part]["targets"], f"{name}.analog.weight"]}
        digital_targets.append(f"{name}.digital.weight")
        log.info(
            "HPD %s: %dx%d -> analog %s (%s) + digital %s (%s), rank %d, noise reference %s",
            name,
            old.out_features,
            old.in_features,
            "U·Σ" if analog_factor == "usigma" else "Vᵀ",
            "x".join(map(str, new.analog.weight.shape)),
            "Vᵀ" if analog_factor == "usigma" else "U·Σ",
            "x".join(map(str, new.digital.weight.shape)),
            new.rank,
            noise_reference,
        )
    parts[DIGITAL_PART] = {"kind": "param", "category": "weight", "targets": digital_targets, "analog": False}
    model.hardware_parts = parts  # instance attribute: the class's dict stays untouched
    return names


def apply_decomposition(model: nn.Module, decomp: Mapping[str, Any] | None) -> list[str]:
    """Apply a ``decomp`` config section (method none: nothing); returns the decomposed layers."""
    d = dict(decomp or {})
    if d.get("method", "none") == "none":
        return []
    return apply_hpd(
        model,
        target=str(d.get("target", "last_out_proj")),
        rank=d.get("rank"),
        analog_factor=str(d.get("analog_factor", "usigma")),
        noise_reference=str(d.get("noise_reference", "factor")),
        digital_bits=d.get("digital_bits"),
    )


def analog_with_decomposition(analog: Mapping[str, Any], decomp: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``analog`` section with the digital factors excluded when ``decomp`` is HPD.

    Noise already skips them (part ``hpd_digital`` is not analog); the cost report decides analog
    by module name, so it needs the exclude globs.
    """
    from cimssm.hardware.analog import DEFAULT_ANALOG

    out = dict(analog)
    if dict(decomp or {}).get("method", "none") != "none":
        exclude = list(out["exclude"] if out.get("exclude") is not None else DEFAULT_ANALOG["exclude"])
        out["exclude"] = exclude + [g for g in DIGITAL_EXCLUDE_GLOBS if g not in exclude]
    return out
