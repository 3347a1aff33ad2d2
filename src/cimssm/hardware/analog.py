"""Which tensors are analog, noise profiles, and attaching a profile's noise to a model.

The ``analog`` section (a dict) says which parts of a model sit on crossbars:

    include:   ["*"]                         name globs over the analog candidates
    exclude:   ["*embeddings*", "*norm*"]    name globs kept digital
    tile_size: 512                           crossbar tile (rows = cols)

Candidates come from the model's ``hardware_parts`` (docs/architecture.md): every part of kind
``"param"`` and category ``"weight"`` whose parameter belongs to an ``nn.Linear`` / ``nn.Conv1d``
(embedding tables are lookups, never crossbars), plus the SSM matrices (parts ``A_real``,
``A_imag``, ``C`` (S4D taps), ``A`` (Mamba tap), ``D`` (Mamba parameter)). A model without
``hardware_parts`` offers every Linear / Conv1d weight. A tied language-model head is targeted as
``lm_head.weight``: the parametrization lives on the head, so only its matmul is noisy and the
embedding lookup stays clean.

A noise profile (a dict, see :func:`build_noise_profile`) may narrow the analog set with its own
``targets`` globs, never widen it. The notebook API:

    handle = apply_noise(model, {"kind": "gaussian", "level": 0.05}, analog=None, seed=0, chip=3)
    ... evaluate ...
    handle.remove()            # or: with apply_noise(...) as h: ...

Lightning-free (``hardware/`` never imports Lightning).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from cimssm.hardware.core import (
    attach_input_transform,
    attach_output_transform,
    attach_param_transform,
    attach_tap_transform,
    detach_transforms,
    match_names,
    param_names,
    to_plain,
)
from cimssm.hardware.noise import (
    ADCQuantization,
    ConductanceDrift,
    DACQuantization,
    GaussianWeightNoise,
    MultiplicativeWeightNoise,
    NoiseConfigError,
    NoiseTransform,
    QS4DForwardNoise,
    StuckAtFaults,
    chip_seed,
    stable_seed,
)
from cimssm.hardware.pcm import PCMLikeNoiseModel, PCMWeight

__all__ = [
    "DEFAULT_ANALOG",
    "KINDS",
    "NoiseConfigError",
    "NoiseHandle",
    "TrainingNoiseHandle",
    "analog_candidates",
    "analog_targets",
    "apply_noise",
    "attach_training_noise",
    "build_analog_config",
    "build_noise_profile",
    "remove_noise",
]

DEFAULT_ANALOG: dict[str, Any] = {"include": ["*"], "exclude": ["*embeddings*", "*norm*"], "tile_size": 512}

SSM_MATRIX_PARTS = ("A_real", "A_imag", "C", "A", "D")
SSM_A_PARTS = ("A_real", "A_imag", "A")
_CROSSBAR_MODULES = (nn.Linear, nn.Conv1d)

KINDS = ("none", "gaussian", "multiplicative", "drift", "pcm", "stuck", "adc", "qs4d_A")

# What ``level`` means for each kind (also the x-axis of the noise plots).
LEVEL_MEANING = {
    "none": "ignored",
    "gaussian": "std of the additive noise as a fraction of max|W| (per tensor or output channel)",
    "multiplicative": "relative std of each weight, W·(1 + level·ε)",
    "drift": "relative spread (std/mean) of each weight at t_ref after drift",
    "pcm": "multiplier of the PCM model's stochastic parts (programming noise, drift-exponent "
    "spread, read noise, out_noise); 1.0 = the published model, 0 = deterministic mean drift",
    "stuck": "fraction of stuck devices, in [0, 1]",
    "adc": "output noise std in the tile's normalized output units (aihwkit out_noise), every forward",
    "qs4d_A": "std of the additive noise on the SSM A as a fraction of max(A) − min(A), every forward",
}

_COMMON_DEFAULTS: dict[str, Any] = {
    "name": None,
    "kind": "none",
    "level": None,  # kind default below
    "per_channel": False,
    "targets": None,
    "t_inference": None,  # kind default below
    "chips": 5,
    "eval_levels": None,  # [level]
    "train": False,
    "train_scale": 1.0,
    "evaluate": True,
}

KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "pcm": {"g_max": 25.0, "t0": 20.0, "drift_compensation": True, "out_noise": 0.0},
    "drift": {"t_ref": None, "compensation": True, "t0": 20.0, "nu_mean": 0.05},
    "stuck": {"mode": "zero"},
    "adc": {"dac_bits": 8, "adc_bits": 8, "out_bound": 10.0, "in_bound": None},
}
_DEFAULT_LEVEL = {"pcm": 1.0}
_DEFAULT_T = {"pcm": [86400.0], "drift": [86400.0]}


# ------------------------------------------------------------------------------------ validation
def _fail(key: str, value, allowed: str):
    raise NoiseConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _number(key: str, value, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    ok = _is_number(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = "a finite number"
        if lo is not None:
            rng += f" {'>' if lo_open else '>='} {lo:g}"
        if hi is not None:
            rng += f" and <= {hi:g}"
        _fail(key, value, rng)
    return float(value)


def _bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


def _number_list(key: str, value, lo: float = 0.0, hi: float | None = None) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) == 0:
        _fail(key, value, "a non-empty list of numbers >= 0 (seconds for t_inference, fractions for levels)")
    return [_number(f"{key}[{i}]", v, lo, hi) for i, v in enumerate(value)]


def _glob_list(key: str, value) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(g, str) and g for g in value):
        _fail(key, value, "a list of name globs (strings)")
    return list(value)


def _bits(key: str, value) -> int | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 2 <= value <= 16:
        _fail(key, value, "null (off) or an integer number of bits in 2..16")
    return int(value)


def build_analog_config(analog: Mapping | None = None) -> dict[str, Any]:
    """Validate the ``analog`` section and fill defaults (``None`` = all defaults)."""
    cfg = dict(DEFAULT_ANALOG)
    given = to_plain(analog) if analog is not None else {}
    if not isinstance(given, dict):
        _fail("analog", analog, "a mapping with keys include, exclude, tile_size")
    for key, value in given.items():
        if key not in DEFAULT_ANALOG:
            _fail(f"analog.{key}", value, f"unknown key; allowed keys are {sorted(DEFAULT_ANALOG)}")
        cfg[key] = value
    cfg["include"] = _glob_list("analog.include", cfg["include"])
    cfg["exclude"] = _glob_list("analog.exclude", cfg["exclude"])
    ts = cfg["tile_size"]
    if not isinstance(ts, numbers.Integral) or isinstance(ts, bool) or ts <= 0:
        _fail("analog.tile_size", ts, "a positive integer (crossbar rows = cols)")
    cfg["tile_size"] = int(ts)
    return cfg


def build_noise_profile(cfg: Mapping | None) -> dict[str, Any]:
    """Validate a noise profile and fill its defaults; returns a flat plain dict.

    Schema (every key optional; ``params`` may hold the kind-specific keys instead of the top level):

    - ``name``: profile name used in chip seeds and result rows (default: ``kind``)
    - ``kind``: none | gaussian | multiplicative | drift | pcm | stuck | adc | qs4d_A
    - ``level``: float >= 0, the profile's scalar (see ``LEVEL_MEANING``; default 0, pcm 1.0)
    - ``per_channel``: max|W| (gaussian), compensation (drift), g_max (stuck) per output channel
    - ``targets``: globs narrowing the analog set (default: all analog; qs4d_A: the SSM A taps;
      adc: the Linear / Conv1d weights)
    - ``t_inference``: list of seconds after programming (default [0.0]; pcm, drift: [86400.0])
    - ``chips``: Monte-Carlo chips per level (default 5)
    - ``eval_levels``: list of levels to evaluate (default [level])
    - ``train``, ``train_scale``: noise-aware training at level·train_scale
    - ``evaluate``: run the Monte-Carlo evaluation after fit (read by the callback)
    - pcm: ``g_max`` (µS, 25), ``t0`` (s, 20), ``drift_compensation`` (true), ``out_noise`` (0.0;
      extra output noise std in normalized units at every forward)
    - drift: ``t_ref`` (s or null = each evaluated t), ``compensation`` (true), ``t0`` (20),
      ``nu_mean`` (mean drift exponent, 0.05)
    - stuck: ``mode`` zero | gmax
    - adc: ``dac_bits`` (8), ``adc_bits`` (8), ``out_bound`` (10.0), ``in_bound`` (null = per-vector max|x|)

    Keys of another kind are accepted only with value null. Errors are :class:`NoiseConfigError`
    naming the key, the value and what is allowed.
    """
    given = to_plain(cfg) if cfg is not None else {}
    if not isinstance(given, dict):
        _fail("noise", cfg, "a mapping (the noise profile)")
    params = given.pop("params", None) or {}
    if not isinstance(params, dict):
        _fail("noise.params", params, "a mapping of kind-specific settings")
    for key, value in params.items():
        if key in given and given[key] != value:
            _fail(f"noise.params.{key}", value, f"set once (noise.{key}={given[key]!r} is also set)")
        given[key] = value

    kind = given.get("kind", "none")
    if kind not in KINDS:
        _fail("noise.kind", kind, f"one of {list(KINDS)}")
    kind_keys = KIND_DEFAULTS.get(kind, {})
    all_kind_keys = {k for d in KIND_DEFAULTS.values() for k in d}
    for key, value in given.items():
        if key in _COMMON_DEFAULTS or key in kind_keys:
            continue
        if key in all_kind_keys:
            if value is None:
                continue
            owners = [k for k, d in KIND_DEFAULTS.items() if key in d]
            _fail(
                f"noise.{key}",
                value,
                f"a setting of kind {owners}, not of kind {kind!r} (its settings: {sorted(kind_keys)})",
            )
        allowed = sorted(set(_COMMON_DEFAULTS) | set(kind_keys) | {"params"})
        _fail(f"noise.{key}", value, f"unknown key; allowed keys for kind {kind!r} are {allowed}")

    p: dict[str, Any] = dict(_COMMON_DEFAULTS)
    p.update(kind_keys)
    # null means "the default" for every key that has one
    p.update({k: v for k, v in given.items() if k in p and (v is not None or p[k] is None)})
    p["kind"] = kind
    p["name"] = kind if p.get("name") is None else str(p["name"])

    if p["level"] is None:
        p["level"] = _DEFAULT_LEVEL.get(kind, 0.0)
    hi = 1.0 if kind == "stuck" else None
    p["level"] = _number("noise.level", p["level"], 0.0, hi)
    p["per_channel"] = _bool("noise.per_channel", p["per_channel"])
    if p["targets"] is not None:
        p["targets"] = _glob_list("noise.targets", p["targets"])
    if p["t_inference"] is None:
        p["t_inference"] = list(_DEFAULT_T.get(kind, [0.0]))
    p["t_inference"] = _number_list("noise.t_inference", p["t_inference"])
    chips = p["chips"]
    if not isinstance(chips, numbers.Integral) or isinstance(chips, bool) or chips < 1:
        _fail("noise.chips", chips, "an integer >= 1")
    p["chips"] = int(chips)
    if p["eval_levels"] is None:
        p["eval_levels"] = [p["level"]]
    p["eval_levels"] = _number_list("noise.eval_levels", p["eval_levels"], 0.0, hi)
    p["train"] = _bool("noise.train", p["train"])
    p["train_scale"] = _number("noise.train_scale", p["train_scale"], 0.0)
    p["evaluate"] = _bool("noise.evaluate", p["evaluate"])

    if kind == "pcm":
        p["g_max"] = _number("noise.g_max", p["g_max"], 0.0, lo_open=True)
        p["t0"] = _number("noise.t0", p["t0"], 0.0, lo_open=True)
        p["drift_compensation"] = _bool("noise.drift_compensation", p["drift_compensation"])
        p["out_noise"] = _number("noise.out_noise", p["out_noise"], 0.0)
    elif kind == "drift":
        if p["t_ref"] is not None:
            p["t_ref"] = _number("noise.t_ref", p["t_ref"], 0.0, lo_open=True)
        p["compensation"] = _bool("noise.compensation", p["compensation"])
        p["t0"] = _number("noise.t0", p["t0"], 0.0, lo_open=True)
        p["nu_mean"] = _number("noise.nu_mean", p["nu_mean"], 0.0)
    elif kind == "stuck":
        if p["mode"] not in ("zero", "gmax"):
            _fail("noise.mode", p["mode"], "'zero' or 'gmax'")
    elif kind == "adc":
        p["dac_bits"] = _bits("noise.dac_bits", p["dac_bits"])
        p["adc_bits"] = _bits("noise.adc_bits", p["adc_bits"])
        p["out_bound"] = _number("noise.out_bound", p["out_bound"], 0.0, lo_open=True)
        if p["in_bound"] is not None:
            p["in_bound"] = _number("noise.in_bound", p["in_bound"], 0.0, lo_open=True)
    return p


# ------------------------------------------------------------------------------------ targeting
def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


def _is_crossbar_weight(model: nn.Module, name: str) -> bool:
    owner, leaf = _owner(model, name)
    return leaf == "weight" and isinstance(owner, _CROSSBAR_MODULES)


def analog_candidates(model: nn.Module) -> dict[str, dict[str, str]]:
    """Every tensor that may be analog: ``name -> {"where": "param" | "tap", "part": part name}``."""
    pnames = param_names(model)
    parts = getattr(model, "hardware_parts", None)
    out: dict[str, dict[str, str]] = {}
    if parts is None:
        for n in pnames:
            if _is_crossbar_weight(model, n):
                out[n] = {"where": "param", "part": "weight"}
        return out
    mnames = [n for n, _ in model.named_modules()]
    # A part marked "analog": False (HPD's digital factor, hardware/hpd.py) keeps its tensors
    # digital, whatever other parts' globs match them.
    digital = {
        n for spec in parts.values() if spec.get("analog") is False for n in match_names(pnames, spec.get("targets", []))
    }
    for part, spec in parts.items():
        kind, category, globs = spec.get("kind"), spec.get("category"), spec.get("targets", [])
        if spec.get("analog") is False:
            continue
        if kind == "param" and category == "weight":
            for n in match_names([p for p in pnames if p not in digital], globs):
                if _is_crossbar_weight(model, n):
                    out.setdefault(n, {"where": "param", "part": part})
        elif part in SSM_MATRIX_PARTS and category == "ssm":
            if kind == "param":
                for n in match_names(pnames, globs):
                    out.setdefault(n, {"where": "param", "part": part})
            elif kind == "tap":
                for n in match_names(mnames, globs):
                    out.setdefault(n, {"where": "tap", "part": part})
    return out


def analog_targets(
    model: nn.Module, analog_cfg: Mapping | None = None, narrow: Sequence[str] | None = None
) -> list[str]:
    """Names of the analog tensors: candidates matching ``include``, not ``exclude``, then ``narrow``.

    Every ``include`` glob and every ``narrow`` glob must match at least one name (otherwise
    :class:`NoiseConfigError` naming the glob); ``exclude`` globs may match nothing (the defaults
    cover names of several models).
    """
    cfg = build_analog_config(analog_cfg)
    cands = list(analog_candidates(model))
    for g in cfg["include"]:
        if not match_names(cands, [g]):
            _fail(
                "analog.include", g, f"a glob matching an analog candidate of {type(model).__name__}: {cands}"
            )
    selected = match_names(cands, cfg["include"], cfg["exclude"])
    if narrow is not None:
        narrow = _glob_list("noise.targets", narrow)
        for g in narrow:
            if not match_names(selected, [g]):
                _fail(
                    "noise.targets",
                    g,
                    f"a glob matching one of the analog tensors {selected} (a profile may only narrow the analog set)",
                )
        selected = match_names(selected, narrow)
    return selected


def _profile_targets(model: nn.Module, profile: dict, analog: dict) -> list[tuple[str, dict[str, str]]]:
    cands = analog_candidates(model)
    names = analog_targets(model, analog, profile["targets"])
    kind = profile["kind"]
    if kind == "qs4d_A" and profile["targets"] is None:
        names = [n for n in names if cands[n]["part"] in SSM_A_PARTS]
        if not names:
            _fail(
                "noise.kind",
                kind,
                f"a model with analog SSM A tensors (parts {SSM_A_PARTS}); analog set: {analog_targets(model, analog)}",
            )
    if kind == "adc":
        names = [n for n in names if cands[n]["where"] == "param" and _is_crossbar_weight(model, n)]
        if not names:
            _fail(
                "noise.kind",
                kind,
                "a profile whose targets include Linear / Conv1d weights (DAC/ADC sit on layers)",
            )
    return [(n, cands[n]) for n in names]


# ------------------------------------------------------------------------------------ handles
class NoiseHandle:
    """The transforms one profile attached to a model; ``remove()`` restores the clean model.

    ``program(seed)`` starts a new chip (each transform gets ``sha256(seed, target, role)``),
    ``set_time(t)`` moves to another inference time keeping the chip. Usable as a context manager.
    """

    def __init__(
        self, model: nn.Module, profile: dict, level: float, entries: list[tuple[str, str, NoiseTransform]]
    ):
        self.model = model
        self.profile = profile
        self.level = level
        self.entries = entries
        self.seed: int | None = None
        self.t_inference = 0.0
        self.removed = False

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys(name for name, _, _ in self.entries))

    @property
    def transforms(self) -> list[NoiseTransform]:
        return [t for _, _, t in self.entries]

    def program(self, seed: int) -> None:
        self.seed = int(seed)
        for name, role, t in self.entries:
            t.program(stable_seed(self.seed, name, role))

    def set_time(self, t_inference: float) -> None:
        self.t_inference = _number("t_inference", t_inference, 0.0)
        for _, _, t in self.entries:
            t.set_time(self.t_inference)

    def remove(self) -> int:
        """Detach this handle's transforms (clean weights come back bit for bit); returns how many."""
        if self.removed:
            return 0
        ids = {id(t) for t in self.transforms}
        n = detach_transforms(self.model, lambda m: id(m) in ids)
        self.removed = True
        return n

    def __enter__(self) -> NoiseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.profile['kind']!r}, level={self.level}, targets={len(self.targets)})"


class TrainingNoiseHandle(NoiseHandle):
    """Noise-aware training: ``resample(step)`` redraws every transform for that training step."""

    def __init__(self, *args, base_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_seed = int(base_seed)

    def resample(self, step: int) -> None:
        self.program(stable_seed("train", self.base_seed, self.profile["name"], int(step)))


def _crossbar_channel_dim(module: nn.Module) -> int | tuple[int, ...]:
    """Dims of one crossbar input vector: Linear: features; pointwise Conv1d: channels per
    position; other Conv1d (output positions mix input positions): the whole sample."""
    if isinstance(module, nn.Conv1d):
        pointwise = module.kernel_size == (1,) and module.stride == (1,) and module.padding in ((0,), "valid")
        return 1 if pointwise else (1, 2)
    return -1


def _noise_reference(model: nn.Module, name: str, where: str, per_channel: bool):
    """max|W| of the matrix a weight was decomposed from (HPD with ``noise_reference=original``):
    the owner's buffer ``noise_reference_abs_max`` (per output row with ``per_channel`` when the
    owner has ``noise_reference_abs_max_rows``); None when the weight's own max is the reference."""
    if where != "param":
        return None
    owner, _ = _owner(model, name)
    ref = getattr(owner, "noise_reference_abs_max", None)
    rows = getattr(owner, "noise_reference_abs_max_rows", None)
    return rows if per_channel and rows is not None and ref is not None else ref


def _attach(
    model: nn.Module, profile: dict, analog: dict, level: float, t_inference: float, cls=NoiseHandle, **kw
):
    kind = profile["kind"]
    entries: list[tuple[str, str, NoiseTransform]] = []
    if kind != "none":
        for name, info in _profile_targets(model, profile, analog):
            where = info["where"]

            def attach(t: NoiseTransform, name=name, where=where) -> None:
                (attach_param_transform if where == "param" else attach_tap_transform)(model, name, t)
                entries.append((name, "weight", t))

            def attach_io(dac: DACQuantization, adc: ADCQuantization, name=name) -> None:
                owner_name = name.rpartition(".")[0]
                attach_input_transform(model, owner_name, dac)
                attach_output_transform(model, owner_name, adc)
                entries.extend([(name, "input", dac), (name, "output", adc)])

            if kind == "gaussian":
                ref = _noise_reference(model, name, where, profile["per_channel"])
                attach(GaussianWeightNoise(level, profile["per_channel"], reference=ref))
            elif kind == "multiplicative":
                attach(MultiplicativeWeightNoise(level))
            elif kind == "drift":
                attach(
                    ConductanceDrift(
                        level,
                        t_ref=profile["t_ref"],
                        t0=profile["t0"],
                        nu_mean=profile["nu_mean"],
                        compensation=profile["compensation"],
                        per_channel=profile["per_channel"],
                    )
                )
            elif kind == "pcm":
                device = PCMLikeNoiseModel(
                    g_max=profile["g_max"],
                    t0=profile["t0"],
                    prog_noise_scale=level,
                    read_noise_scale=level,
                    drift_noise_scale=level,
                )
                ref = _noise_reference(model, name, where, per_channel=False)
                attach(
                    PCMWeight(device, analog["tile_size"], profile["drift_compensation"], t_inference, reference=ref)
                )
                out_noise = profile["out_noise"] * level
                if out_noise > 0 and where == "param" and _is_crossbar_weight(model, name):
                    owner, _ = _owner(model, name)
                    dac = DACQuantization(bits=None, channel_dim=_crossbar_channel_dim(owner))
                    attach_io(
                        dac, ADCQuantization(dac, owner, bits=None, out_bound=None, out_noise=out_noise)
                    )
            elif kind == "stuck":
                attach(StuckAtFaults(level, profile["mode"], analog["tile_size"], profile["per_channel"]))
            elif kind == "adc":
                owner, _ = _owner(model, name)
                dac = DACQuantization(profile["dac_bits"], profile["in_bound"], _crossbar_channel_dim(owner))
                adc = ADCQuantization(dac, owner, profile["adc_bits"], profile["out_bound"], out_noise=level)
                attach_io(dac, adc)
            elif kind == "qs4d_A":
                attach(QS4DForwardNoise(level))
    return cls(model, profile, level, entries, **kw)


# ------------------------------------------------------------------------------------ public API
def apply_noise(
    model: nn.Module,
    profile: Mapping,
    analog: Mapping | None = None,
    seed: int = 0,
    level: float | None = None,
    chip: int = 0,
    t_inference: float | None = None,
    profile_name: str | None = None,
) -> NoiseHandle:
    """Attach one chip of ``profile`` to ``model``; returns a :class:`NoiseHandle`.

    The chip is programmed with ``chip_seed(seed, profile_name or profile["name"], level, chip)``
    and set to ``t_inference`` (default: the profile's first). ``level`` overrides the profile's.
    The weights are perturbed from the clean ones at every forward with the chip's fixed draws
    (no copies of the model). ``handle.remove()`` or leaving a ``with`` block restores the clean
    weights bit for bit.
    """
    prof = build_noise_profile(profile)
    ana = build_analog_config(analog)
    lvl = (
        prof["level"]
        if level is None
        else _number("level", level, 0.0, 1.0 if prof["kind"] == "stuck" else None)
    )
    t = prof["t_inference"][0] if t_inference is None else _number("t_inference", t_inference, 0.0)
    handle = _attach(model, prof, ana, lvl, t)
    handle.program(chip_seed(seed, profile_name or prof["name"], lvl, chip))
    handle.set_time(t)
    return handle


def attach_training_noise(
    model: nn.Module,
    profile: Mapping,
    analog: Mapping | None = None,
    seed: int = 0,
    scale: float | None = None,
) -> TrainingNoiseHandle:
    """Noise-aware training: attach the profile at ``level · scale`` (default scale: ``train_scale``).

    Call ``handle.resample(step)`` before each training step (new draws, keyed by (seed, step)),
    and ``handle.remove()`` before evaluating or saving clean weights.
    """
    prof = build_noise_profile(profile)
    ana = build_analog_config(analog)
    s = prof["train_scale"] if scale is None else _number("scale", scale, 0.0)
    level = prof["level"] * s
    if prof["kind"] == "stuck":
        level = min(level, 1.0)
    t = prof["t_inference"][0]
    handle = _attach(model, prof, ana, level, t, cls=TrainingNoiseHandle, base_seed=seed)
    handle.set_time(t)
    handle.resample(0)
    return handle


def remove_noise(model: nn.Module) -> int:
    """Detach every noise transform from ``model`` (any handle); returns how many."""
    return detach_transforms(model, lambda m: isinstance(m, NoiseTransform))
