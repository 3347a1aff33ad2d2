"""Mamba-1 (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

Module and parameter names follow the Hugging Face ``MambaForCausalLM`` layout
(``backbone.layers.{i}.mixer.in_proj.weight``, ...), so HF checkpoints load by name
(:mod:`cimssm.models.hf_import`). One mixer, for an input ``u (B, L, D)``:

    [x, z] = in_proj(u)                                   x, z: (B, L, E),  E = expand D
    x      = SiLU(causal depthwise conv1d(x))              (B, L, E)
    [δ, B, C] = x_proj(x)                                 δ: (B, L, R), B, C: (B, L, N)
    Δ      = softplus(dt_proj(δ))                          (B, L, E)
    A      = -exp(A_log)                                   (E, N)
    h_t    = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t              (B, E, N)
    y_t    = C_t h_t + D x_t                               (B, E)
    out    = out_proj(y ⊙ SiLU(z))                         (B, L, D)

A block is pre-norm residual, ``u + mixer(RMSNorm(u))``; the backbone ends with ``norm_f``.

Taps (``nn.Identity`` modules that hardware models replace): ``A_tap`` on ``A`` every forward
and step, ``state_tap`` on ``h_t`` at every step. While ``state_tap`` is an ``nn.Identity`` the
fast scan (:func:`cimssm.models.scan.selective_scan`) runs; otherwise a plain autograd loop
applies the tap to every state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimssm.models.common import POOLS as _POOLS
from cimssm.models.common import TASKS as _TASKS
from cimssm.models.common import has_hooks as _has_hooks
from cimssm.models.scan import (
    DEFAULT_CHUNK_SIZE,
    selective_scan,
    selective_scan_with_state_fn,
)

_LOG2_E = 1.0 / math.log(2.0)
MambaCache = tuple[Tensor, Tensor]  # (conv_state (B, E, d_conv), ssm_state (B, E, N))



def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _call_tap(tap: nn.Module, t: Tensor) -> Tensor:
    """``tap(t)``, skipping the module call for a hook-free ``nn.Identity`` (the same result)."""
    if type(tap) is nn.Identity and not _has_hooks(tap):
        return t
    return tap(t)


def _set_optim(param: nn.Parameter, lr: float | None) -> None:
    """Optimizer hint read by the LightningModule: no weight decay, own lr when given."""
    param._optim = {"weight_decay": 0.0} if lr is None else {"lr": lr, "weight_decay": 0.0}


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (Zhang & Sennrich 2019).

    Computed as ``x * rsqrt(eps + ||x||^2 / d) * weight``: five tensor ops, fewer than
    ``F.rms_norm`` dispatches on CPU, which matters in batch-1 generation.
    """

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        _check_positive(d=d)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.register_buffer("_eps", torch.tensor(float(eps)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # ||x||             (..., 1)
        inv_rms = torch.addcmul(self._eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()  # 1 / rms
        return (x * inv_rms).mul_(self.weight) if not torch.is_grad_enabled() else x * inv_rms * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MambaMixer(nn.Module):
    """The selective SSM mixer of one Mamba layer (equations in the module docstring).

    ``forward(u (B, L, D)) -> (B, L, D)``; ``forward(u_t (B, D), cache)`` is :meth:`step`, so that
    input hooks on the mixer (hardware activations) also act in recurrent mode.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: int = 0,
        lr_ssm: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        _check_positive(d_model=d_model, d_state=d_state, d_conv=d_conv)
        if expand <= 0:
            raise ValueError(f"expand must be positive, got {expand!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        _check_positive(dt_rank=dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = dt_rank
        self.layer_idx = layer_idx
        self.chunk_size = chunk_size

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        for linear in (self.in_proj, self.x_proj, self.out_proj):
            nn.init.normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

        # Δ projection: weight ~ U(±R^-1/2); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        dt_std = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        log_dt = torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)  # (E,)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

        # S4D-real initialisation A_{e,n} = -(n + 1), stored as log(-A) so that A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (E, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        for p in (self.A_log, self.D, self.dt_proj.bias):
            _set_optim(p, lr_ssm)

        self.A_tap = nn.Identity()
        self.state_tap = nn.Identity()
        self._A_memo: tuple | None = None  # (A_log, version, A, A log2(e)), see _A_for_step

    # -------------------------------------------------------------------------------- training
    def forward(self, hidden_states: Tensor, cache: MambaCache | None = None, residual: Tensor | None = None):
        if cache is not None:
            return self.step(hidden_states, cache, residual)
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states)  # (B, L, 2E)
        x, z = xz.chunk(2, dim=-1)  # (B, L, E) each
        x = F.conv1d(
            x.transpose(1, 2),
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.d_conv - 1,
            groups=self.d_inner,
        )[..., :length]  # causal depthwise conv                                (B, E, L)
        x = F.silu(x.transpose(1, 2).contiguous())  # one copy serves x_proj and the scan  (B, L, E)

        x_dbl = self.x_proj(x)  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # Δ = softplus(W δ + b)                (B, L, E)
        A = self.A_tap(-torch.exp(self.A_log))  # (E, N)

        if isinstance(self.state_tap, nn.Identity):
            y = selective_scan(x, delta, A, B, C, self.D, chunk_size=self.chunk_size)  # (B, L, E)
        else:
            y = selective_scan_with_state_fn(x, delta, A, B, C, self.D, self.state_tap)
        y = y * F.silu(z)  # gate                                                     (B, L, E)
        return self.out_proj(y)  # (B, L, D)

    # ------------------------------------------------------------------------------- recurrent
    def allocate_inference_cache(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> MambaCache:
        """Zero state: ``conv_state (B, E, d_conv)`` (last inputs of the conv), ``ssm_state (B, E, N)``."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, dtype=dtype, device=device)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, dtype=dtype, device=device)
        return conv_state, ssm_state

    def _A_for_step(self) -> tuple[Tensor, Tensor | None]:
        """``A = -exp(A_log)`` (E, N) and ``A log2(e)``, memoised while gradients are off.

        Generation calls this once per token and layer. The memo holds the ``A_log`` tensor
        itself and its version counter: an in-place update, a reload or a parametrization
        (a new tensor on every access) all miss it.
        """
        A_log = self.A_log
        if torch.is_grad_enabled():
            return -torch.exp(A_log), None
        memo = self._A_memo
        if memo is None or memo[0] is not A_log or memo[1] != A_log._version:
            A = -torch.exp(A_log)
            memo = self._A_memo = (A_log, A_log._version, A, A * _LOG2_E)
        return memo[2], memo[3]

    def step(
        self, hidden_states: Tensor, cache: MambaCache, residual: Tensor | None = None
    ) -> tuple[Tensor, MambaCache]:
        """One time step: ``u_t (B, D) -> y_t (+ residual) (B, D)``; the cache is updated in place.

        Written for batch-1 generation, where the cost is the number of tensor ops, not flops
        (hence the residual add fused into the output projection).
        """
        conv_state, ssm_state = cache
        batch = hidden_states.shape[0]
        xz = F.linear(hidden_states, self.in_proj.weight, self.in_proj.bias)  # (B, 2E)
        x, z = xz.chunk(2, dim=-1)  # (B, E) each

        # Causal conv: window of the last d_conv inputs, dotted with each channel's filter.
        window = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1)], dim=-1)  # (B, E, K)
        conv_state.copy_(window)
        weight, bias = self.conv1d.weight, self.conv1d.bias  # (E, 1, K), (E,)
        if bias is None:
            x = torch.bmm(window.transpose(0, 1), weight.transpose(1, 2))  # (E, B, 1)
        else:
            x = torch.baddbmm(
                bias.view(-1, 1, 1), window.transpose(0, 1), weight.transpose(1, 2)
            )  # (E, B, 1)
        x = F.silu(x.view(-1, batch).t(), inplace=True)  # (B, E)

        x_dbl = F.linear(x, self.x_proj.weight)  # (B, R + 2N)
        dt, B, C = x_dbl.split_with_sizes([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias))  # Δ      (B, E)
        A_clean, A_log2e = self._A_for_step()
        A = _call_tap(self.A_tap, A_clean)  # (E, N)
        if A is A_clean and A_log2e is not None:
            dA = torch.exp2(delta.unsqueeze(-1) * A_log2e)  # exp(Δ A)                  (B, E, N)
        else:
            dA = torch.exp(delta.unsqueeze(-1) * A)  # (B, E, N)

        ssm_state.mul_(dA).addcmul_((delta * x).unsqueeze(-1), B.unsqueeze(1))  # h_t  (B, E, N)
        tapped = _call_tap(self.state_tap, ssm_state)
        if tapped is not ssm_state:
            ssm_state.copy_(tapped)
        y = torch.bmm(ssm_state, C.unsqueeze(-1)).view_as(x)  # C h_t               (B, E)
        y = y.addcmul_(x, self.D).mul_(F.silu(z))  # (C h_t + D x) SiLU(z)          (B, E)
        if residual is None:
            return F.linear(y, self.out_proj.weight, self.out_proj.bias), cache  # (B, D)
        if self.out_proj.bias is not None:
            residual = residual + self.out_proj.bias
        return torch.addmm(residual, y, self.out_proj.weight.t()), cache  # residual + out_proj(y)  (B, D)


class MambaBlock(nn.Module):
    """Pre-norm residual block ``u + mixer(norm(u))``."""

    def __init__(self, norm: nn.Module, mixer: MambaMixer):
        super().__init__()
        self.norm = norm
        self.mixer = mixer

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states + self.mixer(self.norm(hidden_states))

    def step(self, hidden_states: Tensor, cache: MambaCache) -> tuple[Tensor, MambaCache]:
        normed = self.norm(hidden_states)
        if _has_hooks(self.mixer):  # hardware input transforms are pre-hooks: go through __call__
            return self.mixer(normed, cache, hidden_states)
        return self.mixer.step(normed, cache, hidden_states)  # u + mixer(norm(u))


class MambaBackbone(nn.Module):
    """Input layer (``embeddings`` for tokens or ``encoder`` for floats), ``layers``, ``norm_f``."""

    def __init__(
        self,
        d_model: int,
        n_layer: int,
        vocab_size: int | None = None,
        d_input: int | None = None,
        norm_eps: float = 1e-5,
        **mixer_kwargs,
    ):
        super().__init__()
        _check_positive(d_model=d_model, n_layer=n_layer)
        if (vocab_size is None) == (d_input is None):
            raise ValueError(
                f"give exactly one of vocab_size (token input) and d_input (float input), "
                f"got vocab_size={vocab_size!r}, d_input={d_input!r}"
            )
        if vocab_size is not None:
            _check_positive(vocab_size=vocab_size)
            self.embeddings = nn.Embedding(vocab_size, d_model)
            nn.init.normal_(self.embeddings.weight, std=0.02)
        else:
            _check_positive(d_input=d_input)
            self.encoder = nn.Linear(d_input, d_model)
            nn.init.normal_(self.encoder.weight, std=0.02)
            nn.init.zeros_(self.encoder.bias)
        self.layers = nn.ModuleList(
            MambaBlock(RMSNorm(d_model, norm_eps), MambaMixer(d_model, layer_idx=i, **mixer_kwargs))
            for i in range(n_layer)
        )
        self.norm_f = RMSNorm(d_model, norm_eps)

    def embed(self, x: Tensor) -> Tensor:
        """``(B, L)`` tokens or ``(B, L, d_input)`` floats (or one step of either) -> ``(..., D)``."""
        if hasattr(self, "embeddings"):
            return self.embeddings(x)
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        hidden_states = self.embed(x)  # (B, L, D)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm_f(hidden_states)

    def step(self, x_t: Tensor, state: list[MambaCache]) -> tuple[Tensor, list[MambaCache]]:
        hidden_states = self.embed(x_t)  # (B, D)
        for layer, cache in zip(self.layers, state):
            hidden_states, _ = layer.step(hidden_states, cache)
        return self.norm_f(hidden_states), state


class MambaModel(nn.Module):
    """Mamba-1 language model or sequence classifier in the HF ``MambaForCausalLM`` layout.

    - ``task="lm"``: ``forward(x) -> (B, L, n_out)``, ``n_out = n_classes or vocab_size``
      (``vocab_size`` rounded up to a multiple of ``pad_vocab_size_multiple``). ``lm_head``
      shares its weight with ``backbone.embeddings`` when ``tie_embeddings`` and the sizes match.
    - ``task="classification"``: ``forward(x) -> (B, n_classes)``, features after ``norm_f``
      pooled over time (``pool="mean"`` or ``"last"``) then ``classifier``.
    - ``allocate_state(B)`` and ``step(x_t, state)``: recurrent mode with the same per-position
      outputs as ``forward`` (lm); for classification ``step`` returns the classifier applied
      to the current features (``pool="last"`` of the prefix).
    """

    hardware_parts = {
        "embeddings": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.embeddings.weight", "backbone.encoder.weight"],
        },
        "lm_head": {
            "kind": "param",
            "category": "weight",
            "targets": ["lm_head.weight", "classifier.weight"],
        },
        "in_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.in_proj.weight"],
        },
        "conv1d": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.conv1d.weight"],
        },
        "x_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.x_proj.weight"],
        },
        "dt_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.dt_proj.weight"],
        },
        "out_proj": {
            "kind": "param",
            "category": "weight",
            "targets": ["backbone.layers.*.mixer.out_proj.weight"],
        },
        "A": {"kind": "tap", "category": "ssm", "targets": ["backbone.layers.*.mixer.A_tap"]},
        "D": {"kind": "param", "category": "ssm", "targets": ["backbone.layers.*.mixer.D"]},
        "scan_state": {"kind": "tap", "category": "ssm", "targets": ["backbone.layers.*.mixer.state_tap"]},
        "activations": {
            "kind": "input",
            "category": "act",
            "targets": ["backbone.layers.*.mixer", "lm_head", "classifier"],
        },
    }

    def __init__(
        self,
        d_model: int = 128,
        n_layer: int = 4,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        pad_vocab_size_multiple: int = 1,
        lr_ssm: float | None = None,
        task: str = "lm",
        vocab_size: int | None = None,
        d_input: int | None = None,
        n_classes: int | None = None,
        pool: str = "mean",
        *,
        conv_bias: bool = True,
        bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        scan_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        _check_positive(d_model=d_model, n_layer=n_layer, d_state=d_state, d_conv=d_conv)
        _check_positive(pad_vocab_size_multiple=pad_vocab_size_multiple, scan_chunk_size=scan_chunk_size)
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        if vocab_size is None and d_input is None:
            raise ValueError("give vocab_size (token input) or d_input (float input); both are None")
        if n_classes is not None:
            _check_positive(n_classes=n_classes)
        if task == "classification" and n_classes is None:
            raise ValueError("n_classes is required for task='classification'")
        if vocab_size is not None:
            _check_positive(vocab_size=vocab_size)
            vocab_size += -vocab_size % pad_vocab_size_multiple  # round up
        if task == "lm" and n_classes is None and vocab_size is None:
            raise ValueError("n_classes is required for task='lm' with float input (d_input)")

        self.d_model = d_model
        self.n_layer = n_layer
        self.task = task
        self.pool = pool
        self.vocab_size = vocab_size
        self.d_input = d_input
        self.n_classes = n_classes
        self.n_out = n_classes or vocab_size

        self.backbone = MambaBackbone(
            d_model,
            n_layer,
            vocab_size=vocab_size,
            d_input=d_input,
            norm_eps=norm_eps,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init_floor=dt_init_floor,
            conv_bias=conv_bias,
            bias=bias,
            lr_ssm=lr_ssm,
            chunk_size=scan_chunk_size,
        )
        # Residual branches add up over depth: scale their output projection (GPT-2, Mamba).
        with torch.no_grad():
            for layer in self.backbone.layers:
                layer.mixer.out_proj.weight.div_(math.sqrt(n_layer))

        if task == "lm":
            self.lm_head = nn.Linear(d_model, self.n_out, bias=False)
            if tie_embeddings and vocab_size is not None and self.n_out == vocab_size:
                self.lm_head.weight = self.backbone.embeddings.weight
            else:
                nn.init.normal_(self.lm_head.weight, std=0.02)
        else:
            self.classifier = nn.Linear(d_model, n_classes)
            nn.init.normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)

    @property
    def tied(self) -> bool:
        """Whether ``lm_head.weight`` is ``backbone.embeddings.weight``."""
        return (
            hasattr(self, "lm_head")
            and hasattr(self.backbone, "embeddings")
            and (self.lm_head.weight is self.backbone.embeddings.weight)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_hidden(x)

    def forward_hidden(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run the model from block ``start`` up to block ``stop`` (docs/architecture.md).

        ``start = 0``: x is the model input and the input layer runs first; ``start = i > 0``: x is
        the hidden state (B, L, D) entering block i. ``stop = None``: ``norm_f`` and the head
        (``lm_head``, or pooling and ``classifier``) run last and forward's output is returned;
        ``stop = j``: the hidden state entering block j (B, L, D). So
        ``forward_hidden(forward_hidden(x, 0, j), j) == forward(x)``.
        """
        hidden_states = self.backbone.embed(x) if start == 0 else x  # (B, L, D)
        for layer in self.backbone.layers[start:stop]:
            hidden_states = layer(hidden_states)
        if stop is not None:
            return hidden_states
        features = self.backbone.norm_f(hidden_states)  # (B, L, D)
        if self.task == "lm":
            return self.lm_head(features)  # (B, L, n_out)
        pooled = features.mean(dim=1) if self.pool == "mean" else features[:, -1]  # (B, D)
        return self.classifier(pooled)  # (B, n_classes)

    def layer_of(self, name: str) -> int:
        """Where a parameter or module name sits: -1 the input layer, i block i, n_layer the output
        head (``backbone.norm_f``, ``lm_head``, ``classifier``); -1 too for a name it does not know."""
        parts = name.split(".")
        if parts[:2] == ["backbone", "layers"] and len(parts) > 2 and parts[2].isdigit():
            return int(parts[2])
        if parts[0] in ("lm_head", "classifier") or parts[:2] == ["backbone", "norm_f"]:
            return self.n_layer
        return -1

    def allocate_state(self, batch_size: int) -> list[MambaCache]:
        return [layer.mixer.allocate_inference_cache(batch_size) for layer in self.backbone.layers]

    def step(self, x_t: Tensor, state: list[MambaCache]) -> tuple[Tensor, list[MambaCache]]:
        """``x_t (B,)`` tokens or ``(B, d_input)`` -> ``(B, n_out)``; ``state`` is updated in place."""
        features, state = self.backbone.step(x_t, state)  # (B, D)
        head = self.lm_head if self.task == "lm" else self.classifier
        return head(features), state
