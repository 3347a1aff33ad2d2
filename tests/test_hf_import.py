"""Loading HF-format Mamba checkpoints, checked against an independent plain-torch forward."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cimssm.models.hf_import import CheckpointFormatError, hf_config_to_kwargs, load_hf_mamba

CONFIG = {
    "architectures": ["MambaForCausalLM"],
    "model_type": "mamba",
    "vocab_size": 40,
    "hidden_size": 16,
    "state_size": 4,
    "num_hidden_layers": 2,
    "expand": 2,
    "conv_kernel": 3,
    "time_step_rank": "auto",
    "use_bias": False,
    "use_conv_bias": True,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "pad_vocab_size_multiple": 8,
    "hidden_act": "silu",
    "intermediate_size": 32,
}


def _hf_tensors(cfg, seed=0, with_lm_head=False):
    """Random tensors under the names and shapes of an HF MambaForCausalLM checkpoint."""
    g = torch.Generator().manual_seed(seed)
    d, n, k = cfg["hidden_size"], cfg["state_size"], cfg["conv_kernel"]
    e = cfg["expand"] * d
    r = math.ceil(d / 16) if cfg["time_step_rank"] == "auto" else cfg["time_step_rank"]

    def rand(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    t = {"backbone.embeddings.weight": rand(cfg["vocab_size"], d, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        t[p + "norm.weight"] = 1 + rand(d, std=0.1)
        t[p + "mixer.in_proj.weight"] = rand(2 * e, d)
        t[p + "mixer.conv1d.weight"] = rand(e, 1, k)
        t[p + "mixer.conv1d.bias"] = rand(e, std=0.1)
        t[p + "mixer.x_proj.weight"] = rand(r + 2 * n, e)
        t[p + "mixer.dt_proj.weight"] = rand(e, r)
        t[p + "mixer.dt_proj.bias"] = rand(e, std=0.5) - 3
        t[p + "mixer.A_log"] = torch.log(torch.arange(1.0, n + 1)).repeat(e, 1) + rand(e, n, std=0.1)
        t[p + "mixer.D"] = 1 + rand(e, std=0.1)
        t[p + "mixer.out_proj.weight"] = rand(d, e)
    t["backbone.norm_f.weight"] = 1 + rand(d, std=0.1)
    if with_lm_head:
        t["lm_head.weight"] = rand(cfg["vocab_size"], d)
    return t


def _reference_logits(t, cfg, tokens):
    """Mamba-1 forward written directly from the paper's equations and the raw tensors."""
    eps = cfg["layer_norm_epsilon"]
    n_state = cfg["state_size"]

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    h = t["backbone.embeddings.weight"][tokens]  # (B, L, D)
    batch, length, _ = h.shape
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}.mixer."
        u = rms(h, t[f"backbone.layers.{i}.norm.weight"])
        xz = u @ t[p + "in_proj.weight"].T
        e = xz.shape[-1] // 2
        x, z = xz[..., :e], xz[..., e:]
        w = t[p + "conv1d.weight"][:, 0, :]  # (E, K)
        k = w.shape[1]
        padded = torch.cat([x.new_zeros(batch, k - 1, e), x], dim=1)
        conv = t[p + "conv1d.bias"] + sum(padded[:, j : j + length] * w[:, j] for j in range(k))
        x = conv * torch.sigmoid(conv)
        dbc = x @ t[p + "x_proj.weight"].T
        r = dbc.shape[-1] - 2 * n_state
        dt, Bm, Cm = dbc[..., :r], dbc[..., r : r + n_state], dbc[..., r + n_state :]
        delta = F.softplus(dt @ t[p + "dt_proj.weight"].T + t[p + "dt_proj.bias"])
        A = -torch.exp(t[p + "A_log"])
        state = x.new_zeros(batch, e, n_state)
        ys = []
        for s in range(length):
            state = (
                torch.exp(delta[:, s, :, None] * A) * state
                + (delta[:, s] * x[:, s])[:, :, None] * Bm[:, s, None]
            )
            ys.append((state * Cm[:, s, None]).sum(-1) + t[p + "D"] * x[:, s])
        y = torch.stack(ys, 1) * (z * torch.sigmoid(z))
        h = h + y @ t[p + "out_proj.weight"].T
    h = rms(h, t["backbone.norm_f.weight"])
    head = t.get("lm_head.weight", t["backbone.embeddings.weight"])
    return h @ head.T


def _write(directory, cfg, tensors, fmt="safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_matches_reference_forward(tmp_path, fmt):
    tensors = _hf_tensors(CONFIG)
    model = load_hf_mamba(_write(tmp_path / "ckpt", CONFIG, tensors, fmt))
    assert model.tied and model.n_out == 40 and not model.training
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    torch.testing.assert_close(logits, _reference_logits(tensors, CONFIG, tokens), atol=1e-4, rtol=1e-4)


def test_untied_head_and_explicit_rank(tmp_path):
    cfg = {**CONFIG, "tie_word_embeddings": False, "time_step_rank": 3, "vocab_size": 37}
    tensors = _hf_tensors(cfg, with_lm_head=True)
    model = load_hf_mamba(_write(tmp_path / "ckpt", cfg, tensors))
    assert not model.tied and model.backbone.layers[0].mixer.dt_rank == 3
    assert model.backbone.embeddings.weight.shape == (37, 16)  # HF vocab_size is the table size
    tokens = torch.randint(0, 37, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens), _reference_logits(tensors, cfg, tokens), atol=1e-4, rtol=1e-4
        )


def test_missing_tensor_is_named(tmp_path):
    tensors = _hf_tensors(CONFIG)
    del tensors["backbone.layers.1.mixer.dt_proj.bias"]
    with pytest.raises(CheckpointFormatError, match=r"backbone\.layers\.1\.mixer\.dt_proj\.bias"):
        load_hf_mamba(_write(tmp_path / "ckpt", CONFIG, tensors))


def test_wrong_shape_is_named(tmp_path):
    tensors = _hf_tensors(CONFIG)
    tensors["backbone.layers.0.mixer.A_log"] = torch.zeros(32, 5)
    with pytest.raises(
        CheckpointFormatError, match=r"backbone\.layers\.0\.mixer\.A_log.*\[32, 5\].*\[32, 4\]"
    ):
        load_hf_mamba(_write(tmp_path / "ckpt", CONFIG, tensors))


def test_unexpected_tensors_are_listed(tmp_path):
    tensors = _hf_tensors(CONFIG)
    tensors["backbone.layers.2.mixer.D"] = torch.ones(32)
    with pytest.raises(CheckpointFormatError, match=r"unexpected.*backbone\.layers\.2\.mixer\.D"):
        load_hf_mamba(_write(tmp_path / "ckpt", CONFIG, tensors))


def test_directory_and_config_errors(tmp_path):
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_hf_mamba(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="config.json"):
        load_hf_mamba(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        load_hf_mamba(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointFormatError, match="no weights"):
        load_hf_mamba(tmp_path / "empty")
    with pytest.raises(CheckpointFormatError, match="hidden_size"):
        hf_config_to_kwargs({"vocab_size": 10, "num_hidden_layers": 1})
    assert issubclass(CheckpointFormatError, ValueError)


def test_config_translation():
    kwargs = hf_config_to_kwargs(CONFIG)
    assert kwargs["d_model"] == 16 and kwargs["n_layer"] == 2 and kwargs["d_state"] == 4
    assert kwargs["d_conv"] == 3 and kwargs["dt_rank"] == 1 and kwargs["vocab_size"] == 40
    assert kwargs["tie_embeddings"] and kwargs["pad_vocab_size_multiple"] == 1
