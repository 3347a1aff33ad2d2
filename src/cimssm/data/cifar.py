"""Sequential CIFAR-10 from the standard python batches (``cifar-10-python.tar.gz`` unpacked).

``data_dir`` holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (or is the folder above
``cifar-10-batches-py``). Each batch is a pickled dict with ``b"data"``: ``(N, 3072)`` uint8 (1024 red,
then 1024 green, then 1024 blue values, each 32x32 row-major) and ``b"labels"``: N ints in 0..9.

Each image becomes 1024 steps, row by row, scaled to ``[0, 1]``: ``grayscale=True`` gives one feature per
step, the luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601), so ``x`` is ``(B, 1024, 1)``;
``grayscale=False`` gives ``(B, 1024, 3)`` (R, G, B). Validation: ``val_size`` images of the training
batches, a fixed random choice (split seed 42, independent of ``seed``); test: ``test_batch``.

Pickle is code: unpickling an untrusted file can run anything. The batches are read with
:class:`RestrictedUnpickler`, which resolves only the few globals that numpy arrays and plain containers
need (numpy's array reconstruction and dtype, ``_codecs.encode`` for bytes written by Python 3 at
protocol 2) and refuses everything else with :class:`DataConfigError`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import (
    BaseDataModule,
    DataConfigError,
    PixelSequenceDataset,
    check_bool,
    check_dir,
    check_int,
    split_indices,
)

DEFAULT_DIR = "data/cifar-10-batches-py"
SPLIT_SEED = 42
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
EXPECTED = (
    "a directory with the CIFAR-10 python batches data_batch_1..data_batch_5 and test_batch "
    "(cifar-10-python.tar.gz unpacked: its cifar-10-batches-py folder)"
)
LUMA = (0.299, 0.587, 0.114)

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("__builtin__", "bytearray"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "complex"),
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that only builds numpy arrays and builtin containers (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ForbiddenGlobal(f"global {module}.{name} is not allowed")
        if module == "__builtin__":
            module = "builtins"
        numpy2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
        if numpy2 and module.startswith("numpy.core."):  # pickled by numpy 1; avoid numpy 2's deprecated shim
            module = "numpy._core." + module[len("numpy.core.") :]
        elif not numpy2 and module.startswith("numpy._core."):  # pragma: no cover - pickled by numpy 2
            module = "numpy.core." + module[len("numpy._core.") :]
        return super().find_class(module, name)


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and builtin containers (bytes kept as bytes)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data (N, 3072) uint8, labels (N,) int64) of one CIFAR-10 python batch, validated."""
    try:
        obj = restricted_load(path.read_bytes())
    except ForbiddenGlobal as e:
        raise DataConfigError(
            f"data.data_dir: {path} cannot be unpickled safely ({e}); expected {EXPECTED}"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OSError,
    ) as e:
        raise DataConfigError(
            f"data.data_dir: {path} is truncated or not a pickle ({type(e).__name__}: {e}); expected {EXPECTED}"
        ) from None
    if not isinstance(obj, dict):
        raise DataConfigError(
            f"data.data_dir: {path} holds a {type(obj).__name__}, not a dict; expected {EXPECTED}"
        )
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise DataConfigError(
            f"data.data_dir: {path} has keys {sorted(obj)}, not data and labels; expected {EXPECTED}"
        )
    data, labels = obj["data"], np.asarray(obj["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataConfigError(
            f"data.data_dir: {path} has data {desc}, not uint8 (N, 3072); expected {EXPECTED}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataConfigError(
            f"data.data_dir: {path} has {labels.shape} labels of {labels.dtype} for {len(data)} images; "
            f"expected {len(data)} integer labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataConfigError(
            f"data.data_dir: {path} has labels {labels.min()}..{labels.max()}; expected 0..9"
        )
    return data, labels.astype(np.int64)


class SequentialCIFARDataModule(BaseDataModule):
    """Pixel-by-pixel CIFAR-10 classification (grayscale: 1 feature, else RGB); see the module docstring."""

    task = "classification"
    n_classes = 10

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        grayscale: bool = True,
        val_size: int = 5000,
        limit_train: int | None = None,
        limit_test: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        name: str | None = None,
    ):
        super().__init__(
            batch_size=batch_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory, name=name
        )
        self.grayscale = check_bool("grayscale", grayscale)
        self.val_size = check_int("val_size", val_size, ge=0)
        self.limit_train = check_int("limit_train", limit_train, ge=1, allow_none=True)
        self.limit_test = check_int("limit_test", limit_test, ge=1, allow_none=True)
        self.d_input = 1 if self.grayscale else 3
        root = check_dir("data_dir", data_dir, EXPECTED)
        if not (root / TRAIN_FILES[0]).exists() and (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        missing = [f for f in [*TRAIN_FILES, TEST_FILE] if not (root / f).is_file()]
        if missing:
            raise DataConfigError(
                f"data.data_dir: {data_dir} lacks {', '.join(missing)}; expected {EXPECTED}"
            )
        self.data_dir = root
        self.seq_len = 1024

    def _pixels(self, data: np.ndarray) -> torch.Tensor:
        """(N, 3072) channel-major -> (N, 1024, 3) uint8 in row-major pixel order."""
        return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 1024).transpose(0, 2, 1)))

    def _dataset(self, pixels: torch.Tensor, labels: torch.Tensor) -> PixelSequenceDataset:
        mix = torch.tensor(LUMA, dtype=torch.float32)[:, None] if self.grayscale else None
        return PixelSequenceDataset(pixels, labels, 1.0 / 255.0, mix=mix)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        batches = [load_batch(self.data_dir / f) for f in TRAIN_FILES]
        x = self._pixels(np.concatenate([b[0] for b in batches]))
        y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        if self.val_size >= len(x):
            raise DataConfigError(
                f"data.val_size: {self.val_size} leaves no training image of the {len(x)}; expected 0 <= val_size < {len(x)}"
            )
        train_idx, val_idx = split_indices(len(x), self.val_size, SPLIT_SEED)
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]
        self.train_set = self._dataset(x[train_idx], y[train_idx])
        self.val_set = self._dataset(x[val_idx], y[val_idx])
        data, labels = load_batch(self.data_dir / TEST_FILE)
        x, y = self._pixels(data), torch.from_numpy(labels)
        if self.limit_test is not None:
            x, y = x[: self.limit_test], y[: self.limit_test]
        self.test_set = self._dataset(x, y)
