"""Crash-safe checkpoints: atomic writes, last.ckpt every N steps and at every epoch end, resumable RNG.

Three pieces, all used by train.py:

- :class:`AtomicCheckpointIO` writes every checkpoint as temporary file -> fsync -> ``os.replace``
  -> fsync of the directory. ``os.replace`` is atomic on POSIX, so a reader (or a run killed
  with ``kill -9`` in the middle of a write) sees either the previous complete file or the new
  complete file, never a truncated one; the directory fsync makes the rename itself durable.
  Loading defaults to ``weights_only=True``.
- :class:`AtomicModelCheckpoint` is Lightning's ``ModelCheckpoint`` (best-k by the monitored
  metric, at validation) plus a real ``last.ckpt`` file (never a symlink or a versioned
  ``last-v1.ckpt``) written every ``every_n_train_steps`` optimizer steps, at every training
  epoch end and when training ends. It refuses to write weights that are not finite.
- :class:`StepSeededRNG` makes the random draws of a training step a function of
  ``(seed, global step, batch index, rank)``: python, numpy and torch (CPU and CUDA) are re-seeded
  at the start of every training batch. A resumed run therefore draws what the uninterrupted
  run drew, whatever else consumed the global generators in between (each DataLoader iterator
  takes a base seed from the global torch generator, and a resumed run creates its iterators
  at other moments). The generators' states at save time also travel in the checkpoint
  (as tensors and plain numbers, so ``weights_only`` loading accepts them) and are restored
  when training starts.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from cimssm.data.base import derive_seed

log = logging.getLogger("cimssm")

#: Checkpoint key of the scalar callback metrics at save time (restored on resume).
METRICS_KEY = "cimssm_callback_metrics"
# Temporary files are hidden and do not end in .ckpt, so no checkpoint scan ever picks one up.
_TMP_PATTERN = re.compile(r"^\..+\.\d+\.tmp$")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse directory fsync
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one.

    Writes ``.<name>.<pid>.tmp`` in the same directory (same file system, so the rename is
    atomic), flushes and fsyncs it, ``os.replace``-s it over ``path`` (a symlink there is
    replaced by the real file) and fsyncs the directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files a killed run left in ``directory``; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and _TMP_PATTERN.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic, fsynced local writes; ``weights_only=True`` loads by default.

    Remote paths (``s3://`` and the like) fall back to Lightning's own transaction-based write.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path,
            map_location=map_location or (lambda storage, loc: storage),
            weights_only=True if weights_only is None else weights_only,
        )


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` stored in a checkpoint file (memory-mapped, weights_only), or None."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # a message helper: an unreadable file just has no step to report
        return None


def non_finite_parameter(module: torch.nn.Module) -> str | None:
    """Name of the first parameter with a NaN or Inf, or None (one device sync in total)."""
    named = [(n, p) for n, p in module.named_parameters() if p.numel()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with an atomic, always-real ``last.ckpt`` every N steps and at every epoch end.

    Args (besides Lightning's):
        every_n_train_steps: write ``last.ckpt`` every this many optimizer steps (None: only at
            validation, epoch end and train end). The best-k checkpoints still follow the
            monitored metric at validation, so a stale metric never names a "best" file.
        save_last: must be true (or None): ``"link"`` would make last.ckpt a symlink that a kill
            between unlink and symlink leaves missing.
    """

    def __init__(
        self, *args: Any, every_n_train_steps: int | None = None, save_last: Any = True, **kwargs: Any
    ):
        if save_last == "link" or save_last is False:
            raise ValueError(
                f"save_last={save_last!r} is not allowed: last.ckpt must be a real file so a run can resume; use true"
            )
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):
            raise ValueError(
                f"every_n_train_steps={every_n_train_steps!r} is not allowed: an int >= 1 or null"
            )
        super().__init__(*args, save_last=True, **kwargs)
        self.last_every_n_steps = every_n_train_steps
        self.last_step: int | None = None  # global step of the newest last.ckpt written by this process

    # ---------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # a Trainer built without our plugin
            strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath and _is_local_file_protocol(self.dirpath):
            for p in remove_stale_temporaries(self.dirpath):
                log.info("removed %s, left by an interrupted checkpoint write", p)

    # ---------------------------------------------------------------------------------- writing
    @property
    def last_path(self) -> str:
        return str(Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _refuse_non_finite(self, trainer: pl.Trainer) -> None:
        bad = non_finite_parameter(trainer.lightning_module)
        if bad is not None:
            from cimssm.callbacks.numerics import TrainingStopped, last_good_checkpoint

            raise TrainingStopped(
                f"training stopped: parameter {bad} is not finite at step {trainer.global_step}; "
                f"not saved; {last_good_checkpoint(trainer)}"
            )

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._refuse_non_finite(trainer)
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # Always dirpath/last.ckpt, overwritten in place (atomically): no link, no last-v1.ckpt.
        # Not through _save_checkpoint: that marks the step as saved and would make Lightning
        # skip the best-k check of a validation at the same step.
        self._refuse_non_finite(trainer)
        self.last_model_path = self.last_path
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        self.last_step = trainer.global_step

    def _may_write_last(self, trainer: pl.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return (
            not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and self.last_step != trainer.global_step
            and trainer.global_step > 0
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        n = self.last_every_n_steps
        if n and trainer.global_step % n == 0 and self._may_write_last(trainer):
            self._save_last_checkpoint(trainer, {})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._may_write_last(trainer):
            self._save_last_checkpoint(trainer, {})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._may_write_last(trainer):
            self._save_last_checkpoint(trainer, {})

    # ------------------------------------------------------------------- metrics across a resume
    # Lightning does not store callback_metrics; without them a run resumed after its last
    # validation would end without val/* metrics, unlike the uninterrupted run.
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[METRICS_KEY] = {
            k: v.detach().cpu()
            for k, v in trainer.callback_metrics.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restored_metrics = dict(checkpoint.get(METRICS_KEY) or {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        restored = getattr(self, "_restored_metrics", None)
        if restored:
            for k, v in restored.items():
                trainer.callback_metrics.setdefault(k, v.to(pl_module.device))
            self._restored_metrics = None


# ---------------------------------------------------------------------------------------- RNG
def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one 63-bit seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_states() -> dict[str, Any]:
    """Generator states as tensors and plain numbers (``torch.load(weights_only=True)`` accepts them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` (missing entries are left alone)."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StepSeededRNG(Callback):
    """Re-seed every generator at each training batch from ``(seed, global step, batch index, rank)``.

    The batch index keeps micro-batches of one accumulated step apart; the rank keeps the
    processes of a multi-process run apart (different dropout masks on different shards).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._pending: dict[str, Any] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed_all(derive_seed(self.seed, trainer.global_step, batch_idx, trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": capture_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "StepSeededRNG",
    "atomic_torch_save",
    "remove_stale_temporaries",
    "checkpoint_step",
    "non_finite_parameter",
    "capture_rng_states",
    "restore_rng_states",
    "seed_all",
]
