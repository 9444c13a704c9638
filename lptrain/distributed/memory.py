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
- low-precision weight copies: what quantized layers keep per weight element, measured on a
  small real layer of the recipe and backend (distributed/kept.py): the Triton backend's cache
  (a weight's codes and scales kept across the micro-batches of one step, for stateless
  round-to-nearest weight quantizers) for every layer, plus copies saved until a layer's
  backward (delayed-scaling weights, the emulated backend's FP32 copies) for every block whose
  activations are alive.
- activations: the tensors autograd saves for backward in one micro-batch, measured by running
  the model's forward on `meta` tensors with `saved_tensors_hooks` (attention counted as
  FlashAttention saves it: q, k, v, output and the log-sum-exp rows, which is what SDPA runs on
  a GPU). Quantized layers cannot run on `meta`: each is replaced there by a stand-in that saves
  what the measured profile says per input element (its FP8 codes and transposes, scales, trust
  masks, or its high-precision input; a copy shared by layers reading one tensor once, as
  nn/shared.py shares it). With `model.checkpointing`, the block inputs of every layer plus one
  layer's recomputed activations.

Not counted, and left to the margin a user keeps: the CUDA context and kernels (~0.5-1 GiB),
DeepSpeed's communication buckets, the allocator's fragmentation, and the logits' transient
fp32 copies in the loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.config import schema
from lptrain.config.inherit import tokenizer_spec
from lptrain.config.precision import is_high_precision, resolve_overrides, resolve_recipe
from lptrain.data import dataset
from lptrain.distributed import kept
from lptrain.distributed.engine import param_dtype
from lptrain.errors import ConfigError
from lptrain.models import converters
from lptrain.models.decoder import Block, Decoder, build_model, set_saved_activations
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
    weight_copy_per_param: float = 0.0  # bytes per quantized weight element, all layers live

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
    once (views count their base; a quantized operand its codes and scales), parameters
    excluded (they are model states)."""
    params = {id(p) for p in module.parameters()}
    saved: dict[int, torch.Tensor] = {}  # holding the tensors keeps their ids unique

    def pack(t: torch.Tensor):
        for s in kept.storages(t):
            if id(s) not in params:
                saved[id(s)] = s
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_like_sdpa():
        module(*inputs)
    return sum(kept.nbytes(s) for s in saved.values())


class _KeptFunction(torch.autograd.Function):
    """A quantized Linear on `meta`: the output's shape, and what the layer saves."""

    @staticmethod
    def forward(ctx, x, out_features: int, copy_bytes: int, keep_input: bool):
        saved = [x] if keep_input else []
        if copy_bytes:
            saved.append(torch.empty(copy_bytes, dtype=torch.uint8, device=x.device))
        ctx.save_for_backward(*saved)
        return x.new_empty(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):  # never run: the plan only measures the forward
        raise RuntimeError("meta measurement only")


class _KeptLinear(nn.Module):
    """Stands in for a quantized Linear during the meta forward (see the module docstring).
    `readers` is shared by the block's stand-ins: the inputs already quantized by one of them."""

    def __init__(self, layer: nn.Linear, profile: kept.Kept, readers: dict):
        super().__init__()
        self.weight, self.out_features = layer.weight, layer.out_features
        self.profile, self.readers = profile, readers

    def forward(self, x):
        first = id(x) not in self.readers
        self.readers[id(x)] = x
        per = self.profile.input_first if first else self.profile.input_more
        copy = round(per * x.numel())
        return _KeptFunction.apply(x, self.out_features, copy, self.profile.keeps_input)


def _stand_ins(model: nn.Module, profile: kept.Kept | None) -> nn.Module:
    """`model` with its quantized Linears replaced by `_KeptLinear`s (in place)."""
    if profile is None:
        return model
    readers: dict = {}
    for name, layer in list(lpnn.quantized_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _KeptLinear(layer, profile, readers))
    return model


def activation_bytes(
    model: nn.Module, micro: int, seq: int, dtype: torch.dtype, profile: kept.Kept | None = None
) -> tuple[int, int]:
    """(per block, everything outside the blocks) for one micro-batch of `micro` x `seq`, for
    the meta `model` as converted (its first block stands for all), quantized layers measured
    as `profile` says."""
    args = model.args
    block = copy.deepcopy(model.layers[0]) if args.n_layers else Block(args)
    with torch.device("meta"):
        outer = Decoder(dataclasses.replace(args, n_layers=0))
    outer.lm_head = copy.deepcopy(model.lm_head)  # converted or skipped, as the run's
    outer.norm = copy.deepcopy(model.norm)  # its saved activations as the run's
    block, outer = _stand_ins(block.to(dtype), profile), _stand_ins(outer.to(dtype), profile)
    x = torch.empty(micro, seq, args.dim, device="meta", dtype=dtype, requires_grad=True)
    cos, sin = (torch.empty(seq, args.dim // args.n_heads // 2, device="meta") for _ in "cs")
    tokens = torch.empty(micro, seq + 1, device="meta", dtype=torch.long)
    return saved_bytes(block, x, cos, sin), saved_bytes(outer, tokens)


def weight_copy_bytes(model: nn.Module, profile: kept.Kept | None, live_blocks: int) -> int:
    """The Triton cache for every quantized layer, plus the weight copies saved until backward
    for the layers of `live_blocks` blocks and those outside the blocks."""
    if profile is None:
        return 0
    total = 0.0
    for name, layer in lpnn.quantized_layers(model):
        n = layer.weight.numel()
        total += n * profile.weight_cache
        index = name.split(".")[1] if name.startswith("layers.") else None
        if index is None or int(index) < live_blocks:
            total += n * profile.weight_saved
    return round(total)


def quantizer_state_bytes(model: nn.Module) -> int:

    return sum(
        b.numel() * b.element_size()
        for _, layer in lpnn.quantized_layers(model)
        for b in layer.state_dict(keep_vars=True).values()
        if not isinstance(b, nn.Parameter)
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
        if p.overrides:  # per-layer recipes (a trust mask is per layer)
            converters.override(model, resolve_overrides(p), "emulated", lambda _: None)
    if cfg.precision.saved_activations != "none":  # FP8 copies measured on meta as shapes
        set_saved_activations(model, cfg.precision.saved_activations)
    return model


def _check_supported(cfg) -> None:

    if cfg.init.from_ is not None:
        raise ConfigError("init.from", "lptrain plan covers the model presets; drop init.from")
    if cfg.adapters.type is not None or cfg.qat.method is not None:
        key = "adapters.type" if cfg.adapters.type is not None else "qat.method"
        raise ConfigError(key, "lptrain plan covers pretraining recipes (no adapters or QAT)")


def measured_profile(cfg, dtype: torch.dtype) -> tuple[kept.Kept | None, str]:
    """What the run's quantized layers keep (distributed/kept.py) and how it was measured;
    (None, '') for a high-precision run."""
    if is_high_precision(cfg.precision):
        return None, ""
    backend = cfg.precision.backend
    profile, how = kept.profile(resolve_recipe(cfg.precision), backend, dtype)
    if backend == "te":  # TE's Linear keeps its own tensors, not measured here
        how += "; backend te counted as the Triton backend"
    return profile, how


def plan(cfg, world: int, vocab_size: int) -> MemoryPlan:
    _check_supported(cfg)
    d = cfg.deepspeed
    model = build_meta_model(cfg, vocab_size)
    P, L = count_like_deepspeed(model)
    dtype = param_dtype(cfg)  # DeepSpeed's dtype: the parameters' and the activations'
    profile, measured = measured_profile(cfg, dtype)
    tokens = d.micro_batch * cfg.data.block_size
    per_block, outer = activation_bytes(model, d.micro_batch, cfg.data.block_size, dtype, profile)
    n = model.args.n_layers
    if model.args.checkpointing:  # block inputs kept, one block recomputed at a time
        block_input = tokens * model.args.dim * dtype.itemsize
        acts, how = n * block_input + per_block + outer, "checkpointed: block inputs + 1 block"
    else:
        acts, how = n * per_block + outer, f"{n} blocks x {per_block / GiB:.2f} GiB + head"
    how += f"; {per_block / tokens / 1024:.1f} KiB per token per block"
    live = 1 if model.args.checkpointing else n
    copies = weight_copy_bytes(model, profile, live)
    per_param = profile.weight_cache + profile.weight_saved if profile else 0.0
    copies_note = (
        f"{profile.weight_cache:.2f} B/param cached across micro-batches + "
        f"{profile.weight_saved:.2f} B/param saved until backward; {measured}"
        if profile
        else "none: no quantized layer"
    )
    other = [
        Row("quantizer state (buffers, every rank)", quantizer_state_bytes(model)),
        Row("low-precision weight copies", copies, copies_note),
        Row(f"activations (micro-batch {d.micro_batch} x {cfg.data.block_size})", acts, how),
    ]
    o = cfg.optim
    states = model_states(P, L, d.zero_stage, d.dtype, world, o.states, o.master)
    return MemoryPlan(world, P, L, states, other, weight_copy_per_param=per_param)


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
