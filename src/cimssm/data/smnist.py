"""Sequential (pixel-by-pixel) MNIST / Fashion-MNIST from the standard idx files.

``data_dir`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not (the ``*.idx3-ubyte`` spelling is accepted
too). MNIST and Fashion-MNIST differ only by the directory; Debian's ``dataset-fashion-mnist`` installs
Fashion-MNIST to ``/usr/share/datasets/fashion-mnist``.

Each image becomes a sequence of ``L = (28 / downsample)^2`` steps of one feature, row by row, pixels
scaled to ``[0, 1]`` (``downsample=2``: 2x2 average pooling, 196 steps). ``permuted=True`` reorders the
steps with a fixed permutation drawn from ``permutation_seed`` (the task, independent of the training
``seed``; stored in ``state_dict``). Labels: 10 classes. Validation: ``val_size`` images of the training
file, a fixed random choice (split seed 42, independent of ``seed``); test: the t10k file.
``limit_train`` / ``limit_test`` keep the first images of the train part / test file (for quick runs).

The idx reader (:func:`read_idx`) is our own: it checks the magic number (type code and number of
dimensions), the dimensions and that the data is complete, and raises :class:`DataConfigError`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
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
    derive_seed,
    split_indices,
)

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_SEED = 42
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
EXPECTED = (
    "a directory with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (or uncompressed) (Debian package dataset-fashion-mnist installs them to "
    "/usr/share/datasets/fashion-mnist)"
)
# idx type codes -> big-endian numpy dtypes
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _fail(path: Path, problem: str, arg: str = "data_dir") -> DataConfigError:
    return DataConfigError(f"data.{arg}: {path} {problem}; expected a complete idx file as in {EXPECTED}")


def read_idx_header(
    path: Path, ndim: int | None = None, arg: str = "data_dir"
) -> tuple[str, tuple[int, ...], int]:
    """(numpy dtype, shape, header bytes) of an idx file, reading only its header."""
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise _fail(path, f"is too short for an idx header ({len(head)} bytes)", arg)
            zero, code, nd = struct.unpack(">HBB", head)
            if zero != 0 or code not in IDX_DTYPES:
                raise _fail(
                    path, f"has magic number 0x{head.hex()}, not an idx magic number (0x0000TTDD)", arg
                )
            if ndim is not None and nd != ndim:
                raise _fail(path, f"has {nd} dimensions (magic 0x{head.hex()}), not {ndim}", arg)
            dims_raw = f.read(4 * nd)
            if len(dims_raw) < 4 * nd:
                raise _fail(path, "is truncated inside its header", arg)
    except (EOFError, OSError, zlib.error) as e:
        raise _fail(path, f"cannot be read ({type(e).__name__}: {e})", arg) from None
    return IDX_DTYPES[code], struct.unpack(f">{nd}I", dims_raw), 4 + 4 * nd


def read_idx(path: str | Path, ndim: int | None = None, arg: str = "data_dir") -> np.ndarray:
    """Read a whole idx file (gzipped if it ends in .gz) into a numpy array, validating it."""
    path = Path(path)
    dtype, shape, offset = read_idx_header(path, ndim, arg)
    try:
        with _open(path) as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise _fail(path, f"is truncated or corrupt ({type(e).__name__}: {e})", arg) from None
    itemsize = np.dtype(dtype).itemsize
    need = int(np.prod(shape, dtype=np.int64)) * itemsize
    have = len(raw) - offset
    if have < need:
        raise _fail(path, f"is truncated: {have} data bytes, the header {shape} needs {need}", arg)
    if have > need:
        raise _fail(path, f"has {have - need} bytes after the data its header {shape} describes", arg)
    arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    return arr.astype(arr.dtype.newbyteorder("="))


def find_idx(root: Path, stem: str) -> Path | None:
    """``stem``, ``stem.gz`` or the ``*.idx3-ubyte`` spelling of it in ``root``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (root / name).is_file():
            return root / name
    return None


class SMNISTDataModule(BaseDataModule):
    """Pixel-by-pixel (permuted) MNIST / Fashion-MNIST classification; see the module docstring."""

    task = "classification"
    d_input = 1
    n_classes = 10

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        permuted: bool = False,
        downsample: int = 1,
        val_size: int = 5000,
        limit_train: int | None = None,
        limit_test: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        permutation_seed: int = 0,
        pin_memory: bool = False,
        name: str | None = None,
    ):
        super().__init__(
            batch_size=batch_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory, name=name
        )
        self.permuted = check_bool("permuted", permuted)
        self.downsample = check_int("downsample", downsample, ge=1)
        self.val_size = check_int("val_size", val_size, ge=0)
        self.limit_train = check_int("limit_train", limit_train, ge=1, allow_none=True)
        self.limit_test = check_int("limit_test", limit_test, ge=1, allow_none=True)
        self.permutation_seed = check_int("permutation_seed", permutation_seed)
        self.data_dir = check_dir("data_dir", data_dir, EXPECTED)
        self.validate()
        self.permutation = (
            torch.randperm(
                self.seq_len, generator=torch.Generator().manual_seed(derive_seed(self.permutation_seed))
            )
            if self.permuted
            else None
        )

    def validate(self) -> None:
        """Files present, headers consistent (cheap: headers only), sizes and downsample allowed."""
        self.paths: dict[str, Path] = {}
        missing = []
        for key, stem in FILES.items():
            p = find_idx(self.data_dir, stem)
            if p is None:
                missing.append(stem + "[.gz]")
            else:
                self.paths[key] = p
        if missing:
            raise DataConfigError(
                f"data.data_dir: {self.data_dir} lacks {', '.join(missing)}; expected {EXPECTED}"
            )
        counts = {}
        for split in ("train", "test"):
            _, ishape, _ = read_idx_header(self.paths[f"{split}_images"], ndim=3)
            _, lshape, _ = read_idx_header(self.paths[f"{split}_labels"], ndim=1)
            if ishape[0] != lshape[0]:
                raise DataConfigError(
                    f"data.data_dir: {self.paths[f'{split}_images']} has {ishape[0]} images but "
                    f"{self.paths[f'{split}_labels']} has {lshape[0]} labels; expected as many labels as images"
                )
            counts[split] = ishape[0]
            if split == "test" and ishape[1:] != self.image_shape:
                raise DataConfigError(
                    f"data.data_dir: {self.paths['test_images']} has {ishape[1]}x{ishape[2]} images, the training "
                    f"file {self.image_shape[0]}x{self.image_shape[1]}; expected the same size"
                )
            self.image_shape = ishape[1:]
            for path in (self.paths[f"{split}_images"], self.paths[f"{split}_labels"]):
                if path.suffix != ".gz":  # uncompressed: completeness is a size check
                    dtype, shape, offset = read_idx_header(path)
                    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
                    if path.stat().st_size != need:
                        raise _fail(path, f"has {path.stat().st_size} bytes, its header {shape} needs {need}")
        h, w = self.image_shape
        if h % self.downsample or w % self.downsample:
            allowed = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
            raise DataConfigError(
                f"data.downsample: {self.downsample} does not divide the {h}x{w} images; expected one of {allowed}"
            )
        if self.val_size >= counts["train"]:
            raise DataConfigError(
                f"data.val_size: {self.val_size} leaves no training image of the {counts['train']}; "
                f"expected 0 <= val_size < {counts['train']}"
            )
        self.counts = counts

    @property
    def seq_len(self) -> int:
        h, w = self.image_shape
        return (h // self.downsample) * (w // self.downsample)

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W) uint8 -> (N, L, 1) integer sums over downsample x downsample blocks, permuted."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        d = self.downsample
        if d > 1:
            n, h, w = x.shape
            x = x.reshape(n, h // d, d, w // d, d).to(torch.int32).sum(dim=(2, 4))
            x = x.to(torch.int16 if 255 * d * d < 2**15 else torch.int32)
        x = x.reshape(len(x), -1)
        if self.permutation is not None:
            x = x[:, self.permutation]
        return x.unsqueeze(-1).contiguous()

    def _labels(self, key: str) -> torch.Tensor:
        y = read_idx(self.paths[key], ndim=1)
        if y.size and (y.min() < 0 or y.max() >= self.n_classes):
            raise DataConfigError(
                f"data.data_dir: {self.paths[key]} has labels {int(y.min())}..{int(y.max())}; expected 0..9"
            )
        return torch.from_numpy(y.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        scale = 1.0 / (255.0 * self.downsample**2)
        x = self._pixels(read_idx(self.paths["train_images"], ndim=3))
        y = self._labels("train_labels")
        train_idx, val_idx = split_indices(len(x), self.val_size, SPLIT_SEED)
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]
        self.train_set = PixelSequenceDataset(x[train_idx], y[train_idx], scale)
        self.val_set = PixelSequenceDataset(x[val_idx], y[val_idx], scale)
        x = self._pixels(read_idx(self.paths["test_images"], ndim=3))
        y = self._labels("test_labels")
        if self.limit_test is not None:
            x, y = x[: self.limit_test], y[: self.limit_test]
        self.test_set = PixelSequenceDataset(x, y, scale)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["permutation"] = None if self.permutation is None else self.permutation.tolist()
        state["seq_len"] = self.seq_len
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        perm = state_dict.get("permutation")
        if (perm is None) != (self.permutation is None) or (perm is not None and len(perm) != self.seq_len):
            raise DataConfigError(
                f"data.permuted: {self.permuted} (sequence length {self.seq_len}) does not match the checkpoint's "
                f"{'permuted' if perm is not None else 'unpermuted'} data; expected the checkpoint's permuted/downsample"
            )
        if perm is not None and not torch.equal(torch.tensor(perm), self.permutation):
            self.permutation = torch.tensor(perm, dtype=torch.long)
            if self.train_set is not None:  # re-read with the checkpoint's permutation
                self.train_set = self.val_set = self.test_set = None
                self.setup()
