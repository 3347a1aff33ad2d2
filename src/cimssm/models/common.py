"""Pieces both model families share."""

from __future__ import annotations

from torch import nn

TASKS = ("lm", "classification")
POOLS = ("mean", "last")


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (hardware transforms are hooks or chains).

    Fast paths skip a module's ``__call__`` only when this is false, so attached hardware is
    never bypassed.
    """
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_forward_hooks
    )
