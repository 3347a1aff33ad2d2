"""Entry-point plumbing shared by train.py and eval.py.

Configuration mistakes end the program with one line on stderr and exit status 2, whether Hydra
finds them while composing (unknown group option, unknown key, bad override syntax) or our
validation does; no traceback is printed for them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

CONFIG_EXIT_CODE = 2


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    cause = err.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        text += " (" + " ".join(str(cause).split("\n")[0].split()) + ")"
    return text


def config_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from cimssm.config.validate import ConfigError

    return (ConfigError, HydraException, MissingConfigException, OmegaConfBaseException)


def exit_on_config_error(err: BaseException) -> None:
    sys.stderr.write(f"config error: {_one_line(err)}\n")
    sys.exit(CONFIG_EXIT_CODE)


def _run_and_report(func: Callable[[], Any]) -> Any:
    """Replacement for Hydra's reporter: config errors become one line and exit 2."""
    try:
        return func()
    except config_errors() as err:
        exit_on_config_error(err)


def install_error_reporting() -> None:
    """Route Hydra's composition errors through :func:`_run_and_report`."""
    import hydra._internal.utils as hydra_utils

    hydra_utils.run_and_report = _run_and_report


def run_task(task: Callable[[], Any]) -> Any:
    """Run a task function inside a Hydra job: config errors exit 2; loggers always close."""
    from cimssm.pipeline import finish_loggers

    try:
        return task()
    except config_errors() as err:
        finish_loggers()
        exit_on_config_error(err)
    finally:
        finish_loggers()
