"""Train a state-space model under analog-hardware conditions.

    python train.py model=mamba noise=drift_5pct
    python train.py -m model=s4d quant=fp32,w8a8,w4a8 noise=gauss_1pct,gauss_5pct
"""

import hydra
from omegaconf import DictConfig

from cimssm.cli import install_error_reporting, objective_value, run_task
from cimssm.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_task(lambda: train(cfg))
    return objective_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    install_error_reporting()
    main()
