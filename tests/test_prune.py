"""Structured pruning: the metric stays within the tolerance, states go, pruned models reload."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from cimssm.config.validate import ConfigError, validate_config
from cimssm.hardware.quantize import apply_quantization
from cimssm.models.mamba import MambaModel
from cimssm.models.s4d import S4DModel
from cimssm.prune import (
    PruneError,
    apply_prune_record,
    prune_state_dims,
    schedule_sizes,
    state_scores,
    state_sizes,
)

QAT8 = {"weight_bits": 8, "act_bits": 8, "ssm_bits": 8}


def make_net(kind: str, quant: dict | None = None, seed: int = 0, d_state: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = S4DModel if kind == "s4d" else MambaModel
    net = cls(d_model=8, n_layer=2, d_state=d_state, task="classification", d_input=1, n_classes=2)
    if quant:
        apply_quantization(net, quant)
    return net


def toy_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Is the first half of the sequence brighter than the second? (needs memory over 32 steps)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 32, 1, generator=g)
    shift = (torch.rand(n, generator=g) > 0.5).float() * 2 - 1  # ±1
    x[:, :16] += 0.3 * shift[:, None, None]
    return x, (shift > 0).long()


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean())


def test_pruning_keeps_metric_within_tolerance_and_reduces_states():
    net = make_net("s4d")
    x, y = toy_task(128, seed=1)
    xt, yt = toy_task(256, seed=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(25):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = state_sizes(net)
    result = prune_state_dims(
        net, lambda m: accuracy(m, xt, yt), tolerance=0.01, step_fraction=0.25, seq_len=32
    )
    after = state_sizes(net)
    assert result.baseline > 0.9  # the toy task was learnt
    assert sum(after.values()) < sum(before.values())
    assert after == result.record["d_state"] and result.kept_fraction < 1.0
    assert accuracy(net, xt, yt) >= result.baseline - 0.01  # the model ends within the tolerance
    assert accuracy(net, xt, yt) == result.accepted["acc"]


def test_schedule_accepts_a_prefix_and_ends_at_the_last_accepted_step():
    net = make_net("s4d")

    def evaluate(m: torch.nn.Module) -> float:  # fine down to half the states, broken below
        return 1.0 if sum(state_sizes(m).values()) >= 16 else 0.0

    result = prune_state_dims(net, evaluate, tolerance=0.01, step_fraction=0.25)
    assert [r["kept_fraction"] for r in result.curve] == [1.0, 0.75, 0.5, 0.25, 0.125]  # down to one mode
    assert [r["accepted"] for r in result.curve] == [True, True, True, False, False]
    assert state_sizes(net) == {"layers.0.layer": 8, "layers.1.layer": 8}
    short = prune_state_dims(make_net("s4d"), evaluate, tolerance=0.01, step_fraction=0.25, full_curve=False)
    assert len(short.curve) == 4 and not short.curve[-1]["accepted"]  # stops at the first failure
    # A curve that later comes back within the tolerance is still cut at the first failure.
    flaky = prune_state_dims(make_net("s4d"), lambda m: 0.0 if sum(state_sizes(m).values()) == 24 else 1.0,
                             step_fraction=0.25)  # fmt: skip
    assert [r["accepted"] for r in flaky.curve] == [True, False, False, False, False]
    assert flaky.kept_fraction == 1.0


def test_schedule_sizes_round_up_and_keep_one_state():
    assert schedule_sizes({"a": 16}, 1, 0.125) == {"a": 14}
    assert schedule_sizes({"a": 4}, 1, 0.125) == {"a": 4}  # 3.5 -> 4
    assert schedule_sizes({"a": 16}, 8, 0.125) == {"a": 1}


def test_energy_ranking_keeps_the_kernel_better_than_the_reverse():
    net = make_net("s4d", d_state=32)
    layer = net.layers[0].layer
    L = 64
    reference = layer.kernel(L).detach()
    scores = state_scores(layer, L)
    errors = {}
    for name, descending in (("best", True), ("worst", False)):
        trial = make_net("s4d", d_state=32).layers[0].layer
        idx = torch.argsort(scores, dim=1, descending=descending)[:, :8].sort(1).values
        from cimssm.prune import select_states

        select_states(trial, idx)
        errors[name] = float((trial.kernel(L).detach() - reference).norm() / reference.norm())
    assert errors["best"] < errors["worst"]


@pytest.mark.parametrize(
    "quant", [None, QAT8, {"weight_bits": 8, "granularity": "channel", "scale": "running"}]
)
@pytest.mark.parametrize("kind", ["s4d", "mamba"])
def test_pruned_model_saves_and_reloads_to_identical_outputs(tmp_path, kind, quant):
    net = make_net(kind, quant)
    x = torch.rand(3, 12, 1)
    net(x)  # running quantizer ranges see data before pruning
    result = prune_state_dims(net, lambda m: 1.0, step_fraction=0.5, seq_len=12)
    assert sum(state_sizes(net).values()) < sum(result.record["original_d_state"].values())
    net.eval()
    expected = net(x)
    torch.save({"state_dict": net.state_dict(), "prune_record": result.record}, tmp_path / "pruned.pt")

    stored = torch.load(tmp_path / "pruned.pt", weights_only=True)
    rebuilt = make_net(kind, quant, seed=123)  # other initial values: everything comes from the file
    apply_prune_record(rebuilt, stored["prune_record"])
    rebuilt.load_state_dict(stored["state_dict"])
    rebuilt.eval()
    assert torch.equal(rebuilt(x), expected)


def test_bad_prune_records_are_refused_with_the_layer_and_value():
    net = make_net("s4d")
    with pytest.raises(PruneError, match="layers.9.layer"):
        apply_prune_record(net, {"method": "state_dim", "d_state": {"layers.9.layer": 4}})
    with pytest.raises(PruneError, match=r"d_state of layers.0.layer = 3 .*even number in 2..16"):
        apply_prune_record(net, {"method": "state_dim", "d_state": {"layers.0.layer": 3}})
    with pytest.raises(PruneError, match="expected"):
        apply_prune_record(net, {"d_state": 4})
    with pytest.raises(PruneError, match="prune.metric='top5'"):
        prune_state_dims(net, lambda m: 1.0, metric="top5")


def test_bad_prune_config_is_a_config_error():
    from conftest import compose_cfg

    with pytest.raises(ConfigError, match="prune.metric='f1' is not allowed"):
        validate_config(compose_cfg(["prune=state_dim", "prune.metric=f1"]))
    with pytest.raises(ConfigError, match="prune.step_fraction=0 is not allowed"):
        validate_config(compose_cfg(["prune=state_dim", "prune.step_fraction=0"]))


@pytest.mark.parametrize(
    "model,quant", [("s4d_tiny", ["quant=w8a8"]), ("mamba_tiny", ["quant=w8a8", "quant.mode=ptq"])]
)
def test_prune_callback_writes_curve_cost_checkpoint_and_the_checkpoint_reloads(
    tiny_cfg, tmp_path, model, quant
):
    from cimssm.evaluation import evaluate_model
    from cimssm.hardware.setup import calibrate_ptq
    from cimssm.pipeline import rebuild_from_checkpoint, train

    extra = ["callbacks=default", "callbacks.rich_progress_bar=null", "prune=state_dim", "prune.step_fraction=0.25",
             "prune.tolerance=1.0", "prune.finetune_steps=2", *quant]  # fmt: skip
    metrics = train(tiny_cfg(model, "selective_copy", extra))
    run = tmp_path / "run"
    curve = (run / "prune_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,kept_fraction,kept_states,d_state,acc,drop")
    assert (run / "prune_curve.png").stat().st_size > 0
    cost = json.loads((run / "cost.json").read_text())
    assert cost["pruned"]["ratio_vs_unpruned"]["ace"] < 1.0 and "total" in cost  # the unpruned report stays
    final = json.loads((run / "metrics_final.json").read_text())
    assert final["prune/kept_fraction"] < 1.0 and final["prune/ace_ratio_vs_unpruned"] < 1.0

    cfg, dm, lit = rebuild_from_checkpoint(str(run / "checkpoints" / "pruned.ckpt"))
    assert state_sizes(lit.net) == cost["pruned"]["record"]["d_state"]
    if cfg.quant.mode == "ptq":  # eval.py calibrates PTQ again on the rebuilt model
        dm.setup("validate")
        calibrate_ptq(lit.net, cfg.quant, dm.val_dataloader())
        return
    dm.setup("test")
    again = evaluate_model(lit.net, dm.test_dataloader(), lit.task, max_batches=2)
    assert again["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert again["loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)

    # A record that does not fit the model is untrusted input: one line naming file, layer, value.
    ckpt = torch.load(run / "checkpoints" / "pruned.ckpt", weights_only=True)
    ckpt["prune_record"]["d_state"]["layers.0.layer"] = 99
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match=r"bad.ckpt: prune record: d_state of layers.0.layer = 99"):
        rebuild_from_checkpoint(str(tmp_path / "bad.ckpt"))


def test_sweep_prune_summary_of_a_synthetic_sweep(tmp_path):
    from cimssm.callbacks.prune import SWEEP_CURVES_CSV, write_prune_summary

    rows = {
        "0": ("null", [(0, 1.0, 0.80, True), (1, 0.5, 0.75, False)]),
        "1": ("8", [(0, 1.0, 0.79, True), (1, 0.5, 0.785, True)]),
    }
    for job, (bits, curve) in rows.items():
        d = tmp_path / job
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"quant.weight_bits={bits}"]))
        (d / "metrics_final.json").write_text(json.dumps({"test/acc": curve[-1][2]}))
        (d / "DONE").write_text("finished\n")
        lines = ["step,kept_fraction,kept_states,d_state,acc,drop,within_tolerance,accepted"]
        lines += [
            f"{s},{k},{int(32 * k)},{int(32 * k)},{a},{curve[0][2] - a},{ok},{ok}" for s, k, a, ok in curve
        ]
        (d / "prune_curve.csv").write_text("\n".join(lines) + "\n")
    paths = write_prune_summary(tmp_path)
    md = paths["markdown"].read_text()
    assert "| 0 | null | 0.8 | 0.8 | 1 |" in md and "| 1 | 8 | 0.79 | 0.785 | 0.5 |" in md
    assert (tmp_path / SWEEP_CURVES_CSV).read_text().count("\n") == 5
    assert paths["plot"].stat().st_size > 0 and paths["plot"].with_suffix(".svg").stat().st_size > 0
