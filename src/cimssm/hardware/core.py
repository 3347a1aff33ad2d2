"""Attach points for hardware transforms: weights, named taps and layer inputs.

Quantizers and noise models are small ``nn.Module`` transforms ``f(x) -> x'``. They reach a
model only through the three functions here, so they compose in the order they are attached
(quantize first, then noise) and can be removed again without touching the clean weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


class TransformChain(nn.Module):
    """Applies its transforms in order; replaces an ``nn.Identity`` tap."""

    def __init__(self, transforms: Iterable[nn.Module] = ()):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


def to_plain(x: Any) -> Any:
    """Config containers (OmegaConf included: any mapping / sequence) to plain dicts and lists."""
    if isinstance(x, Mapping):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str | bytes):
        return [to_plain(v) for v in x]
    return x


def match_names(names: Iterable[str], globs: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Names matching any of ``globs`` and none of ``exclude`` (fnmatch, case-sensitive), in order."""
    globs, exclude = list(globs), list(exclude)
    return [
        n
        for n in names
        if any(fnmatchcase(n, g) for g in globs) and not any(fnmatchcase(n, g) for g in exclude)
    ]


def _split(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def _clean_param_names(model: nn.Module) -> list[str]:
    """Parameter names as the model defines them, hiding parametrization internals.

    ``a.parametrizations.weight.original`` is reported as ``a.weight``.
    """
    out = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        out.append(name.replace(".parametrizations.", ".").removesuffix(".original"))
    return list(dict.fromkeys(out))


def param_names(model: nn.Module) -> list[str]:
    return _clean_param_names(model)


def attach_param_transform(model: nn.Module, param_name: str, transform: nn.Module) -> None:
    """Register ``transform`` as a parametrization of ``param_name`` (appended to any existing)."""
    owner_name, leaf = _split(param_name)
    owner = model.get_submodule(owner_name) if owner_name else model
    if not parametrize.is_parametrized(owner, leaf) and not isinstance(
        getattr(owner, leaf, None), nn.Parameter
    ):
        raise KeyError(f"{param_name!r} is not a parameter of {type(model).__name__}")
    parametrize.register_parametrization(owner, leaf, transform)


def attach_tap_transform(model: nn.Module, tap_name: str, transform: nn.Module) -> None:
    """Append ``transform`` to the tap ``tap_name`` (an ``nn.Identity`` becomes a chain)."""
    tap = model.get_submodule(tap_name)
    if isinstance(tap, nn.Identity):
        chain = TransformChain([transform])
        model.set_submodule(tap_name, chain)
    elif isinstance(tap, TransformChain):
        tap.transforms.append(transform)
    else:
        raise TypeError(f"{tap_name!r} is a {type(tap).__name__}, not a tap (nn.Identity)")


def _input_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.hw_input(args[0]),) + tuple(args[1:])


def attach_input_transform(model: nn.Module, module_name: str, transform: nn.Module) -> None:
    """Transform the first positional input of ``module_name`` before its forward."""
    module = model.get_submodule(module_name)
    chain = getattr(module, "hw_input", None)
    if chain is None:
        module.hw_input = TransformChain([transform])
        module._hw_input_hook = module.register_forward_pre_hook(_input_pre_hook)
    else:
        chain.transforms.append(transform)


def _output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.hw_output(output)


def attach_output_transform(model: nn.Module, module_name: str, transform: nn.Module) -> None:
    """Transform the output of ``module_name`` after its forward (e.g. ADC quantization)."""
    module = model.get_submodule(module_name)
    chain = getattr(module, "hw_output", None)
    if chain is None:
        module.hw_output = TransformChain([transform])
        module._hw_output_hook = module.register_forward_hook(_output_hook)
    else:
        chain.transforms.append(transform)


def iter_transforms(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Every attached transform with a name saying where it sits."""
    for name, module in model.named_modules():
        if isinstance(module, TransformChain):
            for i, t in enumerate(module.transforms):
                yield f"{name}.transforms.{i}", t
        if isinstance(module, parametrize.ParametrizationList):
            for i, t in enumerate(module):
                yield f"{name}.{i}", t


def detach_transforms(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> int:
    """Remove every attached transform for which ``predicate`` holds; returns how many.

    Weights go back to their clean values bit for bit (the original tensor is never written).
    """
    removed = 0
    # Parametrizations: rebuild the list without the removed ones.
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for leaf in list(module.parametrizations.keys()):
            plist = module.parametrizations[leaf]
            keep = [t for t in plist if not predicate(t)]
            if len(keep) == len(plist):
                continue
            removed += len(plist) - len(keep)
            parametrize.remove_parametrizations(module, leaf, leave_parametrized=False)
            for t in keep:
                parametrize.register_parametrization(module, leaf, t)
    # Tap and input chains.
    for name, module in list(model.named_modules()):
        if isinstance(module, TransformChain):
            keep = [t for t in module.transforms if not predicate(t)]
            removed += len(module.transforms) - len(keep)
            module.transforms = nn.ModuleList(keep)
            if not keep and _split(name)[1] not in ("hw_input", "hw_output"):
                model.set_submodule(name, nn.Identity())
    for module in list(model.modules()):
        for attr in ("hw_input", "hw_output"):
            chain = module._modules.get(attr)
            if isinstance(chain, TransformChain) and len(chain.transforms) == 0:
                getattr(module, f"_{attr}_hook").remove()
                delattr(module, attr)
                delattr(module, f"_{attr}_hook")
    return removed
