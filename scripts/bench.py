#!/usr/bin/env python
"""Speed benchmarks of cimssm against plain references, measured in the same run.

    .venv/bin/python scripts/bench.py                 # every row (`make bench`), ~15 min on 2 cores
    .venv/bin/python scripts/bench.py --quick         # smaller sizes, fewer repeats (~3 min)
    .venv/bin/python scripts/bench.py --rows 1,3 --threads 2

Each row is a ratio with both absolute figures beside it: the median of ``--repeats`` timed
calls after ``--warmup`` untimed ones, the two sides interleaved (a b a b ...) so that load from
other processes hits both alike. Torch intra-op threads are fixed (``--threads``, default 1) and
printed. At one thread the clock is the process CPU time (equal to wall time on an idle machine,
and robust to other jobs on shared cores); with more threads it is wall time (``--wall`` forces
wall time). Every comparison first checks that both sides compute the same numbers.

Rows (docs/benchmarks.md has the table from this machine and what limits each):

1. Mamba training step (forward + backward) vs mambapy 1.2.0, same weights.
2. Mamba generation (recurrent step with cache) vs mambapy's step, batch 1 and 8.
3. S4D layer forward + backward vs a plain reference after state-spaces/s4 ``s4d.py``.
4. Monte-Carlo noise evaluation, K chips: all-layer and suffix-only noise vs the naive loop,
   bf16 vs fp32 evaluation.
5. QAT training step (w8a8, qs4d_8bit) vs the fp32 step, default model sizes.
6. bf16 autocast vs fp32 and torch.compile vs eager, training step.
7. Scaling: time and peak memory per training step for L = 256 ... 8192 at batch 1 (PNG plot
   under outputs/bench/).
8. PCM Monte-Carlo evaluation vs IBM aihwkit 1.2.0 (skipped with a note when aihwkit is absent).

mambapy is installed by ``make bench`` (``pip install --no-deps mambapy``; only ``mambapy.mamba``
is imported, ``mambapy.lm`` needs CUDA-only packages). Rows that need it say so when it is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT_DIR = ROOT / "outputs" / "bench"


# ----------------------------------------------------------------------------------- measuring
@dataclass
class Settings:
    threads: int = 1
    quick: bool = False
    repeats: int = 5
    warmup: int = 1
    wall: bool = False
    out_dir: Path = OUT_DIR

    def clock(self) -> Callable[[], float]:
        return time.perf_counter if (self.wall or self.threads > 1) else time.process_time

    @property
    def clock_name(self) -> str:
        return "wall time" if (self.wall or self.threads > 1) else "process CPU time"


@dataclass
class Row:
    """One line of the table: ``ratio`` compares ``ours`` with ``ref`` as ``kind`` says."""

    row: str
    name: str
    ours: str
    ref: str
    ratio: float | None
    target: str = ""
    ok: bool | None = None
    note: str = ""
    data: dict = field(default_factory=dict)


def measure(
    fns: dict[str, Callable[[], object]], s: Settings, repeats: int | None = None, warmup: int | None = None
) -> dict[str, float]:
    """Median seconds per call of each function; calls interleaved after ``s.warmup`` rounds."""
    clock = s.clock()
    repeats = repeats or s.repeats
    for _ in range(s.warmup if warmup is None else warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_rate(value: float, unit: str = "tok/s") -> str:
    return f"{value:,.0f} {unit}"


def speed_row(row, name, t_ours, t_ref, target, *, unit_count=None, unit="tok/s", note="", data=None) -> Row:
    """A speed-up row: ratio = reference time / our time (>= target is good)."""
    ratio = t_ref / t_ours
    if unit_count is not None:
        ours, ref = fmt_rate(unit_count / t_ours, unit), fmt_rate(unit_count / t_ref, unit)
        ours, ref = f"{ours} ({fmt_time(t_ours)})", f"{ref} ({fmt_time(t_ref)})"
    else:
        ours, ref = fmt_time(t_ours), fmt_time(t_ref)
    ok = None if target is None else ratio >= target
    tgt = "" if target is None else f">= {target:g}x"
    d = {"t_ours_s": t_ours, "t_ref_s": t_ref, **(data or {})}
    return Row(row, name, ours, ref, ratio, tgt, ok, note, d)


def overhead_row(row, name, t_ours, t_base, limit, note="", data=None) -> Row:
    """An overhead row: ratio = our time / baseline time (<= limit is good)."""
    ratio = t_ours / t_base
    ok = None if limit is None else ratio <= limit
    tgt = "" if limit is None else f"<= {limit:g}x"
    d = {"t_ours_s": t_ours, "t_ref_s": t_base, **(data or {})}
    return Row(row, name, fmt_time(t_ours), fmt_time(t_base), ratio, tgt, ok, note, d)


def skip_row(row, name, note) -> Row:
    return Row(row, name, "-", "-", None, "", None, note)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def check_close(what: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> float:
    d = max_diff(a, b)
    if not d <= atol:
        raise AssertionError(
            f"{what}: outputs differ by {d:.3g} > {atol:g}; not timing a different computation"
        )
    return d


def import_mambapy():
    try:
        import mambapy.mamba as mambapy_mamba
    except ImportError:
        return None
    return mambapy_mamba


MAMBAPY_MISSING = "mambapy not installed: `.venv/bin/pip install --no-deps mambapy==1.2.0` (make bench does)"


# ----------------------------------------------------------------------------------- row 1, 2
def _mamba_pair(d_model: int, n_layer: int, d_state: int, seed: int = 0):
    """Our Mamba residual stack and mambapy's, with the same weights (HF / mambapy names agree)."""
    from cimssm.models.mamba import MambaBackbone

    mp = import_mambapy()
    torch.manual_seed(seed)
    ours = MambaBackbone(d_model, n_layer, d_input=d_model, d_state=d_state)
    # Move the SSM parameters off their init values so that agreement is not a coincidence.
    with torch.no_grad():
        for name, p in ours.layers.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    ref = mp.Mamba(mp.MambaConfig(d_model=d_model, n_layers=n_layer, d_state=d_state))
    ref.layers.load_state_dict(ours.layers.state_dict(), strict=True)
    return ours.layers, ref


def _run_layers(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def row_mamba_train(s: Settings) -> list[Row]:
    if import_mambapy() is None:
        return [skip_row("1", "Mamba train step vs mambapy", MAMBAPY_MISSING)]
    D, n_layer, N = 256, 4, 16
    batch, L = (2, 128) if s.quick else (8, 512)
    ours, ref = _mamba_pair(D, n_layer, N)
    torch.manual_seed(1)
    x = torch.randn(batch, L, D)
    g = torch.randn(batch, L, D)
    diff = check_close("row 1 forward", _run_layers(ours, x), ref(x), 1e-4)

    def step(model, run):
        def f():
            for p in model.parameters():
                p.grad = None
            (run(x) * g).sum().backward()

        return f

    t = measure({"ours": step(ours, lambda v: _run_layers(ours, v)), "ref": step(ref, ref)}, s, repeats=3)
    return [
        speed_row(
            "1",
            f"Mamba train step (fwd+bwd), D {D}, N {N}, {n_layer} layers, B {batch}, L {L}",
            t["ours"],
            t["ref"],
            4.0,
            unit_count=batch * L,
            note=f"vs mambapy pscan; outputs agree to {diff:.1e}",
        )
    ]


def row_mamba_generate(s: Settings) -> list[Row]:
    if import_mambapy() is None:
        return [skip_row("2", "Mamba generation vs mambapy", MAMBAPY_MISSING)]
    rows = []
    dims = (128, 256)
    for D in dims:
        ours, ref = _mamba_pair(D, 4, 16)
        for batch in (1, 8):
            n_tok = 16 if s.quick else 64
            torch.manual_seed(2)
            xs = torch.randn(n_tok, batch, D)

            def run_ours(xs=xs, ours=ours, batch=batch):
                caches = [layer.mixer.allocate_inference_cache(batch) for layer in ours]
                outs = []
                for x_t in xs:
                    for layer, cache in zip(ours, caches):
                        x_t, _ = layer.step(x_t, cache)
                    outs.append(x_t)
                return outs

            def run_ref(xs=xs, ref=ref, batch=batch):
                d_inner, d_conv = ref.config.d_inner, ref.config.d_conv
                caches = [(None, torch.zeros(batch, d_inner, d_conv - 1)) for _ in ref.layers]
                outs = []
                for x_t in xs:
                    x_t, caches = ref.step(x_t, caches)
                    outs.append(x_t)
                return outs

            with torch.inference_mode():
                a, b = run_ours(), run_ref()
                diff = max(check_close("row 2 step", u, v, 1e-4) for u, v in zip(a, b))
                t = measure({"ours": run_ours, "ref": run_ref}, s)
            target = 2.0 if D == 256 else None
            rows.append(
                speed_row(
                    "2",
                    f"Mamba generation, D {D}, N 16, 4 layers, batch {batch}",
                    t["ours"],
                    t["ref"],
                    target,
                    unit_count=batch * n_tok,
                    note=f"vs mambapy step; {n_tok} steps, outputs agree to {diff:.1e}",
                )
            )
    return rows


# ----------------------------------------------------------------------------------- row 3
class ReferenceS4D(nn.Module):
    """S4D written plainly, after the structure of state-spaces/s4 ``models/s4/s4d.py``.

    The kernel materialises the (H, N/2, L) complex Vandermonde matrix exp(Δ·A·l); the
    convolution is rfft / irfft of length 2L with autograd through the FFTs; then D·u, GELU and
    the Conv1d(H, 2H, 1) + GLU output layer, all on (B, H, L).
    """

    def __init__(self, layer):
        super().__init__()
        k = layer.kernel
        self.log_dt = nn.Parameter(k.log_dt.detach().clone())  # (H)
        self.C = nn.Parameter(k.C.detach().clone())  # (H, N/2, 2)
        self.log_A_real = nn.Parameter(k.log_A_real.detach().clone())  # (H, N/2)
        self.A_imag = nn.Parameter(k.A_imag.detach().clone())  # (H, N/2)
        self.D = nn.Parameter(layer.D.detach().clone())  # (H)
        H = self.D.shape[0]
        self.output_linear = nn.Sequential(nn.Conv1d(H, 2 * H, kernel_size=1), nn.GLU(dim=-2))
        self.output_linear.load_state_dict(layer.mixing.state_dict())

    def kernel(self, L: int) -> torch.Tensor:
        dt = torch.exp(self.log_dt)  # (H)
        C = torch.view_as_complex(self.C)  # (H, N/2)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag  # (H, N/2)
        dtA = A * dt.unsqueeze(-1)  # (H, N/2)
        powers = dtA.unsqueeze(-1) * torch.arange(L, device=A.device)  # (H, N/2, L)
        C = C * (torch.exp(dtA) - 1.0) / A  # (H, N/2)
        return 2 * torch.einsum("hn,hnl->hl", C, torch.exp(powers)).real  # (H, L)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, H, L) -> (B, H, L)."""
        L = u.shape[-1]
        k = self.kernel(L)  # (H, L)
        k_f = torch.fft.rfft(k, n=2 * L)  # (H, L+1)
        u_f = torch.fft.rfft(u, n=2 * L)  # (B, H, L+1)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]  # (B, H, L)
        y = y + u * self.D.unsqueeze(-1)  # (B, H, L)
        y = F.gelu(y)
        return self.output_linear(y)  # (B, H, L)


def row_s4d_layer(s: Settings) -> list[Row]:
    from cimssm.models.s4d import S4DLayer

    H, N = 256, 64
    batch, L = (4, 512) if s.quick else (16, 1024)
    torch.manual_seed(3)
    layer = S4DLayer(H, N)
    ref = ReferenceS4D(layer)
    x = torch.randn(batch, L, H, requires_grad=True)  # our layout (B, L, H)
    x_ref = x.detach().transpose(1, 2).contiguous().requires_grad_()  # the reference's (B, H, L)
    g = torch.randn(batch, L, H)
    g_ref = g.transpose(1, 2).contiguous()
    diff = check_close("row 3 forward", layer(x), ref(x_ref).transpose(1, 2), 1e-4)

    def step(model, inp, grad):
        def f():
            for p in model.parameters():
                p.grad = None
            inp.grad = None
            model(inp).backward(grad)

        return f

    # gradient agreement, relative to each gradient's size
    step(layer, x, g)()
    step(ref, x_ref, g_ref)()
    gdiff = max_diff(x.grad, x_ref.grad.transpose(1, 2)) / max(1.0, x_ref.grad.abs().max().item())
    for name in ("log_dt", "C", "log_A_real", "A_imag"):
        a, b = getattr(layer.kernel, name).grad, getattr(ref, name).grad
        gdiff = max(gdiff, max_diff(a, b) / max(1.0, b.abs().max().item()))
    if gdiff > 1e-4:
        raise AssertionError(f"row 3 gradients differ by {gdiff:.3g} (relative)")
    t = measure({"ours": step(layer, x, g), "ref": step(ref, x_ref, g_ref)}, s)
    return [
        speed_row(
            "3",
            f"S4D layer fwd+bwd, H {H}, N {N}, L {L}, B {batch}",
            t["ours"],
            t["ref"],
            4.0,
            unit_count=batch * L,
            note=f"vs s4d.py-style reference; outputs agree to {diff:.1e}, gradients to {gdiff:.1e} (rel.)",
        )
    ]


# ----------------------------------------------------------------------------------- shared
def compose(overrides: list[str]):
    """The real run config (conf/train.yaml) with overrides, as train.py would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def default_net(model: str, seed: int = 0, **kwargs) -> nn.Module:
    """The default-size model of conf/model/<model>.yaml as a character LM (vocab 76)."""
    import hydra
    from omegaconf import OmegaConf

    cfg = compose([f"model={model}"])
    node = OmegaConf.create({k: v for k, v in cfg.model.items() if k != "name"})
    torch.manual_seed(seed)
    return hydra.utils.instantiate(node, task="lm", vocab_size=76, **kwargs)


def lm_batch(batch: int, L: int, vocab: int = 76, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, L), generator=g), torch.randint(0, vocab, (batch, L), generator=g)


def train_step_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype=None, optimizer=True):
    """One training step as the LightningModule runs it: forward, cross-entropy, backward, AdamW."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4) if optimizer else None

    def step():
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = net(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def shakespeare_batches(seq_len: int, batch: int, n_train: int, n_test: int):
    """(train, test) lists of (x, y) batches of the offline Shakespeare data (conf/data)."""
    from cimssm.pipeline import build_datamodule

    cfg = compose(["data=shakespeare_char", f"data.seq_len={seq_len}", f"data.batch_size={batch}"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    train = [b for _, b in zip(range(n_train), dm.train_dataloader())]
    dm.setup("test")
    test = [b for _, b in zip(range(n_test), dm.test_dataloader())]
    return train, test


# ----------------------------------------------------------------------------------- row 4
def row_noise_eval(s: Settings) -> list[Row]:
    from cimssm.evaluation import ModelEvaluator, evaluate_model
    from cimssm.hardware.analog import apply_noise
    from cimssm.hardware.montecarlo import clean_prefix_stop, monte_carlo_eval, summarize_rows

    K = 16
    seq_len, batch, n_test, n_train = (128, 8, 2, 30) if s.quick else (256, 16, 2, 60)
    train, test = shakespeare_batches(seq_len, batch, n_train, n_test)
    net = default_net("mamba")
    # A briefly trained model, so that the metrics mean something under noise.
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for x, y in train:
        F.cross_entropy(net(x).reshape(-1, net.n_out), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clean = evaluate_model(net, test, "lm")
    profile = {"name": "gauss_5pct", "kind": "gaussian", "level": 0.05, "chips": K, "t_inference": [0.0]}
    last = net.n_layer - 1
    setups = [
        ("all-layer", None, 1.0),
        ("suffix-only", {"include": [f"backbone.layers.{last}.*", "lm_head.*"]}, 3.0),
    ]

    def naive(analog):
        """The plain loop: every chip runs the whole model on every batch, weights recomputed."""

        def run():
            out = []
            for chip in range(K):
                with apply_noise(net, profile, analog, 0, 0.05, chip, 0.0):
                    out.append(evaluate_model(net, test, "lm"))
            return out

        return run

    def ours(analog, dtype=None):
        def run():
            ev = ModelEvaluator(lambda: test, "lm", dtype=dtype)
            return monte_carlo_eval(net, ev, profile, analog, 0, progress=False)

        return run

    rows = []
    for name, analog, target in setups:
        a, b = ours(analog)(), naive(analog)()
        diff = max(abs(r["ppl"] - m["ppl"]) / m["ppl"] for r, m in zip(a, b))
        if diff > 1e-5:
            raise AssertionError(f"row 4 {name}: Monte-Carlo rows differ from the naive loop by {diff:.3g}")
        # the agreement check above was the warm-up; each side runs K x batches forwards per call
        t = measure({"ours": ours(analog), "ref": naive(analog)}, s, repeats=1 if s.quick else 3, warmup=0)
        stop = clean_prefix_stop(net, profile, analog)
        tokens = K * sum(y.numel() for _, y in test)
        rows.append(
            speed_row(
                "4",
                f"Monte-Carlo eval, {name} gauss 5 %, K {K}, Mamba D 96 x {net.n_layer}, "
                f"{n_test} x ({batch}, {seq_len}) tokens",
                t["ours"],
                t["ref"],
                target,
                unit_count=tokens,
                note=f"vs naive chip loop; clean prefix: {stop} block(s); same rows (rel. {diff:.0e}); "
                f"clean ppl {clean['ppl']:.2f}",
            )
        )
    # bf16 evaluation vs fp32, all-layer noise: metrics must stay within the Monte-Carlo std.
    # One timed run each (the fp32 side was warmed up above); their rows give the metrics.
    clock, t = s.clock(), {}
    t0 = clock()
    fp32_rows = ours(None)()
    t["ref"] = clock() - t0
    t0 = clock()
    bf16_rows = ours(None, torch.bfloat16)()
    t["ours"] = clock() - t0
    s32, s16 = summarize_rows(fp32_rows)[0], summarize_rows(bf16_rows)[0]
    gap, std = abs(s16["ppl_mean"] - s32["ppl_mean"]), s32["ppl_std"]
    rows.append(
        speed_row(
            "4",
            f"Monte-Carlo eval in bf16 autocast vs fp32, all-layer gauss 5 %, K {K}",
            t["ours"],
            t["ref"],
            None,
            unit_count=K * sum(y.numel() for _, y in test),
            note=f"ppl {s16['ppl_mean']:.3f} vs {s32['ppl_mean']:.3f}: gap {gap:.3g} "
            f"{'<=' if gap <= std else '>'} MC std {std:.3g}",
            data={"gap": gap, "mc_std": std},
        )
    )
    return rows


# ----------------------------------------------------------------------------------- row 5
def row_qat(s: Settings) -> list[Row]:
    from cimssm.hardware.setup import attach_quantizers

    batch, L = (8, 128) if s.quick else (32, 256)
    x, y = lm_batch(batch, L)
    rows = []
    for model in ("s4d", "mamba"):
        base = default_net(model)
        base_step = train_step_fn(base, x, y)
        for quant in ("w8a8", "qs4d_8bit"):
            q = default_net(model)
            attached = attach_quantizers(q, compose([f"quant={quant}"]).quant)
            t = measure({"ours": train_step_fn(q, x, y), "ref": base_step}, s, repeats=max(s.repeats, 11))
            rows.append(
                overhead_row(
                    "5",
                    f"QAT {quant} train step vs fp32, {model} default size, B {batch}, L {L}",
                    t["ours"],
                    t["ref"],
                    1.15,
                    note=f"{len(attached)} quantized tensors/inputs; fwd + bwd + AdamW",
                )
            )
    return rows


# ----------------------------------------------------------------------------------- row 6
def row_precision_compile(s: Settings) -> list[Row]:
    batch, L = (8, 128) if s.quick else (32, 256)
    x, y = lm_batch(batch, L)
    rows = []
    for model in ("s4d", "mamba"):
        net = default_net(model)
        fp32 = train_step_fn(net, x, y)
        bf16 = train_step_fn(net, x, y, autocast_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16 = F.cross_entropy(net(x).float().reshape(-1, 76), y.reshape(-1)).item()
        loss32 = F.cross_entropy(net(x).reshape(-1, 76), y.reshape(-1)).item()
        t = measure({"ours": bf16, "ref": fp32}, s)
        rows.append(
            speed_row(
                "6",
                f"bf16 autocast vs fp32 train step, {model} default size, B {batch}, L {L}",
                t["ours"],
                t["ref"],
                None,
                unit_count=batch * L,
                note=f"loss {loss16:.4f} vs {loss32:.4f}; CPU: {cpu_bf16_note()}",
            )
        )
        if s.quick:
            rows.append(
                skip_row(
                    "6",
                    f"torch.compile vs eager, {model}",
                    "skipped in --quick: compiling takes ~20 s per model here",
                )
            )
            continue
        compiled = torch.compile(default_net(model))
        eager = default_net(model)
        t0 = time.perf_counter()
        train_step_fn(compiled, x, y)()
        compile_s = time.perf_counter() - t0
        t = measure({"ours": train_step_fn(compiled, x, y), "ref": train_step_fn(eager, x, y)}, s)
        rows.append(
            speed_row(
                "6",
                f"torch.compile vs eager train step, {model} default size, B {batch}, L {L}",
                t["ours"],
                t["ref"],
                None,
                unit_count=batch * L,
                note=f"first call (compiling) {compile_s:.0f} s wall",
            )
        )
    return rows


def cpu_bf16_note() -> str:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        pass
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "has AVX-512/AMX bf16"
    return "no AVX-512 bf16 (bf16 matmuls are emulated)"


# ----------------------------------------------------------------------------------- row 7
SCALING_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


def _rss_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scaling_point(model: str, L: int, threads: int, repeats: int) -> dict:
    """One training step of the default-size model at batch 1, length L, in this (fresh) process.

    Peak memory is the high-water mark of the resident set during the first step minus the
    resident set just before it (model, optimizer state and inputs already allocated).
    """
    torch.set_num_threads(threads)
    net = default_net(model)
    x, y = lm_batch(1, L)
    step = train_step_fn(net, x, y, optimizer=False)
    gc.collect()
    base = _rss_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    except OSError:
        pass
    t0 = time.process_time() if threads == 1 else time.perf_counter()
    step()
    first = (time.process_time() if threads == 1 else time.perf_counter()) - t0
    peak = _rss_mib("VmHWM") - base
    times = [first]
    clock = time.process_time if threads == 1 else time.perf_counter
    for _ in range(repeats - 1):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return {"model": model, "L": L, "time_s": statistics.median(times), "peak_mib": peak, "base_mib": base}


def row_scaling(s: Settings) -> list[Row]:
    lengths = SCALING_LENGTHS[:4] if s.quick else SCALING_LENGTHS
    cap = 15.0 if s.quick else 60.0  # seconds per step beyond which longer L are skipped
    repeats = 2 if s.quick else 3
    points: dict[str, list[dict]] = {}
    rows = []
    for model in ("s4d", "mamba"):
        points[model] = []
        for L in lengths:
            cmd = [sys.executable, __file__, "--scaling-point", f"{model}:{L}", "--threads", str(s.threads)]
            cmd += ["--repeats", str(repeats)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap * (repeats + 2) + 60)
            except subprocess.TimeoutExpired:
                points[model].append({"model": model, "L": L, "skipped": "timeout"})
                break
            if out.returncode != 0:
                raise RuntimeError(f"scaling point {model} L={L} failed:\n{out.stderr[-2000:]}")
            p = json.loads(out.stdout.strip().splitlines()[-1])
            points[model].append(p)
            print(f"  {model} L={L}: {fmt_time(p['time_s'])}, peak +{p['peak_mib']:.0f} MiB", flush=True)
            if p["time_s"] > cap:
                points[model].append({"model": model, "L": "longer", "skipped": f"step > {cap:g} s"})
                break
        done = [p for p in points[model] if "skipped" not in p]
        first, last = done[0], done[-1]
        prev = done[-2] if len(done) > 1 else first
        # log-log slope of peak memory over the last doubling of L: 1 = linear in L
        slope = (
            math.log(last["peak_mib"] / prev["peak_mib"]) / math.log(last["L"] / prev["L"])
            if last is not prev and prev["peak_mib"] > 0
            else float("nan")
        )
        per_token = [p["peak_mib"] * 1024 / p["L"] for p in done]
        skipped = [p for p in points[model] if "skipped" in p]
        rows.append(
            Row(
                "7",
                f"scaling {model} default size, batch 1, L {first['L']}..{last['L']}",
                f"{fmt_time(first['time_s'])} .. {fmt_time(last['time_s'])} per step",
                f"peak +{first['peak_mib']:.0f} .. +{last['peak_mib']:.0f} MiB",
                slope,
                "<= 1.2 (linear)" if model == "mamba" else "",
                (slope <= 1.2) if model == "mamba" else None,
                f"ratio = memory exponent d log(mem) / d log(L) over L {prev['L']}->{last['L']}; "
                f"time x{last['time_s'] / first['time_s']:.1f} for L x{last['L'] // first['L']}; "
                f"{min(per_token):.0f}..{max(per_token):.0f} KiB/token"
                + (f"; {skipped[0]['skipped']} beyond" if skipped else ""),
                {"points": points[model]},
            )
        )
    png = plot_scaling(points, s.out_dir)
    rows[-1].note += f"; plot {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}"
    return rows


def plot_scaling(points: dict[str, list[dict]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120)
    for model, ps in points.items():
        ps = [p for p in ps if "skipped" not in p]
        Ls = [p["L"] for p in ps]
        axes[0].plot(Ls, [p["time_s"] for p in ps], marker="o", label=model)
        axes[1].plot(Ls, [p["peak_mib"] for p in ps], marker="o", label=model)
    for ax, label in zip(axes, ("time per training step (s)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (batch 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("cimssm scaling: default-size S4D and Mamba, one training step", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scaling.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- row 8
def row_aihwkit(s: Settings) -> list[Row]:
    import importlib.util

    if importlib.util.find_spec("aihwkit") is None:
        return [
            skip_row(
                "8",
                "PCM Monte-Carlo eval vs IBM aihwkit 1.2.0",
                "skipped: aihwkit is not installed (optional; it builds from source in ~3 min, in a "
                "separate venv as in shared/ENV_NOTES.md, never in .venv)",
            )
        ]
    return [
        skip_row(
            "8",
            "PCM Monte-Carlo eval vs IBM aihwkit 1.2.0",
            "skipped: aihwkit is importable but this comparison is not written yet (docs/benchmarks.md)",
        )
    ]


# ----------------------------------------------------------------------------------- main
ROWS: dict[str, Callable[[Settings], list[Row]]] = {
    "1": row_mamba_train,
    "2": row_mamba_generate,
    "3": row_s4d_layer,
    "4": row_noise_eval,
    "5": row_qat,
    "6": row_precision_compile,
    "7": row_scaling,
    "8": row_aihwkit,
}


def print_table(rows: list[Row], s: Settings) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"cimssm bench: torch {torch.__version__}, {s.threads} thread(s), {s.clock_name}, "
        f"median of {s.repeats} after {s.warmup} warm-up{' (quick)' if s.quick else ''}"
    )
    table = Table(title=title, show_lines=False)
    for col in ("#", "benchmark", "ours", "reference", "ratio", "target", "ok", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        ok = "" if r.ok is None else ("[green]yes[/]" if r.ok else "[red]no[/]")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        table.add_row(r.row, r.name, r.ours, r.ref, ratio, r.target, ok, r.note)
    Console(width=220).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row numbers (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 5, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (default 1)")
    p.add_argument("--wall", action="store_true", help="wall-clock time even at one thread")
    p.add_argument(
        "--out", type=Path, default=OUT_DIR, help="results.json and the plot go to OUT/<date-time>/"
    )
    p.add_argument("--scaling-point", default=None, help=argparse.SUPPRESS)  # MODEL:L, internal (row 7)
    args = p.parse_args(argv)
    if args.scaling_point:  # one point of row 7, in a fresh process so that its peak memory is its own
        model, L = args.scaling_point.split(":")
        print(json.dumps(scaling_point(model, int(L), args.threads, args.repeats or 3)))
        return 0

    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    if args.threads < 1:
        p.error(f"--threads={args.threads}: must be >= 1")
    repeats = args.repeats or (3 if args.quick else 5)
    out_dir = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")  # a new folder: earlier results stay
    s = Settings(args.threads, args.quick, repeats, args.warmup, args.wall, out_dir)
    torch.set_num_threads(s.threads)
    print(
        f"torch {torch.__version__}, threads = {torch.get_num_threads()}, clock = {s.clock_name}", flush=True
    )

    rows: list[Row] = []
    failed = False
    s.out_dir.mkdir(parents=True, exist_ok=True)
    for key in wanted:
        t0 = time.perf_counter()
        print(f"row {key} ...", flush=True)
        try:
            new = ROWS[key](s)
        except Exception as err:  # one broken row must not cost the others' results
            failed = True
            new = [
                Row(key, f"row {key} failed", "-", "-", None, "", False, f"{type(err).__name__}: {err}"[:300])
            ]
        rows.extend(new)
        gc.collect()
        print(f"row {key} done in {time.perf_counter() - t0:.0f} s", flush=True)
        print_table(new, s)
        results = {
            "torch": torch.__version__,
            "threads": s.threads,
            "clock": s.clock_name,
            "quick": s.quick,
            "repeats": s.repeats,
            "rows": [asdict(r) for r in rows],
        }
        (s.out_dir / "results.json").write_text(json.dumps(results, indent=2))  # after every row
    print_table(rows, s)
    print(f"results: {s.out_dir / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
