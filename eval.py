"""Evaluate a trained checkpoint, clean and under analog noise, without retraining.

    python eval.py ckpt_path=outputs/runs/default/<date>/checkpoints/last.ckpt noise=pcm
    python eval.py ckpt_path=... noise=pcm noise.t_inference=[1,3600,86400]
    python eval.py -m sweep_dir=outputs/multirun/<experiment>/<date> noise=gauss_1pct,pcm
"""

import sys

import hydra
from omegaconf import DictConfig

from cimssm.cli import install_error_reporting, run_task
from cimssm.pipeline import evaluate
from cimssm.sweeps.checkpoints import expand_sweep_dir_or_exit


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_task(lambda: evaluate(cfg))


if __name__ == "__main__":
    install_error_reporting()
    # sweep_dir=<multirun dir> becomes a ckpt_path sweep over its jobs' checkpoints.
    sys.argv = expand_sweep_dir_or_exit(sys.argv)
    main()
