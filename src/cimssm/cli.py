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
# Training stopped by a guard (NaN/Inf loss or gradient): one line naming the step and the last
# good checkpoint, no traceback.
STOPPED_EXIT_CODE = 3


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if type(err).__name__ == "OverrideParseException" and getattr(err, "override", None):
        text = f"cannot parse the override {err.override!r}: {text}"  # Hydra's text omits which one
    cause = err.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        text += " (" + " ".join(str(cause).split("\n")[0].split()) + ")"
    return text


def config_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from cimssm.config.validate import ConfigError

    return (ConfigError, HydraException, MissingConfigException, OmegaConfBaseException)


def stopped_message(err: BaseException) -> str | None:
    """The one-line message of a training stop (also when it comes from a ddp_spawn worker), else None."""
    from cimssm.callbacks.numerics import TrainingStopped

    if isinstance(err, TrainingStopped):
        return _one_line(err)
    text = str(err)
    if type(err).__name__ == "ProcessRaisedException" and "TrainingStopped: " in text:
        return text.split("TrainingStopped: ", 1)[1].splitlines()[0].strip()
    return None


def discard_job_record(err: BaseException) -> None:
    """After a config error nothing ran: drop the ``.hydra/`` record Hydra wrote for this job
    moments ago (only when the run dir holds nothing else but logs) and put the error line in
    the job's log file, so the run dir keeps only its own log."""
    import logging
    import shutil
    from pathlib import Path

    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        record = run_dir / hc.output_subdir if hc.output_subdir else None
    except Exception:  # no Hydra job around us: nothing to tidy
        return
    others = [p for p in run_dir.iterdir() if p != record and p.suffix != ".log"] if run_dir.is_dir() else []
    if record is not None and record.is_dir() and not others:
        shutil.rmtree(record, ignore_errors=True)
    entry = logging.getLogger("cimssm").makeRecord(
        "cimssm", logging.ERROR, __file__, 0, "config error: %s", (_one_line(err),), None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(entry)


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
    """Run a task function inside a Hydra job: config errors exit 2; loggers always close.

    In a multirun a failing job (a config error found inside the job included) is recorded in
    its job dir as FAILED.json and returns None, so the launcher goes on with the other jobs.
    """
    from cimssm.pipeline import finish_loggers
    from cimssm.sweeps.failures import record_failure
    from cimssm.sweeps.jobs import multirun_job

    try:
        return task()
    except Exception as err:
        job = multirun_job()
        if job is not None:
            finish_loggers(exit_code=1)
            record_failure(err, *job)
            return None
        if isinstance(err, config_errors()):
            finish_loggers(exit_code=1)
            discard_job_record(err)
            exit_on_config_error(err)
        stopped = stopped_message(err)
        if stopped is not None:
            finish_loggers(exit_code=1)
            sys.stderr.write(f"{stopped}\n")
            sys.exit(STOPPED_EXIT_CODE)
        raise
    finally:
        finish_loggers()


def objective_value(metrics: dict[str, float] | None, key: str | None) -> float | None:
    """The value a sweeper optimizes: ``metrics[optimized_metric]``; None (a failed trial for
    Optuna) when the job failed or the key is not among its metrics, which is logged."""
    if not key or not metrics:
        return None
    if key not in metrics:
        import logging

        logging.getLogger("cimssm").error(
            "optimized_metric=%s is not among the job's metrics: %s", key, ", ".join(sorted(metrics))
        )
        return None
    return float(metrics[key])
