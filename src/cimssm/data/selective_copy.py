"""The selective copying task of the Mamba paper (Gu & Dao 2023, section 4.1.1), generated offline.

A sequence has ``seq_len`` positions that hold the blank (noise) token except ``n_memorize`` data tokens at
random distinct positions, followed by ``n_memorize`` marker tokens. At the j-th marker the model must
output the j-th data token (in order of position). Token ids, as in state-spaces' ``torch_copying_data``:

    0                  blank / noise
    1 .. n_tokens      data tokens (drawn uniformly, repeats allowed)
    n_tokens + 1       marker

so ``vocab_size = n_tokens + 2``. ``x``: ``(seq_len + n_memorize,)`` long; ``y`` has the same length, ``-100``
everywhere except at the marker positions, where ``y[seq_len + j]`` is the j-th data token. With a causal
model the logits at marker position ``seq_len + j`` predict ``y[seq_len + j]``.

The three splits are generated from seeds derived from ``(seed, split)`` with a CPU ``torch.Generator``:
the same ``seed`` gives the same data, and train/val/test differ.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .base import IGNORE_INDEX, BaseDataModule, DataConfigError, IndexedDataset, check_int, derive_seed

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def generate_selective_copy(
    n: int, seq_len: int, n_memorize: int, n_tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: (x, y) long tensors of shape ``(n, seq_len + n_memorize)`` (see the module docstring)."""
    g = torch.Generator().manual_seed(int(seed))
    blank, marker = 0, n_tokens + 1
    positions = torch.rand(n, seq_len, generator=g).argsort(dim=1)[:, :n_memorize].sort(dim=1).values
    tokens = torch.randint(1, n_tokens + 1, (n, n_memorize), generator=g)
    x = torch.full((n, seq_len + n_memorize), blank, dtype=torch.long)
    x.scatter_(1, positions, tokens)
    x[:, seq_len:] = marker
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, seq_len:] = tokens
    return x, y


class SelectiveCopyDataModule(BaseDataModule):
    """Selective copying (token input, per-position targets); see the module docstring."""

    task = "lm"

    def __init__(
        self,
        seq_len: int = 64,
        n_memorize: int = 8,
        n_tokens: int = 8,
        n_train: int = 2000,
        n_val: int = 200,
        n_test: int = 200,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        name: str | None = None,
    ):
        super().__init__(
            batch_size=batch_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory, name=name
        )
        self.seq_len = check_int("seq_len", seq_len, ge=1)
        self.n_memorize = check_int("n_memorize", n_memorize, ge=1)
        self.n_tokens = check_int("n_tokens", n_tokens, ge=1)
        self.n_train = check_int("n_train", n_train, ge=1)
        self.n_val = check_int("n_val", n_val, ge=1)
        self.n_test = check_int("n_test", n_test, ge=1)
        if self.n_memorize > self.seq_len:
            raise DataConfigError(
                f"data.n_memorize: {self.n_memorize} data tokens do not fit in data.seq_len={self.seq_len} positions; "
                f"expected n_memorize <= {self.seq_len}"
            )
        self.vocab_size = self.n_tokens + 2
        self.blank_token, self.marker_token = 0, self.n_tokens + 1

    @property
    def total_len(self) -> int:
        return self.seq_len + self.n_memorize

    def split_seed(self, split: str) -> int:
        return derive_seed(self.seed, SPLIT_IDS[split])

    def generate(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]
        return generate_selective_copy(
            n, self.seq_len, self.n_memorize, self.n_tokens, self.split_seed(split)
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = IndexedDataset(*self.generate("train"))
        self.val_set = IndexedDataset(*self.generate("val"))
        self.test_set = IndexedDataset(*self.generate("test"))

    def _task_args(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("seq_len", "n_memorize", "n_tokens", "seed")}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["task"] = self._task_args()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("task")
        if saved is not None and saved != self._task_args():
            warnings.warn(
                f"SelectiveCopyDataModule: the checkpoint's task {saved} differs from this run's {self._task_args()}",
                stacklevel=2,
            )
