"""Train once, evaluate many: turn ``sweep_dir=<dir>`` into one eval job per trained checkpoint.

Hydra 1.3 can sweep a key only over values written in the override (its ``glob()`` selects
config-group options, not files), so eval.py expands the argument before Hydra parses the
command line:

    python eval.py -m sweep_dir=outputs/multirun/default/<date> noise=gauss_1pct,pcm
    # becomes: python eval.py -m ckpt_path='<dir>/0/checkpoints/best-40.ckpt','<dir>/1/...' noise=...

``sweep_ckpt=best`` (default: the monitored best, else last.ckpt) or ``sweep_ckpt=last`` picks the
file per job; failed and unfinished jobs are skipped. Each eval job records its ``ckpt_path``, and
the eval sweep's summary labels it with the training job's axes (quant, seed, ...).
"""

from __future__ import annotations

from pathlib import Path

from cimssm.config.validate import ConfigError

CHOICES = ("best", "last")


def job_checkpoint(job_dir: Path, which: str = "best") -> Path | None:
    """The job's ``best-*.ckpt`` (newest if several) or ``last.ckpt``; either falls back to the
    other, then to the newest ``*.ckpt`` (Lightning's default ``epoch=..-step=..`` name)."""
    folder = job_dir / "checkpoints"
    if not folder.is_dir():
        return None
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = folder / "last.ckpt"
    order = [best[-1] if best else None, last] if which == "best" else [last, best[-1] if best else None]
    for path in order:
        if path is not None and path.is_file():
            return path
    rest = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return rest[-1] if rest else None


def sweep_checkpoints(sweep_dir: str | Path, which: str = "best") -> list[Path]:
    """One checkpoint per finished job of ``sweep_dir`` (job order); raises ConfigError if none."""
    from cimssm.sweeps.collect import find_job_dirs
    from cimssm.sweeps.failures import FAILED_FILE

    root = Path(sweep_dir)
    if which not in CHOICES:
        raise ConfigError(f"sweep_ckpt={which!r} is not allowed: choose one of {', '.join(CHOICES)}")
    if not root.is_dir():
        raise ConfigError(f"sweep_dir={sweep_dir}: no such directory; give a multirun dir of train.py")
    ckpts = []
    for job in find_job_dirs(root):
        if (job / FAILED_FILE).exists():
            continue
        ckpt = job_checkpoint(job, which)
        if ckpt is not None:
            ckpts.append(ckpt)
    if not ckpts:
        raise ConfigError(
            f"sweep_dir={sweep_dir} holds no checkpoints (<job>/checkpoints/*.ckpt of finished jobs)"
        )
    return ckpts


def _quote(path: Path) -> str:
    # Hydra override grammar: single-quoted strings may hold '=', ',' and spaces; escape quotes.
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_sweep_dir(argv: list[str]) -> list[str]:
    """``argv`` with ``sweep_dir=D`` (and ``sweep_ckpt=best|last``) replaced by a ``ckpt_path``
    sweep over D's checkpoints. Without ``-m``/``--multirun`` the sweep dir must hold exactly one.
    Raises ConfigError (one line) for a missing dir, no checkpoints, or a clash with ckpt_path."""
    sweep_dir = next((a.partition("=")[2] for a in argv if a.startswith("sweep_dir=")), None)
    which = next((a.partition("=")[2] for a in argv if a.startswith("sweep_ckpt=")), "best")
    if sweep_dir is None:
        if any(a.startswith("sweep_ckpt=") for a in argv):
            raise ConfigError("sweep_ckpt is only used with sweep_dir=<multirun dir>")
        return list(argv)
    if any(a.startswith(("ckpt_path=", "+ckpt_path=")) for a in argv):
        raise ConfigError("give either sweep_dir or ckpt_path, not both")
    ckpts = sweep_checkpoints(sweep_dir.strip("'\""), which)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun and len(ckpts) > 1:
        raise ConfigError(f"sweep_dir={sweep_dir} holds {len(ckpts)} checkpoints: add -m to evaluate each")
    rest = [a for a in argv if not a.startswith(("sweep_dir=", "sweep_ckpt="))]
    return [*rest, "ckpt_path=" + ",".join(_quote(c) for c in ckpts)]


def expand_sweep_dir_or_exit(argv: list[str]) -> list[str]:
    """:func:`expand_sweep_dir` for an entry point: a ConfigError prints one line and exits 2."""
    try:
        return expand_sweep_dir(argv)
    except ConfigError as err:
        from cimssm.cli import exit_on_config_error

        exit_on_config_error(err)
        raise  # unreachable: exit_on_config_error exits
