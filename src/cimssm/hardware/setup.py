"""Turn the quant / noise / analog sections of a run config into hardware on a model.

The one place that reads run-config sections for the hardware library, so train.py, eval.py
and the callbacks apply them identically. No Lightning here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from cimssm.config.validate import ConfigError


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def quant_spec(quant: Mapping | DictConfig) -> dict[str, Any]:
    """The quant section as the spec of :mod:`cimssm.hardware.quantize` (unset parts dropped)."""
    q = dict(_plain(quant))
    q.pop("name", None)
    parts = {}
    for part, settings in (q.get("parts") or {}).items():
        settings = {k: v for k, v in (settings or {}).items() if v is not None}
        if settings:
            parts[part] = settings
    q["parts"] = parts
    return q


# Parts that no shorthand reaches: quantizing the Mamba scan state moves the scan onto its slow
# per-step path, so it happens only when quant.parts.scan_state.bits is set explicitly.
OPT_IN_PARTS = ("scan_state",)


def quant_enabled(quant: Mapping | DictConfig) -> bool:
    q = quant_spec(quant)
    return any(q.get(k) is not None for k in ("weight_bits", "act_bits", "ssm_bits")) or any(
        "bits" in p or "levels" in p for p in q["parts"].values()
    )


def noise_profile(noise: Mapping | DictConfig) -> dict[str, Any]:
    return dict(_plain(noise))


def analog_config(analog: Mapping | DictConfig | None) -> dict[str, Any]:
    return dict(_plain(analog)) if analog is not None else {}


def _as_config_error(err: Exception) -> ConfigError:
    return ConfigError(" ".join(str(err).split()))


def attach_quantizers(net: nn.Module, quant: Mapping | DictConfig) -> list[str]:
    """Attach the quantizers of ``quant`` (both modes; PTQ then needs :func:`calibrate_ptq`)."""
    from cimssm.hardware.quantize import QuantConfigError, apply_quantization

    if not quant_enabled(quant):
        return []
    spec = quant_spec(quant)
    model_parts = getattr(net, "hardware_parts", {})
    for part in OPT_IN_PARTS:
        if part in model_parts and "bits" not in spec["parts"].get(part, {}):
            spec["parts"][part] = {**spec["parts"].get(part, {}), "bits": None}
    try:
        return apply_quantization(net, spec)
    except (QuantConfigError, KeyError) as err:
        raise _as_config_error(err) from err


def attach_training_hardware(net: nn.Module, cfg: DictConfig) -> list[str]:
    """What must be on the model while it trains (and in any model rebuilt from its config):
    QAT quantizers. Training noise is attached per step by TrainingNoiseCallback.
    """
    attached: list[str] = []
    if cfg.quant.mode == "qat":
        attached += attach_quantizers(net, cfg.quant)
    if cfg.noise.kind != "none" or cfg.noise.train:
        check_noise(net, cfg)
    if cfg.get("decomp") is not None:
        check_decomp(net, cfg.decomp)  # a bad HPD target or rank stops the run before training
    return attached


def check_decomp(net: nn.Module, decomp: Mapping | DictConfig | None) -> list[str]:
    """Validate the ``decomp`` section on this model (target exists, rank fits); its targets."""
    from cimssm.hardware.hpd import HPDConfigError, check_decomposition

    try:
        return check_decomposition(net, _plain(decomp) or {})
    except HPDConfigError as err:
        raise _as_config_error(err) from err


def apply_decomp(net: nn.Module, decomp: Mapping | DictConfig | None) -> list[str]:
    """Decompose the layers ``decomp`` selects (after training / checkpoint load and PTQ)."""
    from cimssm.hardware.hpd import HPDConfigError, apply_decomposition

    try:
        return apply_decomposition(net, _plain(decomp) or {})
    except HPDConfigError as err:
        raise _as_config_error(err) from err


def check_noise(net: nn.Module, cfg: DictConfig) -> None:
    """Validate the noise profile and its targets on this model now, not after training."""
    from cimssm.hardware.analog import NoiseConfigError, analog_targets, build_noise_profile

    try:
        profile = build_noise_profile(noise_profile(cfg.noise))
        analog_targets(net, analog_config(cfg.analog), narrow=profile.get("targets"))
    except NoiseConfigError as err:
        raise _as_config_error(err) from err


def calibrate_ptq(net: nn.Module, quant: Mapping | DictConfig, batches: Iterable) -> int:
    """PTQ after training: attach the quantizers, calibrate on a few batches, freeze."""
    from cimssm.hardware.quantize import calibrate

    if not quant_enabled(quant):
        return 0
    attach_quantizers(net, quant)
    return calibrate(net, batches, num_batches=int(quant_spec(quant).get("calib_batches", 8)))
