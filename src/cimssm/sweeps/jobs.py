"""What a running Hydra job knows about its sweep: its dir, its overrides, the swept keys.

Used for W&B run names (the values of the swept keys, not every fixed override) and by the
failure recording of :func:`cimssm.cli.run_task`.
"""

from __future__ import annotations

from pathlib import Path


def multirun_job() -> tuple[Path, list[str]] | None:
    """(output dir, task overrides) of the running Hydra job when it is part of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.runtime.output_dir), list(hc.overrides.task)


def swept_keys(sweep_dir: str | Path) -> list[str]:
    """Keys the sweep varies: sweep overrides of the command line (``seed=1,2``, ``range(...)``,
    ``choice(...)``, ``interval(...)``) and ``hydra.sweeper.params``, read from multirun.yaml.
    Empty when the file is missing or unreadable (e.g. a sweeper that does not write it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    try:
        cfg = OmegaConf.load(path)
        task = list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or [])
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception:  # no file, or overrides this Hydra cannot parse: fall back to all overrides
        return []
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    keys += [str(k) for k in params]
    return list(dict.fromkeys(keys))


def job_name(max_len: int = 128) -> str | None:
    """``<job num>:<key=value of the swept keys>`` in a multirun (all overrides when the swept keys
    are unknown); the job's overrides in a single run; None outside Hydra or without overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return hc.job.override_dirname[:max_len] or None
    params = hc.sweeper.get("params") or {}
    keys = set(swept_keys(hc.sweep.dir)) | {str(k) for k in params}
    parts = [o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in keys] if keys else []
    body = ",".join(parts) or hc.job.override_dirname
    return f"{hc.job.num}:{body}"[:max_len]
