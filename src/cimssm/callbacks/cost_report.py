"""CostReportCallback: after fit, the hardware cost of the model as it would be deployed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from cimssm.cost import cost_report, write_cost_json

log = logging.getLogger("cimssm")


def write_cost_report(net: nn.Module, analog: dict[str, Any], out_dir: Path, seq_len: int | None = None) -> dict:
    """cost.json for ``net`` with the quantizers attached to it now (shared with eval.py)."""
    report = cost_report(
        net,
        quant=None,
        analog_globs=(analog.get("include", ["*"]), analog.get("exclude", [])),
        tile_size=int(analog.get("tile_size", 512)),
        seq_len=seq_len,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_cost_json(report, out_dir / "cost.json")
    return report


def flat_totals(report: dict, prefix: str = "cost") -> dict[str, float]:
    """Scalar totals and ratios against fp32, ready for a logger."""
    out = {}
    for section, tag in (("total", ""), ("ratio_vs_fp32", "_ratio_vs_fp32")):
        for k, v in (report.get(section) or {}).items():
            if isinstance(v, int | float):
                out[f"{prefix}/{k}{tag}"] = float(v)
    return out


class CostReportCallback(Callback):
    """Writes cost.json (per layer and total; ratio vs fp32) after fit and logs the totals."""

    def __init__(self, analog: dict[str, Any], out_dir: str | Path, seq_len: int | None = None):
        self.analog, self.out_dir, self.seq_len = analog, Path(out_dir), seq_len
        self.report: dict | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.report = write_cost_report(pl_module.net, self.analog, self.out_dir, self.seq_len)
        totals = flat_totals(self.report)
        for logger in trainer.loggers:
            logger.log_metrics(totals)
        log.info("cost report: %s", {k: round(v, 4) for k, v in totals.items() if "ratio" in k})
