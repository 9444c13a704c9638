"""`lptrain plan`: what one GPU holds for a recipe on a cluster of N nodes x G GPUs, before the
job is queued. Nothing is allocated: the model is built on the `meta` device.

Rows, per GPU (P parameters, L the largest module's own parameters, D = N x G data-parallel
ranks; ZeRO partitions over D):

- model states (parameters, gradients, optimizer state). For bf16/fp16 engines this is
  DeepSpeed's own accounting, split into the parts its estimators name
  (`deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`, `stage3.
  estimate_zero3_model_states_mem_needs`, without offload): ZeRO-1/2 `2P + 18P/D` (16-bit
  parameters whole; 16-bit and fp32 gradients, fp32 master weights and Adam's two moments
  partitioned), ZeRO-3 `4L + 18P/D` (the largest module gathered in 16 bits, parameters and
  gradients, plus the partitions). ZeRO-1 keeps the 16-bit gradients whole, stage 0 keeps
  everything whole. An fp32 engine has no 16-bit copies: 4 bytes of parameters, 4 of gradients
  and 8 of Adam moments per parameter, partitioned as the stage says. Compact moments
  (`optim.states`) replace the 8 by their stored size (fp8: 2 + 12/128, int8-block: 2 + 8/128,
  bf16: 4); `optim.master: bf16-sr` (ZeRO-0) holds 2 bytes of bf16 weights, 2 of bf16
  gradients and the moments, with no fp32 copy.
- quantizer state: the persistent buffers of lptrain's layers (delayed-scaling histories, sign
  vectors, counters); every rank holds all of them (ZeRO never partitions buffers).
- low-precision weight copies: with the Triton backend, a round-to-nearest, stateless weight
  quantizer's codes and scales are kept across the micro-batches of one step (nn/backends/
  triton.py), one copy per GEMM that reads the weight with its own spec. Delayed-scaling weights
  are requantized per call and held only while their GEMM runs.
- activations: the tensors autograd saves for backward in one micro-batch, measured by running
  the model's forward on `meta` tensors with `saved_tensors_hooks` (attention counted as
  FlashAttention saves it: q, k, v, output and the log-sum-exp rows, which is what SDPA runs on
  a GPU). With `model.checkpointing`, the block inputs of every layer plus one layer's
  recomputed activations. A recipe with `trust_mask` adds a 1-byte clip mask per quantized
  input and weight element.

Not counted, and left to the margin a user keeps: the CUDA context and kernels (~0.5-1 GiB),
DeepSpeed's communication buckets, the allocator's fragmentation, and the logits' transient
fp32 copies in the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.config import schema
from lptrain.config.inherit import tokenizer_spec
from lptrain.config.precision import is_high_precision, resolve_recipe
from lptrain.data import dataset
from lptrain.errors import ConfigError
from lptrain.models.decoder import Block, Decoder, build_model
from lptrain.numerics import get_format
from lptrain.optim import STATE_FORMATS

GiB = 2**30


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    world: int
    params: int  # P: distinct parameters
    largest_layer: int  # L: the largest module's own parameters (what ZeRO-3 gathers at once)
    model_states: list[Row]
    other: list[Row]

    @property
    def model_state_bytes(self) -> int:
        return sum(r.bytes for r in self.model_states)

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + sum(r.bytes for r in self.other)


# ---------------------------------------------------------------- counting


def count_like_deepspeed(model: nn.Module) -> tuple[int, int]:
    """(P, L) as DeepSpeed's `model_to_params` counts them: tied parameters once; L is the
    largest sum of one module's own (non-recursive) parameters. By identity, not data_ptr:
    on `meta` every data_ptr is 0."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return total, largest


def model_states(
    params: int,
    largest: int,
    stage: int,
    dtype: str,
    world: int,
    states: str = "fp32",
    master: str = "fp32",
) -> list[Row]:
    """Per-GPU bytes of parameters, gradients and optimizer state (see the module docstring).
    `states`, `master`: optim.states and optim.master; their bytes per parameter are the ones
    benchmarks/bench_optim_states.py measures from tensor sizes."""
    P, L, D = params, largest, world
    part = {k: (D if stage >= k else 1) for k in (1, 2, 3)}  # what each stage partitions
    moments = STATE_FORMATS[states].bytes_per_param()  # both moments, block scales included
    if master == "bf16-sr":  # ZeRO-0 only (config): bf16 weights and gradients, no fp32 copy
        return [
            Row("parameters (bf16, updated by stochastic rounding)", 2 * P),
            Row("gradients (bf16)", 2 * P),
            Row(f"optimizer: Adam moments ({states}), no master copy", int(moments * P)),
        ]
    # a 16-bit engine's optimizer: DeepSpeed's fp32 master weights, then the moments
    optimizer = "optimizer: fp32 master weights + Adam moments"
    optimizer += "" if states == "fp32" else f" ({states})"
    if dtype == "fp32":
        rows = [
            Row("parameters (fp32)", 4 * P // part[3]),
            Row("gradients (fp32)", 4 * P // part[2]),
            Row(f"optimizer: Adam moments ({states})", int(moments * P) // part[1]),
        ]
        if stage == 3:
            rows.append(Row("ZeRO-3 gathered largest layer (fp32 params + grads)", 8 * L))
        return rows
    if stage == 3:  # DeepSpeed: largest_layer_memory + int(18 * P / D)
        return [
            Row("ZeRO-3 gathered largest layer (16-bit params + grads)", 4 * L),
            Row("parameters (16-bit partition)", 2 * P // D),
            Row("gradients (fp32 partition)", 4 * P // D),
            Row(optimizer, int((4 + moments) * P) // D),
        ]
    # ZeRO-0/1/2: DeepSpeed's 2 + 18 bytes: 16-bit parameters whole; 16-bit gradients whole
    # below stage 2; fp32 gradients, master weights and moments partitioned from stage 1.
    if stage >= 2:
        grads = [Row("gradients (16-bit + fp32 partitions)", 6 * P // D)]
    else:
        grads = [Row("gradients (16-bit)", 2 * P), Row("gradients (fp32)", 4 * P // part[1])]
    return [
        Row("parameters (16-bit)", 2 * P),
        *grads,
        Row(optimizer, int((4 + moments) * P) // part[1]),
    ]


# ---------------------------------------------------------------- activations


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA during the meta forward: saves what FlashAttention saves (q, k, v, the
    output and fp32 log-sum-exp rows) instead of the math path's (B, H, T, T) matrices."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):  # never run: the plan only measures the forward
        raise RuntimeError("meta measurement only")


@contextlib.contextmanager
def _flash_like_sdpa():
    F = torch.nn.functional
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes(module: nn.Module, *inputs) -> int:
    """Bytes autograd keeps for backward after `module(*inputs)`: each saved tensor's storage
    once (views count their base), parameters excluded (they are model states)."""
    params = {id(p) for p in module.parameters()}
    saved: dict[int, int] = {}
    keep = []  # hold the tensors, so their ids stay unique while counting

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            keep.append(base)
            saved[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_like_sdpa():
        module(*inputs)
    return sum(saved.values())


def activation_bytes(args, micro: int, seq: int, dtype: torch.dtype) -> tuple[int, int]:
    """(per block, everything outside the blocks) for one micro-batch of `micro` x `seq`."""
    with torch.device("meta"):
        block = Block(args).to(dtype)
        outer = Decoder(dataclasses.replace(args, n_layers=0)).to(dtype)
    x = torch.empty(micro, seq, args.dim, device="meta", dtype=dtype, requires_grad=True)
    cos, sin = (torch.empty(seq, args.dim // args.n_heads // 2, device="meta") for _ in "cs")
    tokens = torch.empty(micro, seq + 1, device="meta", dtype=torch.long)
    return saved_bytes(block, x, cos, sin), saved_bytes(outer, tokens)


# ---------------------------------------------------------------- low-precision extras


def _spec_bytes(spec, rows: int, cols: int) -> int:
    """Codes plus scales of one quantized (rows, cols) weight copy."""
    fmt = spec.format if not isinstance(spec.format, str) else get_format(spec.format)
    n = rows * cols
    codes = (n * fmt.bits + 7) // 8
    scale = 4 if spec.scale_format == "fp32" else 1
    if spec.scaling == "row":
        return codes + 4 * rows
    if spec.scaling == "block":
        bs = spec.block_size
        per = bs[0] * bs[1] if isinstance(bs, tuple) else bs
        return codes + scale * -(-n // per) + 4
    return codes + 4  # tensor / delayed: one fp32 scale


def _cached(spec) -> bool:
    """The Triton backend keeps a weight's codes across micro-batches only for stateless,
    round-to-nearest quantizers (nn/backends/triton.py, `_cache_key`)."""
    return spec is not None and spec.scaling != "delayed" and spec.rounding == "nearest"


def weight_copy_bytes(model: nn.Module) -> int:

    total = 0
    for _, layer in lpnn.quantized_layers(model):
        out_f, in_f = layer.out_features, layer.in_features
        specs = [layer.recipe.output.b, layer.recipe.grad_input.b]
        kept = [s for s in dict.fromkeys(specs) if _cached(s)]  # equal specs share one copy
        total += sum(_spec_bytes(s, out_f, in_f) for s in kept)
    return total


def quantizer_state_bytes(model: nn.Module) -> int:

    return sum(
        b.numel() * b.element_size()
        for _, layer in lpnn.quantized_layers(model)
        for b in layer.state_dict(keep_vars=True).values()
        if not isinstance(b, nn.Parameter)
    )


def _mask_bytes(model: nn.Module, tokens: int) -> int:
    """trust_mask: one bool per quantized input element (per token) and weight element."""
    return sum(
        tokens * layer.in_features + layer.in_features * layer.out_features
        for _, layer in lpnn.quantized_layers(model)
        if layer.recipe.trust_mask
    )


# ---------------------------------------------------------------- the plan


def build_meta_model(cfg, vocab_size: int) -> nn.Module:
    """The recipe's model on `meta`, its linears converted as `lptrain train` converts them."""
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, cfg.data.block_size)
    if not is_high_precision(cfg.precision):
        p = cfg.precision
        lpnn.convert(
            model, resolve_recipe(p), skip=tuple(p.skip), min_features=p.min_features,
            backend="emulated", log_fn=lambda _: None,
        )  # fmt: skip
    return model


def _check_supported(cfg) -> None:

    if cfg.init.from_ is not None:
        raise ConfigError("init.from", "lptrain plan covers the model presets; drop init.from")
    if cfg.adapters.type is not None or cfg.qat.method is not None:
        key = "adapters.type" if cfg.adapters.type is not None else "qat.method"
        raise ConfigError(key, "lptrain plan covers pretraining recipes (no adapters or QAT)")


def plan(cfg, world: int, vocab_size: int) -> MemoryPlan:
    _check_supported(cfg)
    d = cfg.deepspeed
    model = build_meta_model(cfg, vocab_size)
    P, L = count_like_deepspeed(model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d.dtype]
    per_block, outer = activation_bytes(model.args, d.micro_batch, cfg.data.block_size, dtype)
    n = model.args.n_layers
    if model.args.checkpointing:  # block inputs kept, one block recomputed at a time
        block_input = d.micro_batch * cfg.data.block_size * model.args.dim * dtype.itemsize
        acts, how = n * block_input + per_block + outer, "checkpointed: block inputs + 1 block"
    else:
        acts, how = n * per_block + outer, f"{n} blocks x {per_block / GiB:.2f} GiB + head"
    acts += _mask_bytes(model, d.micro_batch * cfg.data.block_size)
    cached = cfg.precision.backend in ("auto", "triton")
    other = [
        Row("quantizer state (buffers, every rank)", quantizer_state_bytes(model)),
        Row(
            "low-precision weight copies",
            weight_copy_bytes(model) if cached else 0,
            "Triton backend, kept across micro-batches" if cached else "not cached by this backend",
        ),
        Row(f"activations (micro-batch {d.micro_batch} x {cfg.data.block_size})", acts, how),
    ]
    o = cfg.optim
    states = model_states(P, L, d.zero_stage, d.dtype, world, o.states, o.master)
    return MemoryPlan(world, P, L, states, other)


def _size(b: int) -> str:
    return f"{b / GiB:9.2f} GiB" if b >= GiB // 10 else f"{b / 2**20:9.1f} MiB"


def render(cfg, p: MemoryPlan, nodes: int, gpus: int, gpu_memory: float | None) -> str:
    d = cfg.deepspeed
    lines = [
        f"plan: {cfg.run.name}: {p.params / 1e6:.1f}M parameters (largest layer "
        f"{p.largest_layer / 1e6:.1f}M), precision {cfg.precision.recipe!r}, "
        f"engine {d.dtype}, ZeRO-{d.zero_stage}",
        f"cluster: {nodes} node(s) x {gpus} GPU(s) = {p.world} data-parallel ranks; "
        f"global batch {d.micro_batch * d.grad_accum * p.world} sequences of {cfg.data.block_size}",
        "per GPU:",
    ]
    for r in p.model_states + p.other:
        lines.append(f"  {r.name:<56}{_size(r.bytes)}" + (f"  ({r.note})" if r.note else ""))
    lines.append(f"  {'model states (DeepSpeed accounting)':<56}{_size(p.model_state_bytes)}")
    lines.append(f"  {'total':<56}{_size(p.total_bytes)}")
    if gpu_memory is None:
        lines.append("fits: pass --gpu-memory GiB to check (e.g. 80 for an 80 GB H100)")
    else:
        left = gpu_memory * GiB - p.total_bytes
        verdict = "yes" if left >= 0 else "NO"
        lines.append(
            f"fits in {gpu_memory:g} GiB: {verdict} ({left / GiB:+.2f} GiB left for the CUDA "
            "context, communication buckets and fragmentation)"
        )
    return "\n".join(lines)


def main(args) -> int:

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes/--gpus-per-node", "must be at least 1")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise ConfigError("--gpu-memory", f"must be positive, got {args.gpu_memory}")
    cfg = schema.load(args.recipe, args.overrides)
    vocab = dataset.load_tokenizer(tokenizer_spec(cfg)).vocab_size
    p = plan(cfg, args.nodes * args.gpus_per_node, vocab)
    print(render(cfg, p, args.nodes, args.gpus_per_node, args.gpu_memory))
    return 0
