"""Record a failed multirun job in its own directory instead of stopping the sweep.

Hydra's launchers end a sweep when a job raises; the task wrapper (:func:`cimssm.cli.run_task`)
calls :func:`record_failure` instead and the job returns None, so the other jobs go on and the
sweep summary lists this one as failed with its one-line error.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

FAILED_FILE = "FAILED.json"
log = logging.getLogger("cimssm")


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line (config errors are already one line)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def record_failure(err: BaseException, job_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Write ``FAILED.json`` (error line, exception type, traceback, overrides, time) into ``job_dir``."""
    job = Path(job_dir)
    job.mkdir(parents=True, exist_ok=True)
    record = {
        "error": one_line(err),
        "type": type(err).__name__,
        "overrides": list(overrides or []),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }
    path = job / FAILED_FILE
    path.write_text(json.dumps(record, indent=2))
    log.error("job failed, recorded in %s: %s", path, record["error"])
    return path
