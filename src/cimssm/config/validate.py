"""Validate a composed config against the structured schemas before anything is built.

Every problem becomes a :class:`ConfigError` whose message is one line naming the key, the bad
value and what is allowed. Entry points print it and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cimssm.config.schema import SCHEMAS, QuantPartConfig


class ConfigError(ValueError):
    """A config value that is not allowed; the message is a single line."""


TOP_LEVEL = {
    "seed": int,
    "ckpt_path": (str, type(None)),
    "task_name": str,
    "experiment_name": str,
    "compile": bool,
    "threads": (int, type(None)),
    "tags": (list, ListConfig),
    "test_after_fit": bool,
    "output_dir": (str, type(None)),
    "optimized_metric": (str, type(None)),
}


def _fmt(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else str(value)


def _type_ok(value: Any, hint: Any) -> tuple[bool, str]:
    """Is ``value`` an acceptable instance of the dataclass type ``hint``? Also names the type."""
    if isinstance(hint, str):
        hint = eval(hint, vars(typing), {"Any": Any})  # annotations are strings (future import)
    if hint is Any:
        return True, "any"
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        oks = [_type_ok(value, a) for a in args]
        return any(ok for ok, _ in oks), " or ".join(n for _, n in oks)
    if hint is type(None):
        return value is None, "null"
    if hint is bool:
        return isinstance(value, bool), "bool"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "int"
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool), "float"
    if hint is str:
        return isinstance(value, str), "str"
    if hint is list:
        return isinstance(value, list | ListConfig), "list"
    if hint is dict:
        return isinstance(value, dict | DictConfig), "dict"
    return True, getattr(hint, "__name__", str(hint))


def _check_limits(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"] if c is not None)
        raise ConfigError(f"{key}={_fmt(value)} is not allowed: choose one of {allowed}")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}=nan is not allowed: a number is required")
    checks = {
        "gt": (lambda v, b: v > b, ">"),
        "ge": (lambda v, b: v >= b, ">="),
        "lt": (lambda v, b: v < b, "<"),
        "le": (lambda v, b: v <= b, "<="),
    }
    bounds = [(op, meta[name]) for name, op in checks.items() if name in meta]
    for (ok, _sym), bound in bounds:
        if not ok(value, bound):
            allowed = " and ".join(f"{s} {b}" for (_, s), b in bounds)
            raise ConfigError(f"{key}={_fmt(value)} is not allowed: must be {allowed}")


def check_node(prefix: str, node: DictConfig, schema: type, label: str | None = None) -> None:
    """Check the keys, types and limits of one config section against one dataclass schema."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            allowed = ", ".join(k for k in fields if not k.startswith("_"))
            where = f"{prefix} ({label})" if label else prefix
            raise ConfigError(f"{prefix}.{key} is not a key of {where}; allowed keys: {allowed}")
    for name, f in fields.items():
        if name not in node:
            continue
        value = node[name]
        ok, tname = _type_ok(value, f.type)
        if not ok:
            raise ConfigError(f"{prefix}.{name}={_fmt(value)} has the wrong type: expected {tname}")
        _check_limits(f"{prefix}.{name}", value, dict(f.metadata))


def _check_numbers(key: str, values: Any, *, ge: float = 0.0) -> None:
    if not isinstance(values, list | ListConfig):
        raise ConfigError(f"{key}={_fmt(values)} is not allowed: must be a list of numbers >= {ge:g}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or v < ge or math.isnan(v):
            raise ConfigError(f"{key} contains {_fmt(v)}: every entry must be a number >= {ge:g}")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Raise ConfigError on the first problem; returns ``cfg`` unchanged otherwise."""
    for key, types in TOP_LEVEL.items():
        allowed = types if isinstance(types, tuple) else (types,)
        if key in cfg and not isinstance(cfg[key], allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{key}={_fmt(cfg[key])} has the wrong type: expected {names}")
    if cfg.get("threads") is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} is not allowed: torch intra-op threads, >= 1 (or null: torch's default)")
    for group, options in SCHEMAS.items():
        if group not in cfg or cfg[group] is None:
            continue
        node = cfg[group]
        if "" in options:
            check_node(group, node, options[""])
            continue
        name = node.get("name")
        if name not in options:
            raise ConfigError(f"{group}.name={_fmt(name)} is unknown; allowed: {', '.join(options)}")
        check_node(group, node, options[name], label=name)
    if "noise" in cfg:
        _check_numbers("noise.eval_levels", cfg.noise.eval_levels)
        _check_numbers("noise.t_inference", cfg.noise.t_inference)
    if "quant" in cfg:
        for part, spec in cfg.quant.parts.items():
            if not isinstance(spec, DictConfig):
                raise ConfigError(f"quant.parts.{part}={_fmt(spec)} must be a mapping like {{bits: 8}}")
            check_node(f"quant.parts.{part}", spec, QuantPartConfig)
    if "model" in cfg and cfg.model.get("name") == "mamba_hf" and not cfg.model.get("path"):
        raise ConfigError("model.path is required for model=mamba_hf: a local directory with config.json")
    opt = cfg.get("optimizer")
    if opt is not None and len(opt.betas) != 2:
        raise ConfigError(f"optimizer.betas={_fmt(opt.betas)} must hold two numbers in [0, 1)")
    return cfg
