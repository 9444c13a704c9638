"""A small Llama-style decoder: RMSNorm, RoPE, SwiGLU, causal SDPA, tied or untied embeddings.

Every projection is a plain `nn.Linear` (no bias) so that `lptrain.convert` can swap it; the
norms and embeddings stay in high precision. Module names follow Llama (`attn.wq`, `mlp.w1`,
`lm_head`), so `precision.skip` patterns read the same as in other frameworks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lptrain.config.schema import ModelConfig
from lptrain.errors import ConfigError
from lptrain.models.saved import MODES, keep_fp8


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    tie_embeddings: bool
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    checkpointing: bool = False


# Widths are multiples of 32 (128 from "tiny" up) so every block-scaled format (MX: 32,
# NVFP4: 16, fp8-block: 128) tiles the GEMM's reduction axis without padding.
PRESETS: dict[str, dict] = {
    "nano": dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=128, tie_embeddings=True),
    "tiny": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=384, tie_embeddings=True),
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768, tie_embeddings=True),
    "125m": dict(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, tie_embeddings=True
    ),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, tie_embeddings=False),
    "7b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, tie_embeddings=False
    ),
}


def model_args(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> ModelArgs:
    if cfg.preset not in PRESETS:
        raise ConfigError(
            "model.preset", f"unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)})"
        )
    values = dict(PRESETS[cfg.preset])
    for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings"):
        if getattr(cfg, f) is not None:
            values[f] = getattr(cfg, f)
    if values["dim"] % values["n_heads"]:
        raise ConfigError(
            "model.n_heads", f"{values['n_heads']} does not divide dim {values['dim']}"
        )
    if values["n_heads"] % values["n_kv_heads"]:
        raise ConfigError("model.n_kv_heads", "must divide n_heads")
    if (values["dim"] // values["n_heads"]) % 2:
        raise ConfigError("model.n_heads", "head dim must be even for RoPE")
    # Pad the vocabulary to a multiple of 64 so the lm_head GEMM tiles evenly.
    padded = (vocab_size + 63) // 64 * 64
    return ModelArgs(
        vocab_size=padded,
        max_seq_len=max_seq_len,
        dropout=cfg.dropout,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std,
        checkpointing=cfg.checkpointing,
        **values,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 even for bf16 activations: the mean square underflows in bf16.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.type_as(x) * weight


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SavesActivations(nn.Module):
    """An op whose saved inputs may be kept in FP8 (`saved`: none | fp8, models/saved.py); set
    by `set_saved_activations`. A setting, not state: nothing enters the state_dict."""

    saved = "none"

    def _run(self, fn, activations: tuple[torch.Tensor, ...], *others: torch.Tensor):
        if self.saved == "fp8":
            return keep_fp8(fn, activations, *others)
        return fn(*activations, *others)

    def extra_repr(self) -> str:
        return "" if self.saved == "none" else f"saved_activations={self.saved}"


class RMSNorm(_SavesActivations):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x, w: rms_norm(x, w, self.eps), (x,), self.weight)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)  # (T, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate interleaved pairs (x0, x1) by the position angle.
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(_SavesActivations):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads
        self.head_dim = a.dim // a.n_heads
        self.dropout = a.dropout
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads

        def attend(q, k, v):
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=drop, is_causal=True, enable_gqa=gqa
            )

        y = self._run(attend, (q, k, v))  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(_SavesActivations):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(a.dim, a.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(a.ffn_dim, a.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self._run(swiglu, (self.w1(x), self.w3(x))))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(a.dim, a.norm_eps)
        self.attn = Attention(a)
        self.mlp_norm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = SwiGLU(a)
        self.drop = nn.Dropout(a.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Decoder(nn.Module):
    """forward(tokens (B, T+1)) -> mean next-token cross-entropy; logits(idx) for inference."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.set_rope()
        # Under deepspeed.zero.Init, `apply` gathers each module's parameters around the call
        # (DeepSpeed's override_module_apply); the loop below gathers its own.
        self.apply(self._init)
        for name, p in self.named_parameters():
            # GPT-2 style: shrink residual-branch outputs by depth so the stream stays O(1).
            if name.endswith(("wo.weight", "w2.weight")):
                with _gathered(p):
                    nn.init.normal_(p, std=a.init_std / math.sqrt(2 * a.n_layers))

    def set_rope(self) -> None:
        """(Re)compute the RoPE tables. Not persistent: derived from the config, and bf16
        casting must not touch them. `build_model` calls this again outside a construction
        context: deepspeed.zero.Init casts every floating tensor made inside it (float64
        angles included) to the engine dtype."""
        a = self.args
        old = getattr(self, "rope_cos", None)
        cos, sin = rope_tables(a.dim // a.n_heads, a.max_seq_len, a.rope_theta)
        device = old.device if old is not None else None
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.args.init_std)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T].float(), self.rope_sin[:T].float()
        x = self.embed(idx)  # (B, T, C)
        recompute = self.args.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # keep only the block inputs; recompute the rest in backward
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.logits(tokens[:, :-1])
        # Cross-entropy in fp32: bf16 log-softmax over 50k+ classes loses the small terms.
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def _gathered(p: nn.Parameter):
    """The full parameter for an in-place edit: a ZeRO-3 partitioned parameter (built under
    deepspeed.zero.Init) is gathered, edited on every rank, rank 0's values kept."""
    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # optional dependency (the train extra)

    return deepspeed.zero.GatheredParameters([p], modifier_rank=0)


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int, construction=None) -> Decoder:
    """construction: a context the modules are created in (deepspeed.zero.Init under ZeRO-3,
    distributed/engine.py `model_construction`), or None."""
    with construction if construction is not None else contextlib.nullcontext():
        model = Decoder(model_args(cfg, vocab_size, max_seq_len))
    if construction is not None:
        model.set_rope()
    return model


def set_saved_activations(model: nn.Module, mode: str) -> int:
    """Keep the saved inputs of the model's RMSNorm, SwiGLU and attention ops as `mode` says
    (models/saved.py); returns how many ops that covers. A model with none of them (a Hugging
    Face model keeps its own modules) is refused: the setting would change nothing. Attention
    dropout is refused with fp8: backward recomputes SDPA, which would draw a new mask."""
    key = "precision.saved_activations"
    if mode not in MODES:
        raise ConfigError(key, f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    ops = [m for m in model.modules() if isinstance(m, _SavesActivations)]
    if not ops:
        name = type(model).__name__
        raise ConfigError(key, f"{name} has no lptrain RMSNorm, SwiGLU or attention to keep "
                          "(only lptrain's decoder presets have them)")  # fmt: skip
    if mode == "fp8" and any(isinstance(m, Attention) and m.dropout for m in ops):
        raise ConfigError("model.dropout", f"must be 0 with {key} fp8: attention is "
                          "recomputed in backward and would draw a new dropout mask")  # fmt: skip
    for m in ops:
        m.saved = mode
    return len(ops)


def count_params(model: nn.Module) -> int:
    # ds_numel: under ZeRO-3 a partitioned parameter's numel() is 0 (DeepSpeed #4064).
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    return total
