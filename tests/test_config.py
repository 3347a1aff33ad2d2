"""Every config group option composes, validates and instantiates; bad values are refused."""

from __future__ import annotations

import hydra
import pytest
from conftest import CONF, compose_cfg, run_cli
from omegaconf import OmegaConf

from cimssm.config.schema import SCHEMAS, register_configs
from cimssm.config.validate import ConfigError, validate_config

GROUPS = ["model", "data", "quant", "noise", "decomp", "prune", "trainer", "logger", "callbacks"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_validates(group, option):
    extra = ["model.path=/some/dir"] if option == "mamba_hf" else []
    cfg = compose_cfg([f"{group}={option}", *extra])
    validate_config(cfg)
    assert OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("option", options("model"))
def test_models_instantiate(option):
    if option == "mamba_hf":
        pytest.skip("needs a checkpoint directory; covered by test_hf_import")
    cfg = compose_cfg([f"model={option}"])
    from cimssm.pipeline import _without_name

    net = hydra.utils.instantiate(_without_name(cfg.model), task="lm", vocab_size=11, d_input=None, n_classes=None)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("option", ["selective_copy", "shakespeare_char"])
def test_datamodules_instantiate(option):
    dm = hydra.utils.instantiate(compose_cfg([f"data={option}"]).data)
    assert dm.model_kwargs()["task"] == "lm"


def test_logger_list_composes():
    cfg = compose_cfg(["logger=[csv,wandb]"])
    assert set(cfg.logger) == {"csv", "wandb"}


def test_schemas_register_in_config_store():
    register_configs()
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    assert "s4d.yaml" in repo["schema"]["model"]
    assert set(SCHEMAS) <= set(repo["schema"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.d_model=-3", "model.d_model"),
        ("model.d_state=0", "model.d_state"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("data.seq_len=0", "data.seq_len"),
        ("quant.weight_bits=0", "quant.weight_bits"),
        ("quant.act_bits=33", "quant.act_bits"),
        ("quant.parts.A_real.bits=17", "quant.parts.A_real.bits"),
        ("noise.level=-0.1", "noise.level"),
        ("noise.t_inference=[-1]", "noise.t_inference"),
        ("model.dropout=abc", "model.dropout"),
        ("quant.mode=fast", "quant.mode"),
    ],
)
def test_bad_values_name_the_key(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_cli_bad_value_exits_2_with_one_line():
    proc = run_cli(["train.py", "model.d_model=-3"])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("config error: model.d_model=-3")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [(["model=nope"], "nope"), (["model.nokey=1"], "nokey")])
def test_cli_composition_errors_exit_2(args, needle):
    proc = run_cli(["train.py", *args])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
