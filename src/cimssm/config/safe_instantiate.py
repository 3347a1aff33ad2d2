"""Instantiate configs that come from untrusted places (checkpoints, stored run configs).

A ``_target_`` is a dotted path that Hydra imports and calls, so a config read back from a
checkpoint someone sent you is code. Such configs go through :func:`check_targets` (and
:func:`safe_instantiate`) instead of ``hydra.utils.instantiate`` alone:

- every ``_target_`` anywhere in the config must start with one of :data:`ALLOWED_PREFIXES`
  (or be one of :data:`ALLOWED_NAMES`) and must not fall under :data:`DENIED_PREFIXES`
  (project code that reads or writes files or starts processes);
- no path component may start with ``_`` (``__subclasses__``, ``__globals__`` escape any prefix);
- the dotted path is resolved step by step without calling anything, and every module passed
  through and the final object's defining module must themselves be allowed: a re-exported
  module such as ``torch.nn.modules.module.torch`` (the ``torch`` package, whose ``load``
  unpickles files) is refused even though its spelling starts with ``torch.nn.``;
- interpolations (``${...}``) are refused: a stored config is saved resolved, and a resolver
  could read the environment.

Refusals raise :class:`~cimssm.config.validate.ConfigError` naming the key, the target and
what is allowed, before anything is imported or called for that key.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cimssm.config.validate import ConfigError

#: Dotted-path prefixes a stored config may instantiate (the issue's list).
ALLOWED_PREFIXES: tuple[str, ...] = (
    "cimssm.",
    "torch.nn.",
    "torch.optim.",
    "torchmetrics.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
)
#: Exact names allowed besides the prefixes: every run config names its Trainer.
ALLOWED_NAMES: frozenset[str] = frozenset({"lightning.pytorch.Trainer"})
#: Inside the prefixes, modules that read or write files, download weights or start processes.
DENIED_PREFIXES: tuple[str, ...] = (
    # project code that loads checkpoints, writes run files or runs whole jobs
    "cimssm.checkpoints",
    "cimssm.cli",
    "cimssm.config",
    "cimssm.evaluation",
    "cimssm.hardware.export",
    "cimssm.pipeline",
    "cimssm.sweeps",
    "cimssm.utils",
    # torchmetrics families that fetch pretrained networks (CLIP, BERT, Inception, DNSMOS, ...)
    "torchmetrics.audio",
    "torchmetrics.functional.audio",
    "torchmetrics.functional.image",
    "torchmetrics.functional.multimodal",
    "torchmetrics.functional.text",
    "torchmetrics.image",
    "torchmetrics.multimodal",
    "torchmetrics.text",
)


def _allowed_text() -> str:
    return ", ".join([*ALLOWED_PREFIXES, *sorted(ALLOWED_NAMES)])


def _denied(name: str) -> bool:
    return any(name == d or name.startswith(d + ".") for d in DENIED_PREFIXES)


def _inside(name: str) -> bool:
    """Is the dotted ``name`` (a target or a module) inside the allow-list and outside the deny-list?"""
    return not _denied(name) and (name in ALLOWED_NAMES or (name + ".").startswith(ALLOWED_PREFIXES))


def _passable(module_name: str) -> bool:
    # Modules a path may walk through: allowed ones and their parent packages ("torch", "lightning").
    return _inside(module_name) or any(
        p.startswith(module_name + ".") for p in (*ALLOWED_PREFIXES, *ALLOWED_NAMES)
    )


def resolve_target(target: Any, key: str = "_target_", source: str = "config") -> Any:
    """Import and return the object ``target`` names, if the allow-list permits it.

    ``key`` (e.g. ``model._target_``) and ``source`` (e.g. the checkpoint path) go into the error.
    The object itself must be defined in an allowed module (not only spelled like one):
    ``torch.nn.modules.module.torch.from_file`` is ``torch.from_file``, which reads files.
    """
    where = f"{source}: {key}"
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where}={target!r} is not allowed: a dotted name is required")
    if _denied(target):
        raise ConfigError(
            f"{where}={target!r} is not allowed: {target.rsplit('.', 1)[0]} touches files, downloads or "
            "processes; a stored config may only build models, data, metrics, callbacks and loggers"
        )
    if not _inside(target):
        raise ConfigError(
            f"{where}={target!r} is not allowed: a stored config may only instantiate {_allowed_text()}"
        )
    parts = target.split(".")
    if any(not p.isidentifier() or p.startswith("_") for p in parts):
        raise ConfigError(f"{where}={target!r} is not allowed: private or malformed name component")
    # Import the longest module prefix, then walk attributes without calling anything.
    obj: Any = None
    i = len(parts)
    while i > 0 and obj is None:
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            i -= 1
        except Exception as err:  # an allowed module that fails to import
            raise ConfigError(f"{where}={target!r} cannot be imported: {type(err).__name__}: {err}") from err
    if obj is None:
        raise ConfigError(f"{where}={target!r} cannot be imported: no such module")
    for part in parts[i:]:
        if isinstance(obj, ModuleType) and not _passable(obj.__name__):
            raise ConfigError(f"{where}={target!r} is not allowed: it passes through module {obj.__name__}")
        try:
            obj = getattr(obj, part) if isinstance(obj, ModuleType) else inspect.getattr_static(obj, part)
        except AttributeError as err:
            raise ConfigError(f"{where}={target!r} cannot be imported: no attribute {part!r}") from err
        if isinstance(obj, staticmethod | classmethod):
            obj = obj.__func__
    if isinstance(obj, ModuleType) or not callable(obj):
        raise ConfigError(f"{where}={target!r} is not allowed: it is not a class or function")
    home = getattr(obj, "__module__", None)
    if target not in ALLOWED_NAMES and not (isinstance(home, str) and _inside(home)):
        raise ConfigError(
            f"{where}={target!r} is not allowed: it is defined in {home or 'an unknown module'}, "
            f"outside {_allowed_text()}"
        )
    return obj


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain or OmegaConf container, without resolving."""
    if isinstance(node, DictConfig):
        items = [(str(k), node._get_node(k)) for k in node.keys()]
    elif isinstance(node, Mapping):
        items = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, ListConfig):
        items = [(f"[{i}]", node._get_node(i)) for i in range(len(node))]
    elif isinstance(node, list | tuple):
        items = [(f"[{i}]", v) for i, v in enumerate(node)]
    else:
        yield path, node
        return
    for k, v in items:
        child = f"{path}{k}" if k.startswith("[") or not path else f"{path}.{k}"
        if hasattr(v, "_value") and not isinstance(v, DictConfig | ListConfig):
            v = v._value()  # an OmegaConf leaf node: its raw value, interpolations unresolved
        yield from _walk(v, child)


def check_targets(cfg: Any, source: str = "config") -> int:
    """Refuse a stored config with any disallowed ``_target_`` or any interpolation.

    Returns how many targets were checked. Nothing is called; allowed modules are imported.
    """
    n = 0
    for key, value in _walk(cfg, ""):
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{source}: {key}={value!r} is not allowed: a stored config must be resolved (no ${{...}})"
            )
        if key == "_target_" or key.endswith("._target_"):
            resolve_target(value, key, source)
            n += 1
    return n


def safe_instantiate(node: Any, *args: Any, source: str = "config", **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` for untrusted configs: every target is checked first.

    ``kwargs`` come from the caller's code (trusted) and are not checked.
    """
    import hydra

    if isinstance(node, Mapping | DictConfig):
        check_targets(node, source)
    return hydra.utils.instantiate(node, *args, **kwargs)


def stored_config_from_dict(data: Any, source: str) -> DictConfig:
    """An OmegaConf config from a stored plain dict, its targets and strings checked first."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the stored config is a {type(data).__name__}, not a mapping")
    check_targets(data, source)
    return OmegaConf.create(dict(data))


def resolve_path(key: str, value: Any, kind: str = "file", expected: str = "") -> Path:
    """``value`` as an absolute path (``~`` expanded, symlinks resolved) that exists as ``kind``.

    kind: "file" (a non-empty regular file) or "dir". ``expected`` says what should be there.
    """
    hint = f"; expected {expected}" if expected else ""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{key}={value!r} is not a path{hint}")
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"{key}={value}: no such {'file' if kind == 'file' else 'directory'}{hint}")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{key}={value} is not a directory{hint}")
    if kind == "file":
        if not path.is_file():
            raise ConfigError(f"{key}={value} is not a file{hint}")
        if path.stat().st_size == 0:
            raise ConfigError(f"{key}={value} is empty{hint}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}={value} is not readable{hint}")
    return path


__all__ = [
    "ALLOWED_PREFIXES",
    "ALLOWED_NAMES",
    "DENIED_PREFIXES",
    "check_targets",
    "resolve_target",
    "safe_instantiate",
    "stored_config_from_dict",
    "resolve_path",
]
