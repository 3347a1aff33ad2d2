"""Plain evaluation loops shared by the callbacks and eval.py (no Trainer needed).

``evaluate_model`` computes the task metrics of a model on a loader; ``noise_evaluation`` runs
the Monte-Carlo evaluation of a noise profile and writes noise_eval.csv, its summary and a plot.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cimssm.lit_module import IGNORE_INDEX


@torch.no_grad()
def evaluate_model(
    net: nn.Module, batches: Iterable, task: str, max_batches: int | None = None, dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Token-weighted loss and accuracy (plus perplexity and bits per character for lm)."""
    was_training = net.training
    net.eval()
    total_loss, total_correct, total_count = 0.0, 0, 0
    device = next(net.parameters()).device
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(x)
        logits = logits.float().reshape(-1, logits.shape[-1]) if task == "lm" else logits.float()
        y = y.reshape(-1)
        mask = y != IGNORE_INDEX
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        total_loss += float(loss)
        total_correct += int((logits.argmax(-1)[mask] == y[mask]).sum())
        total_count += int(mask.sum())
    net.train(was_training)
    loss = total_loss / max(1, total_count)
    out = {"loss": loss, "acc": total_correct / max(1, total_count)}
    if task == "lm":
        out["ppl"] = math.exp(loss) if loss < 700 else float("inf")
        out["bpc"] = loss / math.log(2.0)
    return out


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
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Monte-Carlo evaluation of ``profile``; writes noise_eval{tag}.csv, the summary and a plot.

    ``batches_fn()`` returns a fresh iterable of test batches for each evaluation.
    """
    from cimssm.hardware.montecarlo import monte_carlo_eval, summarize_rows

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_model(model, batches_fn(), task, max_batches)

    rows = monte_carlo_eval(net, evaluate, profile, analog, seed, progress=progress)
    summary = summarize_rows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, out_dir / f"noise_eval{tag}.csv")
    write_rows_csv(summary, out_dir / f"noise_eval{tag}_summary.csv")
    metric = "ppl" if task == "lm" else "acc"
    chips = max(r["chips"] for r in summary)
    title = f"{profile.get('name', profile.get('kind'))}: {metric} vs noise level, {chips} chips per level"
    plot_noise_curve(summary, metric, out_dir / f"noise_eval{tag}.png", title=title)
    return rows, summary
