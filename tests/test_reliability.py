"""Crash safety, untrusted checkpoints, numerical guards, determinism and multi-process training."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA_TINY, ROOT, TINY, compose_cfg, run_cli
from test_bad_inputs import run_entry, start_entry

from cimssm.callbacks.checkpointing import (
    AtomicCheckpointIO,
    StepSeededRNG,
    atomic_torch_save,
    capture_rng_states,
    remove_stale_temporaries,
    restore_rng_states,
)
from cimssm.callbacks.numerics import NonFiniteGuard, TrainingStopped
from cimssm.config.safe_instantiate import check_targets, resolve_target, safe_instantiate
from cimssm.config.validate import ConfigError

TINY_TRAIN = ["model=s4d_tiny", "data=selective_copy", *TINY, *DATA_TINY["selective_copy"], "threads=1"]
CHECKPOINTS = ["callbacks=default", "callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false"]


def metrics_of(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics_final.json").read_text())


def assert_same_metrics(a: dict[str, float], b: dict[str, float], rel: float = 1e-6) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-9, nan_ok=True), k


# ------------------------------------------------------------------------------- atomic writes
def _rewrite_forever(path: str) -> None:
    """Child of the kill test: rewrite a ~16 MB checkpoint as fast as possible until killed."""
    torch.set_num_threads(1)
    weights = torch.zeros(4_000_000)
    i = 0
    while True:
        i += 1
        weights[0] = i  # the file's "i" and first weight must always agree
        atomic_torch_save({"i": i, "w": weights}, path)


def test_kill_during_a_write_never_leaves_a_corrupt_file(tmp_path):
    import multiprocessing

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"i": 0, "w": torch.zeros(4_000_000)}, target)
    for delay in (0.05, 0.13, 0.31):
        # fork: the child only serializes and writes (no parallel kernels), and starts at once
        proc = multiprocessing.get_context("fork").Process(target=_rewrite_forever, args=(str(target),))
        proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)  # at a random point of a write, most likely
        proc.join()
        state = torch.load(target, weights_only=True)  # always a complete file
        assert state["w"].numel() == 4_000_000 and float(state["w"][0]) == state["i"]
        remove_stale_temporaries(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # fails in the middle of torch.save


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.ones(3), "x": _Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    os.symlink(target, tmp_path / "link.ckpt")  # a symlink is replaced by a real file
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "link.ckpt")
    assert not (tmp_path / "link.ckpt").is_symlink()
    assert torch.load(target, weights_only=True)["step"] == 1


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save({"rng": capture_rng_states()}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_states(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    assert StepSeededRNG(1).state_dict()["seed"] == 1


# ------------------------------------------------------------------------------ kill -9 resume
KILL_RUN = [*TINY_TRAIN, *CHECKPOINTS, "trainer.max_steps=60", "trainer.val_check_interval=10",
            "callbacks.model_checkpoint.every_n_train_steps=4", "model.dropout=0.1",
            "+logger.csv.flush_logs_every_n_steps=1"]  # fmt: skip


def _logged_steps(run: Path) -> int:
    with open(run / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return max(steps) + 1 if steps else 0


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = start_entry(
        "train.py", [*KILL_RUN, "experiment_name=ref", "hydra.run.dir=outputs/runs/ref/a"], tmp_path
    )
    run = tmp_path / "outputs" / "runs" / "killed" / "a"
    killed = start_entry(
        "train.py", [*KILL_RUN, "experiment_name=killed", "hydra.run.dir=outputs/runs/killed/a"], tmp_path
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and killed.process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.kill()  # right after the first checkpoint, most likely while training on
    assert killed.wait().returncode == -signal.SIGKILL
    assert not (run / "DONE").exists(), "the run finished before the kill; make it longer"
    saved = torch.load(last, weights_only=True)["global_step"]
    lost = _logged_steps(run) - saved
    print(f"killed after {_logged_steps(run)} logged steps; last.ckpt at step {saved}; {lost} steps to redo")
    assert 0 < saved < 60 and lost < 4 + 2  # every_n_train_steps=4, plus steps not yet flushed

    resume = run_entry(
        "train.py",
        [*KILL_RUN, "experiment_name=killed", "ckpt_path=last", "hydra.run.dir=outputs/runs/resume_cmd/a"],
        tmp_path,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert ref.wait().returncode == 0
    assert (run / "DONE").exists() and (run / "resume1" / "metrics.csv").is_file()
    assert_same_metrics(metrics_of(tmp_path / "outputs" / "runs" / "ref" / "a"), metrics_of(run))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and not last.is_symlink() and not any(n.startswith(".") for n in names), names
    assert not any(n.startswith("last-v") for n in names)


def test_resume_in_process_restores_optimizer_scheduler_rng_and_data_position(tmp_path):
    """An interrupted run (stopped by an exception after step 7) resumed from last.ckpt ends
    bit-identical to an uninterrupted one: dropout on, mid-epoch stop, epoch boundary crossed."""
    from lightning.pytorch.callbacks import Callback

    import cimssm.pipeline as pipeline

    class Interrupt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("interrupted")

    extra = [*CHECKPOINTS, "callbacks.model_checkpoint.every_n_train_steps=3", "trainer.max_steps=12",
             "trainer.val_check_interval=4", "model.dropout=0.2"]  # fmt: skip
    ref = pipeline.train(compose_cfg([*TINY_TRAIN, *extra], output_dir=tmp_path / "ref"))
    make = pipeline.training_callbacks
    pipeline.training_callbacks = lambda cfg: make(cfg) + [Interrupt()]
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            pipeline.train(compose_cfg([*TINY_TRAIN, *extra], output_dir=tmp_path / "run"))
    finally:
        pipeline.training_callbacks = make
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # every 3 steps; epoch = 8 steps
    resumed = pipeline.train(
        compose_cfg([*TINY_TRAIN, *extra, f"ckpt_path={last}"], output_dir=tmp_path / "run")
    )
    assert_same_metrics(ref, resumed, rel=0)
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["optimizer_states"][0]["state"][0]["step"] == b["optimizer_states"][0]["state"][0]["step"]


# --------------------------------------------------------------------------- untrusted configs
def _checkpoint(tmp_path: Path) -> Path:
    from cimssm.pipeline import train

    cfg = compose_cfg(
        [*TINY_TRAIN, *CHECKPOINTS, "trainer.max_steps=2", "test_after_fit=false"], tmp_path / "run"
    )
    train(cfg)
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_stored_os_system_target_is_refused_without_running(tmp_path, monkeypatch):
    from cimssm.pipeline import rebuild_from_checkpoint

    ckpt = torch.load(_checkpoint(tmp_path), weights_only=True)
    marker = tmp_path / "PWNED"
    ckpt["hyper_parameters"]["cfg"]["data"] = {
        "_target_": "os.system",
        "_args_": [f"touch {marker}"],
        "name": "x",
    }
    torch.save(ckpt, tmp_path / "evil.ckpt")
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(ConfigError, match=r"data\._target_='os\.system' is not allowed"):
        rebuild_from_checkpoint(str(tmp_path / "evil.ckpt"))
    assert not calls and not marker.exists()


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "subprocess.Popen",
        "builtins.eval",
        "torch.load",
        "torch.hub.load",
        "torch.nn.modules.module.torch.load",  # spelled like torch.nn., is torch.load
        "torch.nn.modules.module.torch.from_file",  # reads files; defined in `torch`
        "lightning.pytorch.callbacks.model_checkpoint.os.system",
        "cimssm.checkpoints.load_checkpoint",
        "cimssm.utils.run_files.write_run_files",
        "cimssm.models.s4d.torch.save",
        "torch.nn.Module.__subclasses__",
        "torchmetrics.multimodal.CLIPScore",
    ],
)
def test_disallowed_targets(target):
    with pytest.raises(ConfigError, match="not allowed|cannot be imported"):
        resolve_target(target, "model._target_", "test")


def test_allowed_targets_instantiate_and_interpolations_are_refused():
    lin = safe_instantiate({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    assert isinstance(lin, torch.nn.Linear)
    assert (
        check_targets(
            {"a": {"_target_": "lightning.pytorch.Trainer"}, "b": [{"_target_": "torch.optim.AdamW"}]}
        )
        == 2
    )
    with pytest.raises(ConfigError, match=r"resolved"):
        check_targets({"data": {"data_dir": "${oc.env:HOME}"}}, "ckpt")


# ------------------------------------------------------------------------------ NaN and Inf
NAN_RUN = [*TINY_TRAIN, *CHECKPOINTS, "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.max_steps=12",
           "optimizer.lr=1e6", "optimizer.warmup_steps=0", "optimizer.gradient_clip_val=null"]  # fmt: skip


def test_huge_lr_stops_with_the_step_and_a_loadable_last_checkpoint(tmp_path):
    from cimssm.pipeline import rebuild_from_checkpoint, train

    with pytest.raises(TrainingStopped) as stop:
        train(compose_cfg(NAN_RUN, output_dir=tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    message = str(stop.value)
    assert message.startswith("training stopped: non-finite loss (nan) in the step after global step")
    step = torch.load(last, weights_only=True)["global_step"]
    assert f"last good checkpoint: {last} (global step {step})" in message
    _, _, lit = rebuild_from_checkpoint(str(last))  # loadable, and its weights are finite
    assert all(torch.isfinite(p).all() for p in lit.parameters())
    assert not (tmp_path / "run" / "DONE").exists()


@pytest.mark.slow
def test_huge_lr_on_the_command_line_exits_3_with_one_line(tmp_path):
    proc = run_entry("train.py", [*NAN_RUN, "hydra.run.dir=outputs/runs/nan/a"], tmp_path)
    message = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message.startswith("training stopped: non-finite loss (nan) in the step after global step")
    last = tmp_path / "outputs" / "runs" / "nan" / "a" / "checkpoints" / "last.ckpt"
    assert f"last good checkpoint: {last} (global step" in message


def _guarded_fit(tmp_path: Path, on_nan: str, poison_steps: set[int], max_steps: int = 6, **guard):
    """A minimal Lightning fit whose loss is NaN at ``poison_steps``; returns (module, guard, weights per step)."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(self.lin.weight.detach().clone())
            loss = self.lin(batch[0]).pow(2).mean()
            return loss * float("nan") if self.global_step in poison_steps else loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 2)), batch_size=4)
    module, g = Tiny(), NonFiniteGuard(on_nan=on_nan, **guard)
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=[g], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    return module, g, trainer


def test_skip_mode_skips_the_batch_and_counts_it(tmp_path):
    module, guard, trainer = _guarded_fit(tmp_path, "skip", poison_steps={2, 4})
    assert guard.skipped == 2
    assert torch.equal(module.seen[2], module.seen[3])  # the poisoned step left the weights alone
    assert not torch.equal(module.seen[1], module.seen[2])
    assert float(trainer.callback_metrics["train/skipped_batches"]) == 2.0
    assert torch.isfinite(module.lin.weight).all()


def test_stop_mode_and_too_many_skips_stop(tmp_path):
    with pytest.raises(TrainingStopped, match=r"non-finite loss \(nan\) in the step after global step 2"):
        _guarded_fit(tmp_path, "stop", poison_steps={2})
    with pytest.raises(TrainingStopped, match="2 skipped steps in a row"):
        _guarded_fit(tmp_path, "skip", poison_steps={1, 2, 3, 4}, max_consecutive_skips=2)


def test_all_nan_noise_level_is_a_failure_row_not_a_crash(tmp_path):
    from cimssm.evaluation import noise_evaluation
    from cimssm.pipeline import build_datamodule, build_lit_module

    cfg = compose_cfg([*TINY_TRAIN, "noise=gauss_1pct"], tmp_path)
    dm = build_datamodule(cfg)
    dm.setup("test")
    lit = build_lit_module(cfg, dm)
    profile = {**dict(cfg.noise), "eval_levels": [0.0, 1e30], "chips": 2}
    rows, summary = noise_evaluation(lit.net, dm.test_dataloader, "lm", profile, {"include": ["*"]}, 0, tmp_path,
                                     max_batches=1, progress=False)  # fmt: skip
    assert [r["status"] for r in rows] == ["ok", "ok", "nan", "nan"]
    assert (tmp_path / "noise_eval.csv").is_file()
    assert math.isnan(summary[1]["loss_mean"]) and summary[1]["loss_nan"] == 2


# ------------------------------------------------------------------------------- determinism
NOISY_RUN = [*TINY_TRAIN, *CHECKPOINTS, "trainer.max_steps=6", "model.dropout=0.1", "noise=gauss_1pct",
             "noise.eval_levels=[0.0,0.05]", "noise.chips=2"]  # fmt: skip


def test_same_config_twice_gives_identical_metrics_and_noise_csv(tmp_path):
    from cimssm.pipeline import train

    for name in ("a", "b"):
        train(compose_cfg(NOISY_RUN, output_dir=tmp_path / name))
    a, b = tmp_path / "a", tmp_path / "b"
    assert_same_metrics(metrics_of(a), metrics_of(b), rel=0)
    assert (a / "noise_eval.csv").read_bytes() == (b / "noise_eval.csv").read_bytes()


@pytest.mark.slow
def test_same_command_twice_in_fresh_interpreters(tmp_path):
    """Two cold `python train.py` runs (different hash seeds) give identical numbers."""
    runs = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        os.environ["PYTHONHASHSEED"] = hash_seed
        try:
            proc = run_cli(
                ["train.py", *NOISY_RUN, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT, timeout=600
            )
        finally:
            os.environ.pop("PYTHONHASHSEED", None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(tmp_path / name)
    assert_same_metrics(metrics_of(runs[0]), metrics_of(runs[1]), rel=0)
    assert (runs[0] / "noise_eval.csv").read_bytes() == (runs[1] / "noise_eval.csv").read_bytes()


# --------------------------------------------------------------------------------- ddp_spawn
DDP_RUN = [*TINY_TRAIN, *CHECKPOINTS, "trainer.max_steps=8", "trainer.val_check_interval=4",
           "callbacks.model_checkpoint.every_n_train_steps=4", "noise=gauss_1pct",
           "noise.eval_levels=[0.0,0.02,0.05]", "noise.chips=3", "trainer.limit_test_batches=null"]  # fmt: skip


@pytest.mark.slow
def test_ddp_spawn_two_processes_match_single_process(tmp_path):
    """Same global batch (2 x 4 vs 1 x 8): same losses within float tolerance, same noise CSV."""
    single = run_cli(
        ["train.py", *DDP_RUN, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'single'}"], timeout=900
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(["train.py", *DDP_RUN, "trainer=ddp_spawn", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}"],
                  timeout=900)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = metrics_of(tmp_path / "single"), metrics_of(tmp_path / "ddp")
    for key in ("val/loss", "test/loss", "train/loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a[key], b[key])
    rows_a = list(csv.DictReader(open(tmp_path / "single" / "noise_eval.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "ddp" / "noise_eval.csv")))
    assert [(r["level"], r["chip"], r["seed"]) for r in rows_a] == [
        (r["level"], r["chip"], r["seed"]) for r in rows_b
    ]
    for ra, rb in zip(rows_a, rows_b):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-4)
    assert len(list((tmp_path / "ddp").glob("checkpoints/last.ckpt"))) == 1
