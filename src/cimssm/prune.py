"""Structured pruning of SSM state dimensions, as QS4D (arXiv 2507.06079) does after training.

No Lightning here: the caller passes ``evaluate(net) -> float`` (the metric on a held-out split)
and, optionally, ``finetune(net)``; :class:`cimssm.callbacks.prune.PruneCallback` wires them to
a run.

What is removed, per SSM layer (module layout of docs/architecture.md):

- S4D (``layers.{i}.layer``): complex modes n of the kernel. Each channel h keeps its own best
  ``k`` of its N/2 modes, so the tensors stay rectangular: ``log_A_real``, ``A_imag`` (H, N/2) ->
  (H, k), ``C`` (H, N/2, 2) -> (H, k, 2); the layer's d_state becomes N' = 2k.
- Mamba (``backbone.layers.{i}.mixer``): state dimensions n (B_t and C_t are shared by all E
  channels, so a state goes for the whole layer): columns of ``A_log`` (E, N) and the B and C
  rows of ``x_proj`` (rows R + n and R + N + n, R = dt_rank).

Ranking (the contribution of a state to the layer output):

- S4D, kernel energy over the sequence length L, per channel h and mode n, with the discretised
  dA_n = exp(Δ·A_n), dB_n = (exp(Δ·A_n) − 1)/A_n of the kernel K[l] = 2·Re(Σ_n C_n·dB_n·dA_n^l):

      E_hn = |C_n·dB_n|² · Σ_{l<L} |dA_n|^{2l} = |C_n·dB_n|² · (1 − |dA_n|^{2L}) / (1 − |dA_n|²)

  (L = ∞ when unknown: |C_n·dB_n|² / (1 − |dA_n|²), the squared H2 norm of the mode). Computed
  from the tapped A, C and Δ, i.e. from the quantized values when QAT is on.
- Mamba, a data-free steady-state gain: for a constant input, h_n = Δ·B_n·x / (1 − exp(Δ·A_n))
  ≈ B_n·x / |A_n| (small Δ) and the output term C_n·h_n, with B_n, C_n linear in the input
  through the rows W_B[n], W_C[n] of x_proj:

      g_n = ‖W_B[n]‖ · ‖W_C[n]‖ · Σ_e 1/|A_en|

Schedule (:func:`prune_state_dims`): step k keeps ``ceil(n0·(1 − k·step_fraction))`` states of
each layer (at least one), ranking on the current model, optionally fine-tuning, then
evaluating. Steps are accepted while the metric stays within ``tolerance`` (absolute) of the
unpruned model; the first step outside ends the accepted prefix (later steps only draw the
rest of the curve when ``full_curve``). The model ends as the last accepted step.

Saving: the pruned shapes are a function of the config plus the *pruning record*
(:func:`prune_record`: the kept state size of every SSM layer). :func:`apply_prune_record`
shrinks a model rebuilt from its config to those shapes, after which its state_dict loads.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger("cimssm")

METHODS = ("state_dim",)
# Metrics of cimssm.evaluation.evaluate_model and whether a larger value is better.
HIGHER_IS_BETTER = {"acc": True, "loss": False, "ppl": False, "bpc": False}


class PruneError(ValueError):
    """A pruning setting or record that does not fit the model; the message names it."""


# ------------------------------------------------------------------------------------ the layers
def is_s4d_layer(m: nn.Module) -> bool:
    return hasattr(getattr(m, "kernel", None), "log_A_real")


def is_mamba_mixer(m: nn.Module) -> bool:
    return hasattr(m, "A_log") and hasattr(m, "x_proj")


def ssm_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The prunable SSM layers of ``net`` by module name (S4D layers and Mamba mixers)."""
    out = {}
    for name, m in net.named_modules():
        if ".parametrizations." in f"{name}." or ".hw_input" in name:
            continue
        if is_s4d_layer(m) or is_mamba_mixer(m):
            out[name] = m
    if not out:
        raise PruneError(
            f"prune.method=state_dim: {type(net).__name__} has no S4D or Mamba SSM layer to prune"
        )
    return out


def _units(m: nn.Module) -> int:
    """Prunable units of a layer: S4D complex modes N/2, Mamba states N."""
    return m.kernel.log_A_real.shape[1] if is_s4d_layer(m) else m.A_log.shape[1]


def state_sizes(net: nn.Module) -> dict[str, int]:
    """Each SSM layer's state size in the model's own ``d_state`` units (S4D: N = 2·modes)."""
    return {name: (2 if is_s4d_layer(m) else 1) * _units(m) for name, m in ssm_layers(net).items()}


# ---------------------------------------------------------------------------------------- scores
@torch.no_grad()
def state_scores(layer: nn.Module, seq_len: int | None = None) -> torch.Tensor:
    """Contribution of each state (module docstring): S4D (H, N/2) kernel energy, Mamba (N,) gain."""
    if is_s4d_layer(layer):
        dtA, dB, C = layer.kernel.discretize()  # (H, N/2) complex each
        gain = (C * dB).abs().square()  # |C·dB|²                                  (H, N/2)
        r2 = torch.exp(2 * dtA.real)  # |dA|² = exp(2·Re(Δ·A))                     (H, N/2)
        horizon = torch.ones_like(r2) if seq_len is None else 1 - r2.pow(int(seq_len))  # (H, N/2)
        # 1 − |dA|² → 0 for a mode that barely decays: the finite-L sum stays finite (→ L), use it.
        denom = 1 - r2  # (H, N/2)
        if seq_len is None:
            return gain / denom.clamp_min(1e-12)
        return gain * torch.where(
            denom > 1e-12, horizon / denom.clamp_min(1e-12), torch.full_like(r2, seq_len)
        )
    if is_mamba_mixer(layer):
        R, N = layer.dt_rank, layer.A_log.shape[1]
        W = layer.x_proj.weight  # (R + 2N, E), quantized when QAT is on
        w_B = W[R : R + N].norm(dim=1)  # (N,)
        w_C = W[R + N : R + 2 * N].norm(dim=1)  # (N,)
        inv_A = torch.exp(-layer.A_log).sum(0)  # Σ_e 1/|A_en|,  |A| = exp(A_log)    (N,)
        return w_B * w_C * inv_A
    raise PruneError(f"{type(layer).__name__} is not an S4D layer or a Mamba mixer")


def _keep_best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last axis, in their original order.

    A stable sort makes ties (S4D-Lin starts every channel alike) break by position, so the
    same model always keeps the same states.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return order.sort(dim=-1).values


# -------------------------------------------------------------------------------- the surgery
def _replace_param(
    module: nn.Module, name: str, value: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Give ``module.name`` a new (smaller) tensor, keeping its optimizer hint and any hardware.

    A parametrized (quantized) parameter keeps its parametrization: the clean tensor is swapped
    under it. ``rows`` (the kept indices of axis 0) also shrinks per-channel quantizer state
    (running ranges, learned clips) sized by that axis.
    """
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        old = plist.original
        new = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
        if hasattr(old, "_optim"):
            new._optim = dict(old._optim)
        plist.original = new
        if rows is not None:
            for transform in plist:
                _shrink_channel_state(transform, old.shape[0], rows)
        return
    old = getattr(module, name)
    new = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    if hasattr(old, "_optim"):
        new._optim = dict(old._optim)
    setattr(module, name, new)


def _shrink_channel_state(transform: nn.Module, size: int, rows: torch.Tensor) -> None:
    for sub in transform.modules():
        for store in (sub._buffers, sub._parameters):
            for key, t in list(store.items()):
                if t is not None and t.dim() == 1 and t.shape[0] == size:
                    kept = t.detach()[rows].clone()
                    store[key] = (
                        nn.Parameter(kept, requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter)
                        else kept
                    )


@torch.no_grad()
def select_states(layer: nn.Module, index: torch.Tensor) -> None:
    """Keep only the states ``index`` of ``layer``: S4D (H, k) per channel, Mamba (k,).

    Clean (unquantized) values are sliced; quantizers and other hardware stay attached.
    """
    if is_s4d_layer(layer):
        kernel = layer.kernel
        H = kernel.log_A_real.shape[0]
        if index.dim() == 1:
            index = index.expand(H, -1)
        for name in ("log_A_real", "A_imag", "C"):
            value = _clean_value(kernel, name)  # (H, N/2) or (H, N/2, 2)
            idx = index if value.dim() == 2 else index.unsqueeze(-1).expand(-1, -1, value.shape[-1])
            _replace_param(kernel, name, value.gather(1, idx))
        k = index.shape[1]
        kernel.d_state = layer.d_state = 2 * k
        layer.clear_step()
        return
    if is_mamba_mixer(layer):
        R, N = layer.dt_rank, layer.A_log.shape[1]
        _replace_param(layer, "A_log", _clean_value(layer, "A_log")[:, index])  # (E, k)
        rows = torch.cat([torch.arange(R), R + index, R + N + index])  # dt, B, C rows
        x_proj = layer.x_proj
        _replace_param(x_proj, "weight", _clean_value(x_proj, "weight")[rows], rows=rows)  # (R + 2k, E)
        if x_proj.bias is not None:
            _replace_param(x_proj, "bias", _clean_value(x_proj, "bias")[rows], rows=rows)
        x_proj.out_features = rows.numel()
        layer.d_state = index.numel()
        layer._A_memo = None
        return
    raise PruneError(f"{type(layer).__name__} is not an S4D layer or a Mamba mixer")


def _clean_value(module: nn.Module, name: str) -> torch.Tensor:
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original.detach()
    return getattr(module, name).detach()


def prune_layer(layer: nn.Module, keep: int, seq_len: int | None = None) -> None:
    """Keep the ``keep`` highest-ranked units of ``layer`` (S4D: per channel; Mamba: per layer)."""
    units = _units(layer)
    if not 1 <= keep <= units:
        raise PruneError(f"cannot keep {keep} of {units} states: must be in 1..{units}")
    if keep < units:
        select_states(layer, _keep_best(state_scores(layer, seq_len), keep))


# ---------------------------------------------------------------------------------- the record
def prune_record(net: nn.Module, original: dict[str, int] | None = None) -> dict[str, Any]:
    """What a rebuilt model needs to take the pruned shapes: the kept d_state of every SSM layer."""
    sizes = state_sizes(net)
    record: dict[str, Any] = {"method": "state_dim", "d_state": sizes}
    if original is not None:
        record["original_d_state"] = dict(original)
        record["kept_fraction"] = sum(sizes.values()) / max(1, sum(original.values()))
    return record


def apply_prune_record(net: nn.Module, record: dict[str, Any]) -> None:
    """Shrink ``net`` (as built from its config) to the shapes of ``record``; load weights after.

    Keeps the first states of each layer: the values come from the state_dict loaded next.
    """
    if (
        not isinstance(record, dict)
        or record.get("method") not in METHODS
        or not isinstance(record.get("d_state"), dict)
    ):
        raise PruneError(
            f"prune record: expected {{'method': 'state_dim', 'd_state': {{layer: size}}}}, got {record!r}"
        )
    layers = ssm_layers(net)
    for name, size in record["d_state"].items():
        if name not in layers:
            raise PruneError(
                f"prune record: {name!r} is not an SSM layer of this model; layers: {sorted(layers)}"
            )
        layer = layers[name]
        per_unit = 2 if is_s4d_layer(layer) else 1
        units = _units(layer)
        if not isinstance(size, int) or size % per_unit or not 1 <= size // per_unit <= units:
            allowed = f"an even number in 2..{2 * units}" if per_unit == 2 else f"an integer in 1..{units}"
            raise PruneError(f"prune record: d_state of {name} = {size!r} is not allowed: must be {allowed}")
        if size // per_unit < units:
            select_states(layer, torch.arange(size // per_unit))


# ------------------------------------------------------------------------------------ schedule
@dataclass
class PruneResult:
    """The outcome of :func:`prune_state_dims`.

    ``curve``: one row per evaluated step (step 0 = unpruned): kept_fraction, kept_states,
    d_state per layer, metric, drop (positive = worse), within_tolerance, accepted.
    ``record``: the pruning record of the model as it ends (the last accepted step).
    """

    metric: str
    baseline: float
    tolerance: float
    curve: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> dict[str, Any]:
        return [r for r in self.curve if r["accepted"]][-1]

    @property
    def kept_fraction(self) -> float:
        return float(self.accepted["kept_fraction"])


def schedule_sizes(original: dict[str, int], step: int, step_fraction: float) -> dict[str, int]:
    """Units each layer keeps at ``step``: ceil(n0·(1 − step·step_fraction)), at least one."""
    out = {}
    for name, n0 in original.items():
        # The epsilon keeps 32·(1 − 0.875) from rounding up to 5 through float error.
        out[name] = max(1, math.ceil(n0 * (1.0 - step * step_fraction) - 1e-9))
    return out


def prune_state_dims(
    net: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    metric: str = "acc",
    tolerance: float = 0.01,
    step_fraction: float = 0.125,
    finetune: Callable[[nn.Module], None] | None = None,
    seq_len: int | None = None,
    full_curve: bool = True,
    baseline: float | None = None,
) -> PruneResult:
    """Prune ``net`` in place, step by step, while ``evaluate`` stays within ``tolerance``.

    Args:
        evaluate: the metric of a model on a held-out split (eval mode, deterministic).
        metric: its name (acc, loss, ppl, bpc), which says whether larger is better.
        tolerance: allowed absolute drop against the unpruned model (0.01 = 1 % accuracy).
        step_fraction: fraction of each layer's original states removed per step.
        finetune: called after each pruning step, before the evaluation (None: no fine-tuning).
        seq_len: L of the S4D kernel energy (None: infinite horizon).
        full_curve: go on after the first step outside the tolerance, down to one state per
            layer, to draw the whole curve (the model still ends at the last accepted step).
        baseline: the unpruned metric, if already known (saves one evaluation).
    """
    if metric not in HIGHER_IS_BETTER:
        raise PruneError(f"prune.metric={metric!r} is not allowed: choose one of {sorted(HIGHER_IS_BETTER)}")
    if not 0.0 < step_fraction <= 1.0:
        raise PruneError(f"prune.step_fraction={step_fraction!r} is not allowed: must be in (0, 1]")
    if tolerance < 0:
        raise PruneError(f"prune.tolerance={tolerance!r} is not allowed: must be >= 0")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    layers = ssm_layers(net)
    original_units = {name: _units(m) for name, m in layers.items()}
    original_sizes = state_sizes(net)
    total = sum(original_units.values())
    base = float(evaluate(net)) if baseline is None else float(baseline)
    result = PruneResult(metric=metric, baseline=base, tolerance=tolerance)

    def row(step: int, value: float, within: bool, accepted: bool, model: nn.Module) -> dict[str, Any]:
        sizes = state_sizes(model)
        kept = sum(_units(m) for m in ssm_layers(model).values())
        return {
            "step": step,
            "kept_fraction": kept / total,
            "kept_states": kept,
            "d_state": "/".join(str(s) for s in sizes.values()),
            metric: value,
            "drop": sign * (base - value) + 0.0,  # + 0.0: no -0.0 in the CSV
            "within_tolerance": within,
            "accepted": accepted,
        }

    result.curve.append(row(0, base, True, True, net))
    # Prune a copy, so that the model can end at the last accepted step after the curve went on.
    # (Never remove a parametrization from such a copy: torch shares the parametrized class, and
    # with it the property, between a module and its deepcopy.)
    work = copy.deepcopy(net)
    best: tuple[dict, dict] | None = None  # (record, state_dict) of the last accepted step
    in_prefix = True
    step = 0
    previous = dict(original_units)
    while any(n > 1 for n in previous.values()):
        step += 1
        target = schedule_sizes(original_units, step, step_fraction)
        if target == previous:
            continue
        work_layers = ssm_layers(work)
        for name, keep in target.items():
            prune_layer(work_layers[name], keep, seq_len)
        previous = target
        if finetune is not None:
            finetune(work)
        value = float(evaluate(work))
        # NaN (a diverged model) is never within tolerance.
        within = bool(sign * (base - value) <= tolerance + 1e-12)
        accepted = in_prefix and within
        if accepted:
            best = (prune_record(work, original_sizes), {k: v.clone() for k, v in work.state_dict().items()})
        else:
            in_prefix = False
        result.curve.append(row(step, value, within, accepted, work))
        log.info(
            "prune step %d: kept %.3f of the states, %s %.4f (unpruned %.4f)%s",
            step,
            result.curve[-1]["kept_fraction"],
            metric,
            value,
            base,
            "" if accepted else ", rejected",
        )
        if not in_prefix and not full_curve:
            break
    if best is not None:
        apply_prune_record(net, best[0])
        net.load_state_dict(best[1])
        for m in ssm_layers(net).values():
            if is_s4d_layer(m):
                m.clear_step()
    result.record = prune_record(net, original_sizes)
    return result


__all__ = [
    "PruneError",
    "PruneResult",
    "ssm_layers",
    "state_sizes",
    "state_scores",
    "select_states",
    "prune_layer",
    "prune_record",
    "apply_prune_record",
    "schedule_sizes",
    "prune_state_dims",
]
