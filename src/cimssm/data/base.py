"""Shared pieces of the offline DataModules: the error type, the base class and a resumable sampler.

Conventions every DataModule in :mod:`cimssm.data` follows:

- It is a :class:`lightning.pytorch.LightningDataModule` built from plain keyword arguments (Hydra
  instantiates it; the config's ``name`` key is accepted and kept as ``self.name``).
- Right after ``__init__`` (before ``setup``, cheaply) it exposes ``task`` (``"lm"`` or
  ``"classification"``), ``vocab_size``, ``d_input``, ``n_classes`` and ``model_kwargs()``.
- Batches are ``(x, y)``. lm: ``x`` ``(B, L)`` long, ``y`` ``(B, L)`` long with ``-100`` where no
  loss is taken. classification: ``x`` ``(B, L, d_input)`` float32, ``y`` ``(B,)`` long.
- Bad arguments raise :class:`DataConfigError` with one line naming the argument, the bad value and
  what is allowed. Paths are checked in ``__init__`` so errors come before training starts.
- The train loader shuffles with a :class:`ResumableRandomSampler` (order is a function of
  ``(seed, epoch)``); val/test loaders go in order.

Resuming mid-epoch (RESUMABLE TRAIN ORDER)
------------------------------------------
The datamodule's ``state_dict()`` (saved by Lightning in every checkpoint) records the train sampler's
position: the epoch and the number of batches the trainer has *processed* in it, read from the
attached trainer's progress counters (not from the loader, which Lightning's fetcher reads one batch
ahead). ``load_state_dict()`` keeps that position and the next ``train_dataloader()`` starts its
sampler there: same permutation, first ``k`` batches skipped. Lightning restores the datamodule before
it asks for the train loader, so a run resumed from a mid-epoch checkpoint sees exactly the batches an
uninterrupted run would have seen. The train loader is a :class:`ResumableDataLoader` only so that
Lightning knows the loader is taken care of (it does not warn that it is not resumable); its own
``state_dict`` is a marker.

Multi-process training (ddp, ddp_spawn): each process's train loader takes its round-robin share of
the one order (:class:`ShardedSampler`), so a step of W processes with ``batch_size`` B sees the same
B·W examples as a step of one process with batch W·B, and the recorded position counts the samples
of all processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

IGNORE_INDEX = -100


class DataConfigError(ValueError):
    """A data argument is wrong: the message is one line naming the argument, the value and what is allowed."""


# --------------------------------------------------------------------------------- checks
def _arg(name: str) -> str:
    return f"data.{name}"


def check_int(name: str, value: Any, *, ge: int | None = None, allow_none: bool = False) -> int | None:
    """An int (not bool) ``>= ge``; ``None`` if allowed. Returns it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataConfigError(
            f"{_arg(name)}: {value!r} is not an integer; expected an int"
            + (f" >= {ge}" if ge is not None else "")
            + (" or null" if allow_none else "")
        )
    if ge is not None and value < ge:
        raise DataConfigError(
            f"{_arg(name)}: {value!r} is too small; expected an int >= {ge}"
            + (" or null" if allow_none else "")
        )
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise DataConfigError(f"{_arg(name)}: {value!r} is not a boolean; expected true or false")
    return bool(value)


def check_dir(name: str, value: Any, expected: str) -> Path:
    """``value`` must be an existing directory; ``expected`` describes what it should hold."""
    if not isinstance(value, str | os.PathLike):
        raise DataConfigError(f"{_arg(name)}: {value!r} is not a path; expected {expected}")
    path = Path(value).expanduser()
    if not path.exists():
        raise DataConfigError(f"{_arg(name)}: {value} does not exist; expected {expected}")
    if not path.is_dir():
        raise DataConfigError(f"{_arg(name)}: {value} is not a directory; expected {expected}")
    return path


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on all ``parts`` (numpy's SeedSequence mixing, stable across versions)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------- resumable sampler
class ResumableRandomSampler(Sampler[int]):
    """Random order over ``range(data_len)`` that is a function of ``(seed, epoch)`` only. RESUMABLE.

    - ``replacement=False``: a permutation of ``range(data_len)`` (``num_samples`` must be ``<= data_len``;
      the first ``num_samples`` of the permutation are used).
    - ``replacement=True``: ``num_samples`` draws uniform over ``range(data_len)`` (e.g. random window
      starts for a language model).

    Lightning calls :meth:`set_epoch` before each epoch. ``state_dict()``/``load_state_dict()`` carry
    ``(seed, epoch, skip)``: after loading, iterating in that epoch skips the first ``skip`` samples.
    Moving to another epoch with :meth:`set_epoch` clears the skip.
    """

    def __init__(
        self, data_len: int, num_samples: int | None = None, seed: int = 0, replacement: bool = False
    ):
        if data_len <= 0:
            raise ValueError(f"ResumableRandomSampler: data_len must be positive, got {data_len}")
        self.data_len = int(data_len)
        self.num_samples = int(num_samples if num_samples is not None else data_len)
        if not replacement and self.num_samples > self.data_len:
            raise ValueError(
                f"ResumableRandomSampler: num_samples {self.num_samples} > data_len {self.data_len} without replacement"
            )
        self.seed = int(seed)
        self.replacement = bool(replacement)
        self.epoch = 0
        self.skip = 0
        self.yielded = 0  # samples yielded by the current iterator (informational)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The full order of epoch ``epoch`` (default: the current one), as a long tensor."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch if epoch is None else epoch))
        if self.replacement:
            return torch.randint(self.data_len, (self.num_samples,), generator=g, dtype=torch.long)
        return torch.randperm(self.data_len, generator=g)[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        order = self.order()[self.skip :].tolist()
        self.yielded = self.skip
        for i in order:
            self.yielded += 1
            yield i

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``consumed``: samples of the current epoch already used (default: what this sampler yielded)."""
        skip = self.yielded if consumed is None else int(consumed)
        return {"seed": self.seed, "epoch": self.epoch, "skip": skip}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.skip = int(state["skip"])
        if self.skip >= self.num_samples:  # the epoch was finished: start the next one from its beginning
            self.epoch += 1
            self.skip = 0


class ShardedSampler(DistributedSampler):
    """One process's share of a :class:`ResumableRandomSampler` in multi-process training.

    The inner sampler's order is split round-robin (``order[rank::world]``, padded to equal
    length like ``DistributedSampler``), so step k of the processes together sees the same
    ``batch_size * world`` examples as step k of one process with that global batch; and the
    inner sampler's ``skip`` counts samples of all processes, so a resumed run continues at the
    same place. It is a ``DistributedSampler`` only so that Lightning does not wrap it in its own
    (which would re-shuffle the positions with a seed of its own).
    """

    def __init__(self, inner: ResumableRandomSampler, rank: int, world: int):
        super().__init__(range(len(inner)), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)
        per_rank = math.ceil(len(order) / self.num_replicas)
        order += order[: per_rank * self.num_replicas - len(order)]  # pad as DistributedSampler does
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(len(self.inner) / self.num_replicas)


class ResumableDataLoader(DataLoader):
    """A plain DataLoader that tells Lightning it is resumable; the datamodule restores the sampler.

    No custom ``__init__`` (Lightning may re-instantiate loaders from their constructor arguments).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"resumed_by": "datamodule"}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # the datamodule's state carries the position
        return None


# ---------------------------------------------------------------------------------- datasets
class IndexedDataset(Dataset):
    """Items ``(x[i], y[i])`` of two equally long tensors (already in their final dtypes)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        assert len(x) == len(y)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class PixelSequenceDataset(Dataset):
    """Images kept as integers ``(N, L, C)`` in sequence order; an item is ``(x, y)`` with
    ``x = (pixels[i].float() @ mix) * scale`` of shape ``(L, d_input)`` float32 and ``y`` a long scalar.

    Storing integers (uint8 or small sums) keeps the memory at one byte per pixel; the float conversion
    costs little per item.
    """

    def __init__(
        self, pixels: torch.Tensor, labels: torch.Tensor, scale: float, mix: torch.Tensor | None = None
    ):
        assert pixels.ndim == 3 and len(pixels) == len(labels)
        self.pixels, self.labels, self.scale, self.mix = pixels, labels.long(), float(scale), mix

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pixels[i].float()
        if self.mix is not None:
            x = x @ self.mix
        return x * self.scale, self.labels[i]


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(n)`` into (train, val) index tensors, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(split_seed, n)))
    val, train = perm[:val_size], perm[val_size:]
    return train.sort().values, val.sort().values


# -------------------------------------------------------------------------------- base class
class BaseDataModule(pl.LightningDataModule):
    """Common attributes, loaders and the resumable train order. Subclasses set ``task`` etc. in ``__init__``
    and ``self.train_set``/``val_set``/``test_set`` in ``setup``."""

    task: str = "lm"
    vocab_size: int | None = None
    d_input: int | None = None
    n_classes: int | None = None

    def __init__(
        self,
        *,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        name: str | None = None,
    ):
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, ge=1)
        self.seed = check_int("seed", seed)
        self.num_workers = check_int("num_workers", num_workers, ge=0)
        self.pin_memory = check_bool("pin_memory", pin_memory)
        self.name = name
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._train_sampler: ResumableRandomSampler | None = None
        self._pending_sampler_state: dict[str, int] | None = None

    # ---- model interface
    def model_kwargs(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "vocab_size": self.vocab_size,
            "d_input": self.d_input,
            "n_classes": self.n_classes,
        }

    # ---- samplers and loaders
    def _train_sampler_for(self, dataset: Dataset) -> ResumableRandomSampler:
        """Subclasses override for other sampling (e.g. random windows with replacement)."""
        return ResumableRandomSampler(len(dataset), seed=self.seed)

    def _loader(self, dataset: Dataset | None, split: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before {split}_dataloader()")
        common = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        if split != "train":
            return DataLoader(dataset, shuffle=False, **common)
        sampler = self._train_sampler_for(dataset)
        if self._pending_sampler_state is not None:
            sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        self._train_sampler = sampler
        world = self._world_size()
        if world > 1:  # each process takes its share; Lightning leaves a DistributedSampler alone
            return ResumableDataLoader(dataset, sampler=ShardedSampler(sampler, self.trainer.global_rank, world), **common)
        return ResumableDataLoader(dataset, sampler=sampler, **common)

    def _world_size(self) -> int:
        trainer = self.trainer
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    # ---- state
    def _train_position(self) -> dict[str, int] | None:
        """(epoch, samples consumed) of the train sampler, from the trainer's progress when attached."""
        sampler = self._train_sampler
        if sampler is None:
            return self._pending_sampler_state
        trainer = self.trainer
        if trainer is not None:
            try:
                loop = trainer.fit_loop
                epoch = int(loop.epoch_progress.current.processed)
                batches = int(loop.epoch_loop.batch_progress.current.processed)
                per_epoch = trainer.num_training_batches  # honours limit_train_batches
                if math.isfinite(per_epoch) and batches >= per_epoch:  # epoch done: next one from its start
                    epoch, batches = epoch + 1, 0
            except (AttributeError, TypeError):  # pragma: no cover - other Lightning versions
                epoch, batches = sampler.epoch, math.ceil(sampler.yielded / self.batch_size)
            # every process consumed batch_size per step: skip counts the samples of all of them
            return {"seed": sampler.seed, "epoch": epoch, "skip": batches * self.batch_size * self._world_size()}
        return sampler.state_dict()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"class": type(self).__name__}
        position = self._train_position()
        if position is not None:
            state["train_sampler"] = position
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("class", type(self).__name__) != type(self).__name__:
            raise DataConfigError(
                f"data._target_: checkpoint was saved with {state_dict['class']}, not {type(self).__name__}; "
                "expected the same data module as the checkpoint"
            )
        if "train_sampler" in state_dict:
            self._pending_sampler_state = dict(state_dict["train_sampler"])
