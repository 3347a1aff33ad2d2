"""End-to-end training: every model x data pair, overfitting, resuming, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg, run_cli
from test_data import make_cifar, make_mnist

from cimssm.pipeline import build_datamodule, build_lit_module, train

MODELS = ["s4d_tiny", "mamba_tiny"]
DATA = ["shakespeare_char", "selective_copy", "smnist", "scifar"]


def data_overrides(data: str, tmp_path) -> list[str]:
    if data == "smnist":
        make_mnist(tmp_path / "mnist")
        return [f"data.data_dir={tmp_path / 'mnist'}", "data.val_size=10", "data.batch_size=4", "data.downsample=2"]
    if data == "scifar":
        make_cifar(tmp_path / "cifar")
        return [f"data.data_dir={tmp_path / 'cifar'}", "data.val_size=4", "data.batch_size=4"]
    return []


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_every_model_and_data(tiny_cfg, tmp_path, model, data):
    cfg = tiny_cfg(model, data, ["trainer.fast_dev_run=true", *data_overrides(data, tmp_path)])
    metrics = train(cfg)
    assert "test/loss" in metrics and torch.isfinite(torch.tensor(metrics["test/loss"]))


@pytest.mark.parametrize("model", MODELS)
def test_overfits_one_batch(tiny_cfg, model):
    cfg = tiny_cfg(model, "selective_copy", ["optimizer.lr=1e-2", "optimizer.weight_decay=0"])
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    lit = build_lit_module(cfg, dm)
    x, y = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW(lit.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, _, _ = lit.loss_and_logits((x, y))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_run_dir_contents_and_resume_continues_step_count(tiny_cfg, tmp_path):
    cfg = tiny_cfg("s4d_tiny", "selective_copy", ["callbacks=default", "callbacks.rich_progress_bar=null"])
    train(cfg)
    run = tmp_path / "run"
    for name in ("config_resolved.yaml", "provenance.json", "metrics.csv", "metrics_final.json", "DONE"):
        assert (run / name).is_file(), name
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    prov = json.loads((run / "provenance.json").read_text())
    assert prov[0]["packages"]["torch"]
    cfg2 = tiny_cfg(
        "s4d_tiny",
        "selective_copy",
        ["callbacks=default", "callbacks.rich_progress_bar=null", "trainer.max_steps=8", f"ckpt_path={ckpt}"],
    )
    cfg2.output_dir = str(tmp_path / "resumed")
    train(cfg2)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8


def test_cli_fast_dev_run(tmp_path):
    proc = run_cli(
        ["train.py", "model=mamba_tiny", "data=selective_copy", "trainer.fast_dev_run=true",
         "data.n_train=32", "data.n_val=8", "data.n_test=8", f"hydra.run.dir={tmp_path / 'cli'}"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cli" / "config_resolved.yaml").is_file()


def test_compose_defaults_are_the_demo_job():
    cfg = compose_cfg([])
    assert cfg.model.name == "s4d" and cfg.data.name == "shakespeare_char"
    assert cfg.quant.name == "fp32" and cfg.noise.name == "none" and cfg.decomp.name == "none"


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "[csv,wandb]"])
def test_loggers(tiny_cfg, tmp_path, logger):
    cfg = tiny_cfg("s4d_tiny", "selective_copy", [f"logger={logger}", "trainer.max_steps=2", "trainer.val_check_interval=1"])
    train(cfg)
    run = tmp_path / "run"
    if "wandb" in logger:
        runs = list((run / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, list(run.rglob("*"))[:20]
    else:
        assert list((run / "tensorboard").rglob("events.out.tfevents*"))
