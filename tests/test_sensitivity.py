"""Layer sensitivity (analysis/sensitivity.py) and the HPD vs baseline table (analysis/hpd_compare.py)."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from conftest import CONF, compose_cfg
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from torch import nn

from cimssm.analysis.hpd_compare import compare, markdown, variant_label, write_comparison
from cimssm.analysis.sensitivity import (
    degradation,
    format_ranking,
    run_sensitivity,
    sensitivity_analysis,
    sensitivity_units,
)
from cimssm.config.validate import ConfigError
from cimssm.hardware.hpd import apply_hpd
from cimssm.models.mamba import MambaModel
from cimssm.models.s4d import S4DModel


class Block(nn.Module):
    def __init__(self, d: int, unused: bool = False):
        super().__init__()
        self.fc = nn.Linear(d, d)
        if unused:
            self.unused = nn.Linear(d, d)  # registered, never called

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class TwoBlocks(nn.Module):
    """No hardware_parts: every Linear weight is an analog candidate."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d, unused=True)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def mse_evaluate(x: torch.Tensor, y: torch.Tensor):
    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"loss": float(((model(x) - y) ** 2).mean())}

    return evaluate


def toy():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(32, 6)
    y = model(x).detach() + 0.1 * torch.randn(32, 3)
    return model, mse_evaluate(x, y)


def test_units_of_the_models():
    model, _ = toy()
    names = [u.name for u in sensitivity_units(model)]
    assert names == ["block0", "block0/fc", "block1", "block1/fc", "block1/unused", "head"]
    torch.manual_seed(0)
    mamba = MambaModel(d_model=8, n_layer=2, d_state=4, vocab_size=12)
    units = {u.name: u for u in sensitivity_units(mamba)}
    assert [u for u in units if u.startswith("block1")] == [
        "block1", "block1/in_proj", "block1/conv1d", "block1/x_proj", "block1/dt_proj", "block1/out_proj", "block1/A_log/D",
    ]  # fmt: skip
    assert units["block1/A_log/D"].targets == ("backbone.layers.1.mixer.A_tap", "backbone.layers.1.mixer.D")
    assert "lm_head" in units and "embeddings" not in units  # the lookup table is never a crossbar
    apply_hpd(mamba, "all_out_proj")
    units = {u.name: u for u in sensitivity_units(mamba)}
    assert units["block0/out_proj"].targets == ("backbone.layers.0.mixer.out_proj.analog.weight",)
    assert not any(".digital." in t for u in units.values() for t in u.targets)
    s4d = S4DModel(d_model=8, n_layer=1, d_state=4, vocab_size=12)
    assert [u.name for u in sensitivity_units(s4d)] == ["block0", "block0/mixing", "block0/kernel", "decoder"]
    # a profile narrowing the analog set narrows the units
    narrowed = sensitivity_units(mamba, {"kind": "qs4d_A", "level": 0.1})
    assert [u.name for u in narrowed] == ["block0", "block0/A_log/D", "block1", "block1/A_log/D"]


def test_unit_absent_from_the_forward_pass_gives_zero_degradation():
    model, evaluate = toy()
    rows = sensitivity_analysis(
        model, evaluate, {"kind": "gaussian", "level": 0.2}, None, seed=0, metric="loss", chips=3
    )
    by = {r["unit"]: r for r in rows}
    assert by["block1/unused"]["degradation"] == 0.0 and by["block1/unused"]["std"] == 0.0
    assert by["block1/fc"]["degradation"] > 0
    # common random numbers: block1 = block1/fc + the unused layer, so exactly the same numbers
    assert by["block1"]["mean"] == by["block1/fc"]["mean"]
    assert by["block1/unused"]["rank"] == len(rows)
    clean = evaluate(model)["loss"]
    assert by["head"]["degradation"] == pytest.approx(by["head"]["mean"] / clean - 1)


def test_ranking_is_deterministic_with_a_fixed_seed():
    model, evaluate = toy()
    profile = {"kind": "gaussian", "level": 0.1, "eval_levels": [0.05, 0.1]}
    a = sensitivity_analysis(model, evaluate, profile, None, seed=7, metric="loss", chips=2)
    b = sensitivity_analysis(model, evaluate, profile, None, seed=7, metric="loss", chips=2)
    c = sensitivity_analysis(model, evaluate, profile, None, seed=8, metric="loss", chips=2)
    assert a == b
    assert [r["mean"] for r in a] != [r["mean"] for r in c]
    for level in (0.05, 0.1):
        ranks = sorted(r["rank"] for r in a if r["level"] == level)
        assert ranks == list(range(1, 7))
        ranked = sorted((r for r in a if r["level"] == level), key=lambda r: r["rank"])
        assert all(x["degradation"] >= y["degradation"] for x, y in zip(ranked, ranked[1:]))


def test_degradation_direction():
    assert degradation("ppl", 12.0, 10.0) == pytest.approx(0.2)
    assert degradation("acc", 0.7, 0.9) == pytest.approx(0.2)


def test_run_sensitivity_writes_csv_heatmap_and_ranked_table(tmp_path, caplog):
    torch.manual_seed(0)
    model = MambaModel(d_model=8, n_layer=2, d_state=4, vocab_size=12).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 12, (2, 10), generator=g), torch.randint(0, 12, (2, 10), generator=g))]
    with caplog.at_level(logging.INFO, logger="cimssm"):
        rows = run_sensitivity(
            model, lambda: batches, "lm", {"kind": "gaussian", "level": 0.2, "chips": 2}, None, 0, tmp_path,
            progress=False,
        )  # fmt: skip
    with open(tmp_path / "sensitivity.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) == 15 and csv_rows[0]["metric"] == "ppl"
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
    assert "layer sensitivity at level 0.2" in caplog.text and "block1/out_proj" in caplog.text
    assert format_ranking(rows).count("\n") > 15


def test_sensitivity_needs_a_noise_profile():
    from cimssm.callbacks.sensitivity import sensitivity_settings

    cfg = compose_cfg(["+analysis=sensitivity"])
    with pytest.raises(ConfigError, match="analysis=sensitivity needs a noise profile"):
        sensitivity_settings(cfg)
    cfg = compose_cfg(
        ["+analysis=sensitivity", "noise=gauss_5pct", "analysis.levels=[0.1]", "analysis.chips=2"]
    )
    s = sensitivity_settings(cfg)
    assert s["profile"]["eval_levels"] == [0.1] and s["profile"]["chips"] == 2
    cfg = compose_cfg(["experiment=hpd_layer_sensitivity"])
    assert cfg.analysis.name == "sensitivity" and cfg.model.name == "mamba"


@pytest.mark.slow
def test_train_callback_then_eval_entry_point(tiny_cfg, tmp_path):
    from cimssm.pipeline import evaluate, train

    cfg = tiny_cfg(
        "mamba_tiny",
        "shakespeare_char",
        ["+analysis=sensitivity", "analysis.max_batches=1", "analysis.chips=2", "noise=gauss_5pct",
         "noise.evaluate=false", "noise.eval_levels=[0.1]", "callbacks=default", "callbacks.rich_progress_bar=null"],
    )  # fmt: skip
    train(cfg)
    run = tmp_path / "run"
    assert (run / "sensitivity.csv").is_file() and (run / "sensitivity.png").is_file()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            "eval",
            [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "noise=gauss_5pct", "+analysis=sensitivity",
             "analysis.levels=[0.1]", "analysis.chips=2", "analysis.max_batches=1", "analysis.components=false",
             "decomp=hpd", "decomp.target=lm_head", "limit_batches=1", "noise.evaluate=false"],
        )  # fmt: skip
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "eval")
    evaluate(ecfg)
    with open(tmp_path / "eval" / "sensitivity.csv") as f:
        units = [r["unit"] for r in csv.DictReader(f)]
    assert units == ["block0", "block1", "lm_head"]


# ------------------------------------------------------------------------------ HPD vs baseline
def _fake_job(path, decomp: dict, ppl: dict[float, float]):
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"decomp": decomp}), path / ".hydra" / "config.yaml")
    with open(path / "noise_eval_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["profile", "level", "t_inference", "chips", "ppl_mean", "ppl_std"])
        w.writeheader()
        for level, v in ppl.items():
            w.writerow(
                {
                    "profile": "gauss_5pct",
                    "level": level,
                    "t_inference": 0.0,
                    "chips": 3,
                    "ppl_mean": v,
                    "ppl_std": 0.1,
                }
            )


def test_hpd_compare_relative_ppl_reduction(tmp_path):
    none = {"method": "none", "target": "last_out_proj"}
    hpd = {
        "method": "hpd",
        "target": "lm_head",
        "rank": None,
        "analog_factor": "usigma",
        "noise_reference": "factor",
    }
    _fake_job(tmp_path / "0", none, {0.0: 5.0, 0.1: 10.0})
    _fake_job(tmp_path / "1", {**none, "target": "lm_head"}, {0.0: 5.0, 0.1: 10.0})  # duplicate baseline
    _fake_job(tmp_path / "2", hpd, {0.0: 5.0, 0.1: 8.0})
    _fake_job(tmp_path / "3", {**hpd, "rank": 8, "noise_reference": "original"}, {0.0: 6.0, 0.1: 12.0})
    table = write_comparison([tmp_path])
    by = {(r["variant"], r["level"]): r for r in table}
    assert len(table) == 6
    assert by[("hpd:lm_head", 0.1)]["relative_improvement"] == pytest.approx(0.2)
    assert by[("hpd:lm_head:r8:ref=W", 0.1)]["relative_improvement"] == pytest.approx(-0.2)
    assert by[("none", 0.1)]["relative_improvement"] == 0.0
    assert (tmp_path / "hpd_vs_baseline.csv").is_file() and (tmp_path / "hpd_vs_baseline.png").is_file()
    assert "+20.00 %" in markdown(table)
    assert variant_label({"method": "hpd", "target": "x", "analog_factor": "vt"}) == "hpd:x:vt"
    with pytest.raises(ValueError, match="no baseline"):
        compare([r for r in table if r["variant"] != "none"])
