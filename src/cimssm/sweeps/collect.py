"""Load a run or a multirun directory into one pandas DataFrame (one row per job x noise level).

A job directory is any folder below the sweep dir that holds ``.hydra/overrides.yaml``,
``metrics_final.json``, ``eval_metrics.json`` or ``FAILED.json``. For each job the loader reads

- ``.hydra/overrides.yaml``: the job's overrides, one column per key (``quant=w8a8`` gives a
  column ``quant``); values come from the resolved config when the key is there, so they keep
  their type;
- ``config_resolved.yaml`` (else ``.hydra/config.yaml``): the group choices (model, data, quant,
  noise, decomp, prune), seed and the precision keys, so every job is labelled even when a study
  config, not an override, chose them;
- ``metrics_final.json`` (train) or ``eval_metrics.json`` (eval): scalar metrics, columns as logged
  (``test/acc``, ``val/loss``, ...);
- ``cost.json``: ``cost/<key>`` from ``total`` and ``cost/<key>_ratio_vs_fp32`` from ``ratio_vs_fp32``;
- ``noise_eval.csv``: per-chip rows, reduced to ``<metric>_mean``, ``<metric>_std`` (ddof 1, over
  chips) and ``<metric>_n`` per (profile, level, t_inference); ``noise_eval_summary.csv`` when the
  per-chip file is missing;
- ``FAILED.json``: ``status="failed"`` and the one-line ``error``.

An eval job (``eval.py -m``) is also labelled with the training run of its checkpoint: the
training run's group choices and overrides fill the columns the eval job does not set itself.

Status: ``ok`` (DONE or eval_metrics.json present), ``failed`` (FAILED.json) or ``incomplete``
(still running, or killed), so a partial sweep can be summarised too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from cimssm.sweeps.failures import FAILED_FILE

GROUPS = ("model", "data", "quant", "noise", "decomp", "prune")
# Config keys that label every job, beside the group choices.
LABEL_KEYS = ("seed", "quant.mode", "quant.weight_bits", "quant.act_bits", "quant.ssm_bits", "noise.train")
ID_COLUMNS = ("job", "status", "error")
NOISE_COLUMNS = ("profile", "level", "t_inference", "chips")
STAT_SUFFIXES = ("_mean", "_std", "_n", "_ci95", "_nan")
# Per-chip columns of noise_eval.csv that are not metrics.
_CHIP_ID_COLUMNS = {"profile", "kind", "level", "t_inference", "chip", "seed", "status", "replicated"}
_JOB_MARKERS = (".hydra/overrides.yaml", "metrics_final.json", "eval_metrics.json", FAILED_FILE)
_SKIP_DIRS = {"checkpoints", "wandb", ".hydra", ".submitit", "csv", "tensorboard", "lightning_logs"}


# ------------------------------------------------------------------------------------ discovery
def is_job_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _JOB_MARKERS)


def find_job_dirs(sweep_dir: str | Path, max_depth: int = 4) -> list[Path]:
    """Job directories under ``sweep_dir`` (itself, if it is one), in job-number order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {root} does not exist")
    if is_job_dir(root):
        return [root]
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        for child in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS):
            if is_job_dir(child):
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    walk(root, 1)
    return sorted(found, key=lambda p: _natural_key(str(p.relative_to(root))))


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# -------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_config(job: Path) -> DictConfig | None:
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        path = job / name
        if path.is_file():
            try:
                cfg = OmegaConf.load(path)
            except Exception:  # a half-written file of a running job
                continue
            if isinstance(cfg, DictConfig):
                return cfg
    return None


def _select(cfg: DictConfig | None, key: str) -> Any:
    """``cfg[key]`` as a plain value; a group node gives its ``name``; missing/unresolvable: None."""
    if cfg is None:
        return None
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    except Exception:
        return None
    if isinstance(value, DictConfig):
        return value.get("name")
    if isinstance(value, ListConfig):
        return str(OmegaConf.to_container(value))
    return value


def read_overrides(job: Path) -> dict[str, str]:
    """``key: value`` of the job's task overrides (``+``/``~`` prefixes stripped)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        return {}
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _parse_scalar(text: str) -> Any:
    """An override's text as int/float/bool/None when it is one, else the text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def config_labels(job: Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    """Columns that say what the job is: group choices, label keys, then its overrides."""
    cfg = _read_config(job) if cfg is None else cfg
    labels: dict[str, Any] = {}
    if cfg is not None:
        if cfg.get("experiment_name") is not None:
            labels["experiment_name"] = cfg.get("experiment_name")
        for key in GROUPS:
            value = _select(cfg, key)
            if value is not None:
                labels[key] = value
        for key in LABEL_KEYS:  # kept when null (fp32 bits) so every job has the same columns
            if OmegaConf.select(cfg, key.rpartition(".")[0] or key, default=None) is not None:
                labels[key] = _select(cfg, key)
    for key, text in read_overrides(job).items():
        if key.startswith("hydra."):
            continue
        value = _select(cfg, key)
        labels[key] = value if value is not None else _parse_scalar(text)
    return labels


def read_cost(job: Path) -> dict[str, float]:
    report = _read_json(job / "cost.json") or {}
    out = {}
    for section, tag in (("total", ""), ("ratio_vs_fp32", "_ratio_vs_fp32")):
        for key, value in (report.get(section) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"cost/{key}{tag}"] = float(value)
    return out


def read_noise(job: Path) -> list[dict[str, Any]]:
    """One dict per (profile, level, t_inference): mean, std (ddof 1) and count over chips."""
    per_chip = job / "noise_eval.csv"
    summary = job / "noise_eval_summary.csv"
    if per_chip.is_file():
        try:
            rows = pd.read_csv(per_chip)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            rows = None
        if rows is not None and len(rows):
            return summarize_chips(rows)
    if summary.is_file():
        try:
            df = pd.read_csv(summary)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            return []
        keep = [c for c in df.columns if c in NOISE_COLUMNS or c.endswith(("_mean", "_std", "_n"))]
        return df[keep].to_dict("records")
    return []


def summarize_chips(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Mean, std (ddof 1; 0 for one chip) and finite count of every metric over chips.

    NaN chips (a diverged draw) are left out of mean and std, as
    :func:`cimssm.hardware.montecarlo.summarize_rows` does.
    """
    if "profile" not in rows:
        rows = rows.assign(profile="")
    metrics = [
        c for c in rows.columns if c not in _CHIP_ID_COLUMNS and pd.api.types.is_numeric_dtype(rows[c])
    ]
    out = []
    for (profile, level, t), group in rows.groupby(["profile", "level", "t_inference"], sort=False):
        rec: dict[str, Any] = {
            "profile": profile,
            "level": float(level),
            "t_inference": float(t),
            "chips": len(group),
        }
        for m in metrics:
            values = group[m].astype(float)
            n = int(values.notna().sum())
            rec[f"{m}_mean"] = float(values.mean()) if n else math.nan
            rec[f"{m}_std"] = float(values.std(ddof=1)) if n > 1 else (0.0 if n else math.nan)
            rec[f"{m}_n"] = n
        out.append(rec)
    return out


def _job_status(job: Path) -> tuple[str, str | None]:
    failed = _read_json(job / FAILED_FILE)
    if failed is not None or (job / FAILED_FILE).exists():
        return "failed", (failed or {}).get("error", "unknown error")
    if (job / "DONE").exists() or (job / "eval_metrics.json").is_file():
        return "ok", None
    return "incomplete", None


def _training_run_of(cfg: DictConfig | None) -> Path | None:
    """The training run dir of an eval job's checkpoint (``<run>/checkpoints/x.ckpt``)."""
    ckpt = _select(cfg, "ckpt_path") if cfg is not None and cfg.get("task_name") == "eval" else None
    if not ckpt:
        return None
    run = Path(str(ckpt)).parent.parent
    return run if run.is_dir() else None


# ---------------------------------------------------------------------------------------- public
def load_job(job_dir: str | Path, name: str | None = None) -> list[dict[str, Any]]:
    """The rows of one job: one per noise level (one row with no noise columns if none)."""
    job = Path(job_dir)
    cfg = _read_config(job)
    status, error = _job_status(job)
    base: dict[str, Any] = {"job": name if name is not None else job.name, "status": status, "error": error}
    train_run = _training_run_of(cfg)
    labels = config_labels(job, cfg)
    if train_run is not None:
        # Training axes (quant, seed, ...) label an eval job; its own noise choice wins.
        labels = {**config_labels(train_run), **{k: v for k, v in labels.items() if k != "ckpt_path"}}
        labels["train_run"] = str(train_run)
    base.update(labels)
    metrics = _read_json(job / "metrics_final.json") or _read_json(job / "eval_metrics.json") or {}
    base.update({k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    base.update(read_cost(job))
    noise = read_noise(job)
    return [{**base, **n} for n in noise] if noise else [base]


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One run (a job dir) as a DataFrame: one row per noise level."""
    return pd.DataFrame(load_job(run_dir))


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """Every job of a (possibly partial) multirun dir, or a single run dir, as one DataFrame.

    One row per job x noise level x inference time. Columns: ``job``, ``status``, ``error``, the
    config labels (group choices, seed, overrides), metrics (``test/acc``, ...), ``cost/*``,
    and, where a noise evaluation ran, ``profile, level, t_inference, chips`` and
    ``<metric>_mean/_std/_n`` over chips. Raises FileNotFoundError for a missing dir.
    """
    root = Path(sweep_dir)
    rows: list[dict[str, Any]] = []
    for job in find_job_dirs(root):
        name = "." if job == root else str(job.relative_to(root))
        rows.extend(load_job(job, name))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(ID_COLUMNS))
    return df


def config_columns(df: pd.DataFrame) -> list[str]:
    """Columns that label a job (group choices, seed, overrides), in the frame's order."""
    out = []
    for c in df.columns:
        if c in ID_COLUMNS or c in NOISE_COLUMNS or c == "train_run" or "/" in c or c.startswith("_"):
            continue
        if c.endswith(STAT_SUFFIXES) and pd.api.types.is_numeric_dtype(df[c]):
            continue
        out.append(c)
    return out


def sweep_axes(df: pd.DataFrame, exclude: Iterable[str] = ("seed",)) -> list[str]:
    """Config columns whose value differs between jobs (the sweep's axes), seeds excluded."""
    skip = set(exclude)
    present = [g for g in GROUPS if g in df]
    if present:  # a job whose config could not be read (all groups empty) defines no axis
        df = df[df[present].notna().any(axis=1)]
    axes = []
    for c in config_columns(df):
        if c in skip:
            continue
        if df[c].astype(str).nunique(dropna=False) > 1:
            axes.append(c)
    return axes


def independent_axes(df: pd.DataFrame, exclude: Iterable[str] = ("seed",)) -> list[str]:
    """The sweep axes minus those another axis determines (``quant.weight_bits`` given ``quant``)."""
    kept: list[str] = []
    labels = df.astype(object).where(df.notna(), "null").astype(str)
    for c in sweep_axes(df, exclude):
        if not any((labels.groupby(k)[c].nunique() <= 1).all() for k in kept):
            kept.append(c)
    return kept


def default_metric(df: pd.DataFrame) -> str:
    """``ppl`` for language models (as the noise evaluation reports), else ``acc``."""
    if "ppl_mean" in df and df["ppl_mean"].notna().any():
        return "ppl"
    return "acc"


def aggregate_seeds(df: pd.DataFrame, seed_column: str = "seed") -> pd.DataFrame:
    """Mean and std across seeds of every metric, per sweep point (axes x noise level).

    Only finished jobs count. For a noise metric the per-seed value is the chip mean
    (``acc_mean``); the result has ``acc_mean_seed_mean``, ``acc_mean_seed_std`` and ``n_seeds``;
    a clean metric ``test/acc`` gives ``test/acc_seed_mean`` and ``test/acc_seed_std``.
    """
    ok = df[df["status"] == "ok"] if "status" in df else df
    keys = [c for c in sweep_axes(ok, exclude=(seed_column,)) if c != "job"]
    keys += [c for c in ("profile", "level", "t_inference") if c in ok and ok[c].notna().any()]
    values = [
        c
        for c in ok.columns
        if pd.api.types.is_numeric_dtype(ok[c])
        and c not in keys
        and c not in (seed_column, "chips")
        and ("/" in c or c.endswith("_mean"))
    ]
    if ok.empty or not values:
        return pd.DataFrame()
    grouped = ok.groupby(keys, dropna=False, sort=False) if keys else ok.groupby(lambda _: 0)
    mean = grouped[values].mean().add_suffix("_seed_mean")
    std = grouped[values].std(ddof=1).fillna(0.0).add_suffix("_seed_std")
    n = (
        grouped[seed_column].nunique().rename("n_seeds")
        if seed_column in ok
        else grouped.size().rename("n_seeds")
    )
    out = pd.concat([n, mean, std], axis=1).reset_index()
    if not keys:
        out = out.drop(columns=["index"], errors="ignore")
    return out
