"""Hydra callback: write the sweep summary when a multirun ends.

Registered in conf/train.yaml and conf/eval.yaml under ``hydra.callbacks.sweep_summary``.
``on_multirun_end`` runs in the launching process after every job returned (also with the
joblib and submitit launchers), so it sees the whole sweep dir. A summary that fails is logged,
never raised: the jobs' own results are already on disk and
``python scripts/summarize_sweep.py <sweep dir>`` can redo it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cimssm.sweeps.failures import FAILED_FILE

log = logging.getLogger("cimssm")


def check_optuna_storage(storage: str) -> None:
    """Optuna 2.x (what hydra-optuna-sweeper 1.x allows) cannot use SQLAlchemy 2 for its RDB
    storage; say so in one line (a ConfigError: exit 2) instead of an AssertionError mid-sweep."""
    from importlib import metadata

    from cimssm.config.validate import ConfigError

    try:
        optuna_major = int(metadata.version("optuna").split(".")[0])
        sqlalchemy_major = int(metadata.version("sqlalchemy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if optuna_major < 3 and sqlalchemy_major >= 2:
        raise ConfigError(
            f"hydra.sweeper.storage={storage} needs SQLAlchemy<2 with optuna {metadata.version('optuna')} "
            f"(installed: SQLAlchemy {metadata.version('sqlalchemy')}): pip install -e '.[optuna]', "
            "or hydra.sweeper.storage=null for an in-memory study that cannot be resumed"
        )


class SweepSummaryCallback(Callback):
    """After a multirun: sweep_summary.csv, sweep_summary.md and plots in ``hydra.sweep.dir``.

    ``metric``: the noise metric to tabulate and plot (null: ppl for language models, else acc);
    ``hue``: column(s) that split the plot lines (null: the sweep's axes); ``enabled``: off switch.
    """

    def __init__(self, metric: str | None = None, hue: Any = None, enabled: bool = True):
        self.metric = metric
        self.hue = list(hue) if hue is not None and not isinstance(hue, str) else hue
        self.enabled = enabled

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The Optuna sweeper opens its SQLite storage in the sweep dir before any job made it.
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage.startswith("sqlite:"):
            from cimssm.cli import exit_on_config_error
            from cimssm.config.validate import ConfigError

            try:
                check_optuna_storage(storage)
            except ConfigError as err:  # Hydra only warns about a callback's exceptions: exit here
                exit_on_config_error(err)
            Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():  # every job failed before Hydra made a dir, or no job ran
            return
        try:
            from cimssm.sweeps.summary import write_sweep_summary

            paths = write_sweep_summary(sweep_dir, metric=self.metric, hue=self.hue)
        except Exception as err:  # the sweep's results stay usable; say how to redo the summary
            log.error(
                "sweep summary failed (%s: %s); rerun: python scripts/summarize_sweep.py %s",
                type(err).__name__,
                err,
                sweep_dir,
            )
            return
        log.info("sweep summary: %s", paths["markdown"])
        failed = sorted(p.parent.name for p in sweep_dir.rglob(FAILED_FILE))
        if failed:
            log.warning(
                "%d job(s) failed (%s): errors in their FAILED.json and in %s",
                len(failed),
                ", ".join(failed),
                paths["markdown"].name,
            )
