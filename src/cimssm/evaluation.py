"""Plain evaluation loops shared by the callbacks and eval.py (no Trainer needed).

``evaluate_model`` computes the task metrics of a model on a loader; ``ModelEvaluator`` does the
same as a callable that can reuse the clean prefix of the model across Monte-Carlo chips;
``noise_evaluation`` runs the Monte-Carlo evaluation of a noise profile and writes
noise_eval.csv, its summary and a plot. Each takes ``dtype`` (e.g. ``torch.bfloat16``) to
evaluate under autocast; docs/benchmarks.md says where that is faster (not on a CPU without
AVX-512 bf16).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cimssm.lit_module import IGNORE_INDEX


class MetricSum:
    """Token-weighted loss and accuracy over batches; ``result()`` adds perplexity and bits per
    character for lm. Logits are reduced in float32 whatever precision produced them."""

    def __init__(self, task: str):
        self.task = task
        self.loss, self.correct, self.count = 0.0, 0, 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float().reshape(-1, logits.shape[-1]) if self.task == "lm" else logits.float()
        y = y.reshape(-1)
        mask = y != IGNORE_INDEX
        self.loss += float(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
        self.correct += int((logits.argmax(-1)[mask] == y[mask]).sum())
        self.count += int(mask.sum())

    def result(self) -> dict[str, float]:
        loss = self.loss / max(1, self.count)
        out = {"loss": loss, "acc": self.correct / max(1, self.count)}
        if self.task == "lm":
            out["ppl"] = math.exp(loss) if loss < 700 else float("inf")
            out["bpc"] = loss / math.log(2.0)
        return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate_model(
    net: nn.Module,
    batches: Iterable,
    task: str,
    max_batches: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-weighted loss and accuracy (plus perplexity and bits per character for lm).

    ``dtype`` (e.g. ``torch.bfloat16``) runs the forwards under autocast; metrics in float32.
    """
    was_training = net.training
    net.eval()
    acc = MetricSum(task)
    device = next(net.parameters()).device
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        with _autocast(device, dtype):
            logits = net(x)
        acc.add(logits, y)
    net.train(was_training)
    return acc.result()


class ModelEvaluator:
    """``evaluator(model) -> metrics`` of :func:`evaluate_model` on the first ``max_batches`` of
    ``batches_fn()``, which can reuse a clean prefix of the model across Monte-Carlo chips.

    Inside ``with evaluator.reuse_prefix(model, stop):`` the hidden states entering block ``stop``
    (``model.forward_hidden(x, 0, stop)``, docs/architecture.md) are computed once per batch and
    each call only runs ``forward_hidden(h, stop)``: when noise sits only in blocks >= stop and
    the head, every chip gives the same numbers as the full forward for a fraction of the work.
    The cached states are kept up to ``max_cache_bytes``; later batches run the full forward.
    """

    def __init__(
        self,
        batches_fn: Callable[[], Iterable],
        task: str,
        max_batches: int | None = None,
        dtype: torch.dtype | None = None,
        max_cache_bytes: int = 1 << 30,
    ):
        self.batches_fn = batches_fn
        self.task = task
        self.max_batches = max_batches
        self.dtype = dtype
        self.max_cache_bytes = int(max_cache_bytes)
        self._prefix: tuple[int, list[tuple[torch.Tensor, torch.Tensor, bool]]] | None = None

    def _batches(self, device: torch.device):
        for i, (x, y) in enumerate(self.batches_fn()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield x.to(device), y.to(device)

    @torch.no_grad()
    def __call__(self, net: nn.Module) -> dict[str, float]:
        if self._prefix is None:
            return evaluate_model(net, self.batches_fn(), self.task, self.max_batches, self.dtype)
        stop, cached = self._prefix
        was_training = net.training
        net.eval()
        acc = MetricSum(self.task)
        device = next(net.parameters()).device
        with _autocast(device, self.dtype):
            for x, y, is_hidden in cached:
                acc.add(net.forward_hidden(x, stop) if is_hidden else net(x), y)
        net.train(was_training)
        return acc.result()

    @contextmanager
    def reuse_prefix(self, net: nn.Module, stop: int):
        """Cache ``net.forward_hidden(x, 0, stop)`` per batch for the calls inside the block.

        The caller guarantees that nothing in the input layer and blocks < ``stop`` changes
        while the block runs (monte_carlo_eval: no noise there). ``stop <= 0`` caches nothing.
        """
        if stop <= 0 or not callable(getattr(net, "forward_hidden", None)):
            yield self
            return
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        cached, used = [], 0
        with torch.no_grad(), _autocast(device, self.dtype):
            for x, y in self._batches(device):
                if used < self.max_cache_bytes:
                    h = net.forward_hidden(x, 0, stop)
                    used += h.numel() * h.element_size()
                    cached.append((h, y, True))
                else:  # over the cap: keep the input, this batch runs the full forward
                    cached.append((x, y, False))
        net.train(was_training)
        self._prefix = (stop, cached)
        try:
            yield self
        finally:
            self._prefix = None


def write_rows_csv(rows: list[Mapping[str, Any]], path: Path) -> None:
    """Write dict rows to CSV with the union of their keys as columns (first-seen order)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_noise_curve(summary: list[Mapping[str, Any]], metric: str, path: Path, title: str = "") -> None:
    """Metric mean vs noise level with a ±std band, one line per inference time; PNG (and SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=120)
    times = sorted({r["t_inference"] for r in summary})
    for t in times:
        rs = sorted((r for r in summary if r["t_inference"] == t), key=lambda r: r["level"])
        xs = [100 * r["level"] for r in rs]
        mean = [r.get(f"{metric}_mean", float("nan")) for r in rs]
        std = [r.get(f"{metric}_std", 0.0) or 0.0 for r in rs]
        label = f"t = {t:g} s" if len(times) > 1 or t else None
        ax.plot(xs, mean, marker="o", label=label)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel("noise level (%)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(t for t in times) and len(times) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)


def noise_evaluation(
    net: nn.Module,
    batches_fn,
    task: str,
    profile: Mapping[str, Any],
    analog: Mapping[str, Any],
    seed: int,
    out_dir: Path,
    max_batches: int | None = None,
    progress: bool = True,
    tag: str = "",
    dtype: torch.dtype | None = None,
    reuse_prefix: bool = True,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    write: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Monte-Carlo evaluation of ``profile``; writes noise_eval{tag}.csv, the summary and a plot.

    ``batches_fn()`` returns a fresh iterable of test batches for each evaluation. ``dtype``
    (e.g. ``torch.bfloat16``) evaluates under autocast; ``reuse_prefix`` computes the blocks in
    front of the first noisy one once instead of once per chip (same numbers, see
    :class:`ModelEvaluator`). ``shard``/``gather``: split the chips over processes and collect
    them (:func:`cimssm.hardware.montecarlo.monte_carlo_eval`); ``write=False`` (ranks > 0)
    returns the rows without writing files.
    """
    from cimssm.hardware.montecarlo import monte_carlo_eval, summarize_rows

    evaluate = ModelEvaluator(batches_fn, task, max_batches, dtype)
    rows = monte_carlo_eval(
        net,
        evaluate,
        profile,
        analog,
        seed,
        progress=progress,
        reuse_prefix=reuse_prefix,
        shard=shard,
        gather=gather,
    )
    summary = summarize_rows(rows)
    if not write:
        return rows, summary
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, out_dir / f"noise_eval{tag}.csv")
    write_rows_csv(summary, out_dir / f"noise_eval{tag}_summary.csv")
    metric = "ppl" if task == "lm" else "acc"
    chips = max(r["chips"] for r in summary)
    title = f"{profile.get('name', profile.get('kind'))}: {metric} vs noise level, {chips} chips per level"
    plot_noise_curve(summary, metric, out_dir / f"noise_eval{tag}.png", title=title)
    return rows, summary
