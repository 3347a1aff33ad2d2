"""Build a run from a validated config and train it: the body of train.py.

Everything is created with ``hydra.utils.instantiate`` from the config's ``_target_`` entries, so
a new model or data set is a new file in conf/ and src/, never an ``if`` chain here.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from cimssm.config.validate import ConfigError, validate_config
from cimssm.lit_module import LitSequenceModel

log = logging.getLogger("cimssm")
# The run directory already holds the resolved config when the CSV logger starts; it only ever
# removes its own metrics.csv, which build_loggers never lets it find.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


# ------------------------------------------------------------------------------ places and seeds
def run_dir_of(cfg: DictConfig) -> Path:
    """The run's output directory: ``output_dir`` if set, else Hydra's runtime output dir."""
    if cfg.get("output_dir"):
        out = Path(cfg.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir={cfg.output_dir} is not a directory; expected a directory for the run's files")
        return out
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("output_dir is not set and no Hydra run is active: set output_dir=<dir>")


def set_threads(cfg: DictConfig) -> None:
    """torch intra-op threads: ``threads``, else CIMSSM_THREADS, which the launcher configs set
    (hydra.job.env_set) to give each parallel job its share of the cores; else torch's default."""
    threads = cfg.get("threads") or os.environ.get("CIMSSM_THREADS", "").strip()
    if threads and str(threads).isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def configure_torch(cfg: DictConfig) -> None:
    set_threads(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)


# ------------------------------------------------------------------------------------- builders
def _without_name(node: DictConfig) -> DictConfig:
    """A group node minus its ``name`` key (a label for humans and sweeps, not an argument)."""
    return OmegaConf.create({k: node[k] for k in node if k != "name"})


def _instantiate(node: DictConfig, trusted: bool, **kwargs: Any) -> Any:
    """hydra.utils.instantiate; a config read back from a checkpoint (``trusted=False``) only
    through the ``_target_`` allow-list of :mod:`cimssm.config.safe_instantiate`."""
    if trusted:
        return hydra.utils.instantiate(node, **kwargs)
    from cimssm.config.safe_instantiate import safe_instantiate

    return safe_instantiate(node, source="stored config", **kwargs)


def build_datamodule(cfg: DictConfig, trusted: bool = True) -> pl.LightningDataModule:
    try:
        return _instantiate(_without_name(cfg.data), trusted)
    except ConfigError:
        raise
    except Exception as err:  # DataModules raise one-line errors naming the argument
        raise ConfigError(f"data ({cfg.data.name}): {_root_message(err)}") from err


def build_net(cfg: DictConfig, datamodule: pl.LightningDataModule, trusted: bool = True) -> torch.nn.Module:
    kwargs = datamodule.model_kwargs() if cfg.model.name != "mamba_hf" else {}
    try:
        return _instantiate(_without_name(cfg.model), trusted, **kwargs)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"model ({cfg.model.name}): {_root_message(err)}") from err


def _root_message(err: BaseException) -> str:
    # Hydra wraps constructor errors in InstantiationException; report the original one-liner.
    while err.__cause__ is not None and type(err).__name__ == "InstantiationException":
        err = err.__cause__
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def build_lit_module(cfg: DictConfig, datamodule: pl.LightningDataModule, trusted: bool = True) -> LitSequenceModel:
    """The backbone with its training-time hardware attached, wrapped for Lightning."""
    from cimssm.hardware.setup import attach_training_hardware

    net = build_net(cfg, datamodule, trusted)
    attach_training_hardware(net, cfg)
    kwargs = datamodule.model_kwargs()
    n_classes = kwargs.get("n_classes") or kwargs.get("vocab_size")
    if cfg.model.name == "mamba_hf":
        n_classes = _hf_classes(cfg, net, kwargs, n_classes)
    return LitSequenceModel(
        net=net,
        task=kwargs["task"],
        n_classes=int(n_classes),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        cfg=OmegaConf.to_container(cfg, resolve=True),
    )


def _hf_classes(cfg: DictConfig, net: torch.nn.Module, kwargs: dict, n_data: int) -> int:
    """An imported HF LM keeps its own vocabulary (logits over ``net.n_out`` tokens): the data's
    token ids must fit in it, and the task must be language modelling."""
    if kwargs.get("task") != "lm" or kwargs.get("vocab_size") is None:
        raise ConfigError(
            f"model=mamba_hf is a causal LM: data={cfg.data.name} is a {kwargs.get('task')} task; "
            "use a language-modelling data set (e.g. data=shakespeare_char)"
        )
    if n_data > net.n_out:
        raise ConfigError(
            f"model.path={cfg.model.path}: the checkpoint's vocabulary ({net.n_out} tokens) is smaller "
            f"than data={cfg.data.name}'s ({n_data}); the data's token ids must fit in it"
        )
    return int(net.n_out)


def wandb_offline() -> bool:
    """WANDB_MODE decides when set; else online with credentials (API key or netrc), offline without."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" not in netrc.read_text()
    except OSError:
        return True


def run_name(cfg: DictConfig) -> str:
    """W&B run name: in a multirun ``<job num>:<swept key=value,...>``, else the job's overrides;
    without overrides, the group choices and seed (at most 128 characters)."""
    from cimssm.sweeps.jobs import job_name

    default = f"{cfg.model.name}-{cfg.data.name}-{cfg.quant.name}-{cfg.noise.name}-seed{cfg.seed}"
    return job_name() or default[:128]


def wandb_group(cfg: DictConfig) -> str:
    """The sweep in a multirun (``<experiment_name>-<sweep dir name>``), else ``experiment_name``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{cfg.experiment_name}-{Path(HydraConfig.get().sweep.dir).name}"[:128]
    return str(cfg.experiment_name)


def wandb_tags(cfg: DictConfig) -> list[str]:
    """The user's ``tags`` plus the group choices (model, data, quant, noise, decomp, prune)."""
    tags = [str(t) for t in cfg.get("tags") or []]
    for group in ("model", "data", "quant", "noise", "decomp", "prune"):
        node = cfg.get(group)
        name = node.get("name") if node is not None else None
        if name and name != "none":
            tags.append(f"{group}={name}")
    return list(dict.fromkeys(t[:64] for t in tags))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        kwargs: dict[str, Any] = {"save_dir": str(run_dir)}
        if node._target_.endswith("CSVLogger") and (run_dir / "metrics.csv").exists():
            # A resumed run appends: its metrics go to resume<N>/metrics.csv, never over the first.
            n = 1
            while (run_dir / f"resume{n}").exists():
                n += 1
            kwargs["version"] = f"resume{n}"
        if node._target_.endswith("WandbLogger"):
            os.environ.setdefault("WANDB_SILENT", "true")
            kwargs["offline"] = wandb_offline() if node.get("offline") is None else node.offline
            kwargs["name"] = node.get("name") or run_name(cfg)
            kwargs["group"] = node.get("group") or wandb_group(cfg)
            kwargs["tags"] = wandb_tags(cfg) if node.get("tags") is None else list(node.tags)
            # `config` is also instantiate()'s own first parameter: pass it after building a partial.
            kwargs["_partial_"] = True
        try:
            built = hydra.utils.instantiate(node, **kwargs)
            if kwargs.get("_partial_"):
                built = built(config=OmegaConf.to_container(cfg, resolve=True))
            loggers.append(built)
        except Exception as err:
            raise ConfigError(f"logger.{name}: {_root_message(err)}") from err
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        kwargs = {}
        if node._target_.endswith("ModelCheckpoint") and not node.get("dirpath"):
            kwargs["dirpath"] = str(run_dir / "checkpoints")
        try:
            callbacks.append(hydra.utils.instantiate(node, **kwargs))
        except Exception as err:
            raise ConfigError(f"callbacks.{name}: {_root_message(err)}") from err
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger], run_dir: Path) -> pl.Trainer:
    from cimssm.callbacks.checkpointing import AtomicCheckpointIO

    opt = cfg.optimizer
    # Every checkpoint is written tmp + fsync + rename, so a kill never leaves a truncated file.
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    try:
        return hydra.utils.instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=str(run_dir),
            gradient_clip_val=opt.gradient_clip_val,
            **plugins,
        )
    except Exception as err:
        raise ConfigError(f"trainer: {_root_message(err)}") from err


# --------------------------------------------------------------------------------------- resume
def find_resumable_run(cfg: DictConfig, runs_root: Path = Path("outputs/runs")) -> Path:
    """The newest run of ``experiment_name`` that has a last.ckpt and did not finish."""
    base = runs_root / cfg.experiment_name
    candidates = [
        d
        for d in base.glob("*")
        if (d / "checkpoints" / "last.ckpt").is_file() and not (d / "DONE").exists()
    ]
    if not candidates:
        raise ConfigError(
            f"ckpt_path=last: no interrupted run of experiment_name={cfg.experiment_name!r} under {base}"
        )
    return max(candidates, key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime)


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, Path | None]:
    """(checkpoint path, run dir to continue in) for ``cfg.ckpt_path``."""
    if not cfg.ckpt_path:
        return None, None
    if cfg.ckpt_path == "last":
        run = find_resumable_run(cfg)
        return str(run / "checkpoints" / "last.ckpt"), run
    from cimssm.config.safe_instantiate import resolve_path

    path = resolve_path("ckpt_path", cfg.ckpt_path, "file", expected="a .ckpt file or `last`")
    return str(path), None


# ---------------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, build, fit, test and evaluate one run; returns its final metrics.

    Loggers are always closed at the end (a W&B run is finished, also after a failure).
    """
    try:
        return _train(cfg)
    finally:
        finish_loggers()


def _train(cfg: DictConfig) -> dict[str, float]:
    from cimssm.utils.run_files import print_config_tree, write_run_files

    validate_config(cfg)
    ckpt_path, resume_dir = resolve_checkpoint(cfg)
    run_dir = resume_dir or run_dir_of(cfg)
    if resume_dir is not None:
        log.info("resuming %s in its own run directory %s", ckpt_path, resume_dir)
        with open_dict(cfg):
            cfg.output_dir = str(resume_dir)
    configure_torch(cfg)
    datamodule = build_datamodule(cfg)
    lit = build_lit_module(cfg, datamodule)
    if ckpt_path is not None:
        check_resume(ckpt_path, lit, cfg)
    if cfg.get("compile"):
        lit.net = torch.compile(lit.net)
    callbacks = build_callbacks(cfg, run_dir) + training_callbacks(cfg) + hardware_callbacks(cfg, run_dir)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, callbacks, loggers, run_dir)
    spawned = spawns_processes(trainer)
    if spawned and cfg.get("test_after_fit", True):
        from cimssm.callbacks.worker_test import TestInWorkerCallback

        # Last, after every after-fit callback: the worker tests the model as it is deployed.
        limit = cfg.trainer.get("limit_test_batches")
        trainer.callbacks.append(TestInWorkerCallback(limit if isinstance(limit, int) else None))
    if trainer.is_global_zero:
        print_config_tree(cfg)
        write_run_files(cfg, run_dir)
    # Optimizer, scheduler, loop counters, data position (the DataModule's state) and RNG
    # (StepSeededRNG's state) come back from the checkpoint, read as untrusted input.
    trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test_after_fit", True):
        # The after-fit callbacks already loaded the best weights (and applied PTQ): test those.
        # Under ddp_spawn the rank-0 worker has tested that model already (TestInWorkerCallback).
        results = [] if spawned else trainer.test(lit, datamodule=datamodule, verbose=False)
        if results:
            metrics.update({k: float(v) for k, v in results[0].items()})
    metrics.update(noise_metrics(callbacks))
    if trainer.is_global_zero:
        (run_dir / "metrics_final.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (run_dir / "DONE").write_text("finished\n")
    return metrics


def noise_metrics(callbacks: list[Callback]) -> dict[str, float]:
    """The noise evaluation's mean/std per level (``noise/acc@0.01_mean``), for metrics_final.json
    and for a sweeper's ``optimized_metric``."""
    from cimssm.callbacks.noise_eval import NoiseEvalCallback, summary_metrics

    out: dict[str, float] = {}
    for cb in callbacks:
        if isinstance(cb, NoiseEvalCallback) and cb.summary:
            out.update(summary_metrics(cb.summary, cb.metric))
    return out


def spawns_processes(trainer: pl.Trainer) -> bool:
    """Does ``trainer.fit`` run in spawned worker processes (ddp_spawn)?"""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def check_resume(ckpt_path: str, lit: LitSequenceModel, cfg: DictConfig) -> None:
    """Read the checkpoint to resume (weights_only, stored targets checked) and refuse one of
    another model or data set now, with one line, instead of a traceback from inside fit."""
    from cimssm.checkpoints import check_resumable, load_checkpoint

    check_resumable(load_checkpoint(ckpt_path), ckpt_path, lit, cfg)


def training_callbacks(cfg: DictConfig) -> list[Callback]:
    """Step-keyed RNG and the NaN/Inf guard: every run has them, whatever `callbacks` holds."""
    from cimssm.callbacks import training_callbacks as make

    return make(cfg)


def hardware_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """Callbacks that the quant/noise/decomp/prune groups switch on (after-fit evaluations)."""
    from cimssm.callbacks import after_fit_callbacks

    return after_fit_callbacks(cfg, run_dir)


def finish_loggers(exit_code: int | None = None) -> None:
    """Close a W&B run if one is open (also after a failure: ``exit_code=1`` marks it failed)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


__all__ = ["train", "build_lit_module", "build_datamodule", "build_net", "WandbLogger", "finish_loggers"]


# ----------------------------------------------------------------------------------------- eval
def rebuild_from_checkpoint(ckpt_path: str, data_overrides: dict | None = None):
    """(stored cfg, datamodule, lit module with the checkpoint's weights) for a checkpoint."""
    from cimssm.checkpoints import load_checkpoint, load_weights, stored_config

    ckpt = load_checkpoint(ckpt_path)
    cfg = stored_config(ckpt, source=f"ckpt_path={ckpt_path}")
    if data_overrides:
        with open_dict(cfg):
            cfg.data = OmegaConf.merge(cfg.data, data_overrides)
        validate_config(cfg)
    # The stored config is untrusted: its targets are instantiated through the allow-list only.
    datamodule = build_datamodule(cfg, trusted=False)
    dm_state = ckpt.get(type(datamodule).__qualname__)
    if dm_state:
        datamodule.load_state_dict(dm_state)
    lit = build_lit_module(cfg, datamodule, trusted=False)
    if ckpt.get("prune_record") is not None:  # a pruned model (PruneCallback): shrink to its shapes
        from cimssm.prune import PruneError, apply_prune_record

        try:
            apply_prune_record(lit.net, ckpt["prune_record"])
        except PruneError as err:
            raise ConfigError(f"ckpt_path={ckpt_path}: {err}") from err
    load_weights(lit, ckpt["state_dict"], ckpt_path)
    return cfg, datamodule, lit


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """eval.py: rebuild a run from its checkpoint, evaluate it clean and under noise."""
    from cimssm.evaluation import evaluate_model, noise_evaluation
    from cimssm.hardware.setup import analog_config, calibrate_ptq, check_noise, noise_profile

    if cfg.get("ckpt_path") in (None, "", "???"):
        raise ConfigError("ckpt_path is required: python eval.py ckpt_path=path/to/last.ckpt")
    data_over = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None
    train_cfg, datamodule, lit = rebuild_from_checkpoint(str(cfg.ckpt_path), data_over)
    seed = int(cfg.seed if cfg.get("seed") is not None else train_cfg.seed)
    set_threads(cfg)
    pl.seed_everything(seed, verbose=False)
    out_dir = run_dir_of(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    net, task = lit.net, lit.task
    with open_dict(train_cfg):
        train_cfg.noise = cfg.noise
        if cfg.get("analog") is not None:
            train_cfg.analog = cfg.analog
        if cfg.get("decomp") is not None:  # the evaluation's choice, not the stored one
            train_cfg.decomp = cfg.decomp
        if cfg.get("analysis") is not None:  # validated with the rest
            train_cfg.analysis = cfg.analysis
    validate_config(train_cfg)
    if train_cfg.noise.kind != "none":
        check_noise(net, train_cfg)
    split = cfg.get("split", "test")
    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r} is not allowed: choose test or val")
    datamodule.setup("test" if split == "test" else "validate")
    loader_fn = datamodule.test_dataloader if split == "test" else datamodule.val_dataloader
    if train_cfg.quant.mode == "ptq":
        datamodule.setup("validate")
        calibrate_ptq(net, train_cfg.quant, datamodule.val_dataloader())
    # HPD after the checkpoint's weights (and PTQ), as after training; digital factors not analog.
    from cimssm.hardware.hpd import analog_with_decomposition
    from cimssm.hardware.setup import apply_decomp

    apply_decomp(net, train_cfg.get("decomp"))
    analog = analog_with_decomposition(analog_config(train_cfg.analog), train_cfg.get("decomp"))
    limit = cfg.get("limit_batches")
    clean = evaluate_model(net, loader_fn(), task, limit)
    metrics = {f"{split}/{k}": v for k, v in clean.items()}
    log.info("clean %s metrics: %s", split, metrics)
    if train_cfg.noise.kind != "none":
        _, summary = noise_evaluation(
            net, loader_fn, task, noise_profile(train_cfg.noise), analog, seed, out_dir,
            max_batches=limit,
        )
        metric = "ppl" if task == "lm" else "acc"
        for r in summary:
            metrics[f"noise/{metric}@{r['level']:g}_t{r['t_inference']:g}"] = r[f"{metric}_mean"]
    if cfg.get("analysis") is not None and cfg.analysis.get("name") == "sensitivity":
        from cimssm.analysis.sensitivity import run_sensitivity
        from cimssm.callbacks.sensitivity import sensitivity_settings

        s = sensitivity_settings(cfg)  # `+analysis=sensitivity`: sensitivity.csv / .png in out_dir
        datamodule.setup("test" if s["split"] == "test" else "validate")
        run_sensitivity(
            net, datamodule.test_dataloader if s["split"] == "test" else datamodule.val_dataloader, task,
            s["profile"], analog, seed, out_dir, max_batches=s["max_batches"], blocks=s["blocks"],
            components=s["components"], outside=s["outside"], plot=s["plot"],
        )  # fmt: skip
    if cfg.get("cost", True):
        from cimssm.callbacks.cost_report import flat_totals, write_cost_report

        metrics.update(flat_totals(write_cost_report(net, analog, out_dir)))
    from cimssm.utils.run_files import write_run_files

    write_run_files(cfg, out_dir)
    (out_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
