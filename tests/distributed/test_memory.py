"""`lptrain plan`: model states agree with DeepSpeed's own estimators for the shipped GPU
recipes (models on `meta`: nothing the size of 7B is allocated), activations are what autograd
really saves, and the command's output and errors."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.cli import main
from lptrain.config import schema
from lptrain.distributed import kept, memory
from lptrain.errors import ConfigError
from lptrain.optim import CompactAdamW
from tests.helpers import REPO

GPU_RECIPES = sorted((REPO / "recipes" / "pretrain").glob("gpu-*.yaml"))
BYTE_VOCAB = 256
CLUSTERS = [(1, 1), (1, 8), (4, 8), (16, 8)]  # (nodes, GPUs per node)


class _ShimParam:
    """A meta parameter as DeepSpeed's `model_to_params` sees it: on `meta` every data_ptr()
    is 0, so identity stands in for the address (tied weights are still one parameter)."""

    def __init__(self, p):
        self.p = p

    def data_ptr(self):
        return id(self.p)

    def numel(self):
        return self.p.numel()


class _ShimModule:
    def __init__(self, m: nn.Module):
        self.m = m

    def parameters(self, recurse=True):
        return [_ShimParam(p) for p in self.m.parameters(recurse=recurse)]

    def modules(self):
        return [_ShimModule(m) for m in self.m.modules()]


def _deepspeed_gpu_gib(model: nn.Module, stage: int, nodes: int, gpus: int) -> float:
    """The per-GPU figure DeepSpeed's *_all_live estimator prints for no offload (and
    zero_init, which does not change the GPU figure)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

        estimate, want = estimate_zero3_model_states_mem_needs_all_live, "offload_param=none"
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs_all_live,
        )

        estimate, want = estimate_zero2_model_states_mem_needs_all_live, "offload_optimizer=none"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate(_ShimModule(model), num_gpus_per_node=gpus, num_nodes=nodes)
    rows = [
        line
        for line in out.getvalue().splitlines()
        if want in line and "offload_optimizer=none" in line
    ]
    assert rows, out.getvalue()
    return float(re.search(r"\|\s*([\d.]+)GB\s*\|", rows[0]).group(1))


# DeepSpeed's estimators know its own fp32 Adam only (compact states:
# test_optimizer_bytes_are_what_compact_adamw_holds)
DS_ADAM = [p for p in GPU_RECIPES if schema.load(p).optim.states == "fp32"]


@pytest.mark.parametrize("recipe", DS_ADAM, ids=lambda p: p.stem)
def test_model_states_agree_with_deepspeed_estimators(recipe):
    cfg = schema.load(recipe)
    assert cfg.deepspeed.dtype == "bf16" and cfg.deepspeed.zero_stage in (2, 3)
    model = memory.build_meta_model(cfg, BYTE_VOCAB)
    assert next(model.parameters()).device.type == "meta"
    P, L = memory.count_like_deepspeed(model)
    for nodes, gpus in CLUSTERS:
        states = memory.model_states(P, L, cfg.deepspeed.zero_stage, "bf16", nodes * gpus)
        ours = sum(r.bytes for r in states) / 2**30
        theirs = _deepspeed_gpu_gib(model, cfg.deepspeed.zero_stage, nodes, gpus)
        assert abs(ours - theirs) <= 0.0051, (recipe.stem, nodes, gpus, ours, theirs)


def test_counting_matches_deepspeed_on_real_tensors():
    """On allocated tensors DeepSpeed dedupes by address; ours by identity gives the same P and
    L, tied embeddings included."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    from lptrain.config.schema import ModelConfig
    from lptrain.models.decoder import build_model

    for tie in (True, False):
        model = build_model(ModelConfig(preset="nano", tie_embeddings=tie), 256, 64)
        assert memory.count_like_deepspeed(model) == model_to_params(model)


def test_model_states_by_hand():
    P, L, D = 1000, 100, 4
    # fp32 engine: 4 + 4 + 8 bytes per parameter, partitioned as the stage says.
    assert sum(r.bytes for r in memory.model_states(P, L, 0, "fp32", D)) == 16 * P
    assert sum(r.bytes for r in memory.model_states(P, L, 2, "fp32", D)) == 4 * P + 12 * P // D
    assert sum(r.bytes for r in memory.model_states(P, L, 3, "fp32", D)) == 16 * P // D + 8 * L
    # bf16 ZeRO-1 keeps the 16-bit gradients whole: 2 + 2 bytes plus 16 partitioned.
    assert sum(r.bytes for r in memory.model_states(P, L, 1, "bf16", D)) == 4 * P + 16 * P // D


def test_saved_bytes_counts_each_saved_storage_once():
    """Linear -> ReLU -> Linear, fp32: the first Linear saves its input (B x 8); ReLU saves its
    output (B x 16), which the second Linear saves again (the same tensor, counted once).
    Weights are parameters, not activations."""
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8, requires_grad=True)
    assert memory.saved_bytes(mlp, x) == 4 * (5 * 8 + 5 * 16)


def test_meta_measurement_equals_real_tensors():
    """The meta forward saves exactly what the same forward on real CPU tensors saves."""
    from lptrain.config.schema import ModelConfig
    from lptrain.models.decoder import Block, model_args

    args = model_args(ModelConfig(preset="nano"), 256, 32)
    half = args.dim // args.n_heads // 2
    x = torch.randn(2, 32, args.dim, requires_grad=True)
    real = memory.saved_bytes(Block(args), x, torch.randn(32, half), torch.randn(32, half))
    with torch.device("meta"):
        model = memory.Decoder(args)
    per_block, _ = memory.activation_bytes(model, 2, 32, torch.float32)
    assert per_block == real > 0


# ---------------------------------------------------------------- quantized layers, measured

SMALL = ["model.preset=nano", "model.dim=128", "model.ffn_dim=256", "deepspeed.micro_batch=2",
         "deepspeed.dtype=bf16", "deepspeed.zero_stage=2", "precision.skip=[lm_head]",
         "precision.backend=emulated"]  # fmt: skip


def _really_saved(model: nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in a real forward (codes and scales of a
    quantized operand, not the FP32 it shows), parameters excluded; counted by storage
    address, independently of the plan's counting."""
    from lptrain.nn.backends.operand import QuantizedOperand

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    keep = []

    def pack(t):
        if isinstance(t, QuantizedOperand):
            o = t.op
            parts = [o.values, o.scale, o.gscale, o.values_t, o.scale_t, o.exponent]
        else:
            parts = [t]
        for x in (x for x in parts if x is not None):
            st = x.untyped_storage()
            if st.data_ptr() not in params:
                keep.append(x)
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), memory._flash_like_sdpa():
        model(tokens)
    return sum(seen.values())


@pytest.mark.parametrize(
    "recipe, acts",
    [("bf16", "none"), ("fp32", "none"), ("fp8-current", "none"), ("fp8-delayed", "none"),
     ("nvfp4", "none"), ("bf16", "fp8")],
)  # fmt: skip
def test_plan_agrees_with_measured_saved_bytes(recipe, acts):
    """The plan's per-token activations and per-parameter weight copies of a converted model
    (emulated backend) are within 5% of what a real forward saves (saved_tensors_hooks): FP32
    fake-quantized inputs where the backward reuses them, shared by q/k/v and w1/w3 where the
    recipe is deterministic, FP32 weight copies; FP8 codes and scales of the inputs RMSNorm,
    SwiGLU and attention keep with `precision.saved_activations: fp8`."""
    from lptrain.models.decoder import build_model, set_saved_activations

    measured, planned = [], []
    for seq in (32, 64):
        sets_ = [*SMALL, f"precision.recipe={recipe}", f"data.block_size={seq}",
                 f"precision.saved_activations={acts}"]  # fmt: skip
        cfg = schema.load(REPO / "recipes" / "pretrain" / "tiny-fp8.yaml", sets_)
        p = memory.plan(cfg, 1, BYTE_VOCAB)
        torch.manual_seed(0)
        model = build_model(cfg.model, BYTE_VOCAB, seq).to(torch.bfloat16)
        set_saved_activations(model, acts)
        if recipe not in ("bf16", "fp32"):
            lpnn.convert(model, recipe, skip=["lm_head"], backend="emulated", log_fn=print)
        measured.append(_really_saved(model, torch.randint(0, 256, (2, seq + 1))))
        rows = {r.name.split(" (")[0]: r.bytes for r in p.other}
        planned.append(rows["activations"] + rows["low-precision weight copies"])
    tokens = 2 * 32  # the second size has 2 x 32 more
    per_token = [(b - a) / tokens for a, b in (measured, planned)]
    assert abs(per_token[1] - per_token[0]) <= 0.05 * per_token[0], per_token
    fixed = [
        total - tokens * t for total, t in zip((measured[0], planned[0]), per_token, strict=True)
    ]
    weights = sum(m.weight.numel() for _, m in lpnn.quantized_layers(model))
    assert abs(fixed[1] - fixed[0]) <= 0.05 * max(fixed[0], weights), fixed
    assert p.weight_copy_per_param == (
        4.0 if recipe in ("fp8-current", "fp8-delayed", "nvfp4") else 0
    )


def test_triton_profile_counts_codes_transposes_and_the_cache():
    """The Triton backend keeps FP8 codes: fp8-current saves an input's codes and their
    transpose (2 bytes per element) once for all layers reading it, and caches the weight's
    (2 bytes per parameter, the copy its backward reuses); fp8-delayed copies per layer
    (per-layer histories) and saves the weight's codes per call instead of caching them."""
    from lptrain.nn.backends.triton import TritonBackend

    current = kept.measure("fp8-current", TritonBackend(), torch.bfloat16)
    assert (current.input_first, current.input_more, current.keeps_input) == (2.0, 0.0, False)
    assert current.weight_saved < 0.001 and abs(current.weight_cache - 2) < 0.001
    delayed = kept.measure("fp8-delayed", TritonBackend(), torch.bfloat16)
    assert (delayed.input_first, delayed.input_more, delayed.weight_cache) == (2.0, 2.0, 0.0)
    assert abs(delayed.weight_saved - 2) < 0.001


def test_profile_of_a_recipe_triton_cannot_run():
    """auto runs such a recipe on the emulated backend, and the plan measures that; backend
    triton is refused with one line, as training would refuse it."""
    import lptrain.recipes as recipes

    odd = recipes.from_dict({"base": "mxfp8", "output": {"input": {"block_size": 48}}})
    got, how = kept.profile(odd, "auto", torch.bfloat16)
    assert got.backend == "emulated" and "auto runs emulated (triton: " in how
    with pytest.raises(ConfigError, match="precision.backend"):
        kept.profile(odd, "triton", torch.bfloat16)


def _plan_cli(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_command_fits_and_does_not_fit(capsys):
    recipe = str(REPO / "recipes" / "pretrain" / "gpu-7b-fp8.yaml")
    code, out, _ = _plan_cli(capsys, recipe, "--nodes", "4", "--gpus-per-node", "8",
                             "--gpu-memory", "80")  # fmt: skip
    assert code == 0
    assert "32 data-parallel ranks" in out and "fits in 80 GiB: yes" in out
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    code, out, _ = _plan_cli(capsys, recipe, "--nodes", "4", "--gpus-per-node", "8",
                             "--gpu-memory", f"{total - 1:.0f}")  # fmt: skip
    assert code == 0 and ": NO (" in out
    # Activation checkpointing keeps block inputs only: far less activation memory.
    code, out2, _ = _plan_cli(capsys, recipe, "--set", "model.checkpointing=true")
    act = [float(re.search(r"activations[^\d]+\d+ x \d+\)\s+([\d.]+) GiB", o).group(1))
           for o in (out, out2)]  # fmt: skip
    assert act[1] < act[0] / 4


def test_plan_errors_are_one_line(capsys):
    recipe = str(REPO / "recipes" / "pretrain" / "gpu-1b-fp8.yaml")
    code, _, err = _plan_cli(capsys, recipe, "--nodes", "0")
    assert code == 2 and err.strip() == "error: --nodes/--gpus-per-node: must be at least 1"
    code, _, err = _plan_cli(capsys, recipe, "--set", "model.preset=huge")
    assert code == 2 and err.startswith("error: model.preset: unknown preset")
    assert "\n" not in err.strip()


def test_the_plan_converts_with_the_precision_overrides():
    """A trust mask is per layer: layers whose output GEMM an override takes from bf16 have
    none, and the plan counts none for them."""
    raw = {"run": {"max_steps": 1}, "model": {"preset": "nano"}, "precision": {
        "recipe": "quartet", "overrides": [{"layers": ["*.mlp.*"], "gemm": "output",
                                            "recipe": "bf16"}]}}  # fmt: skip
    model = memory.build_meta_model(schema.parse(raw), BYTE_VOCAB)
    masked = {n for n, layer in lpnn.quantized_layers(model) if layer.recipe.trust_mask}
    assert masked == {n for n, _ in lpnn.quantized_layers(model) if ".attn." in n} != set()


@pytest.mark.parametrize("states", ["fp32", "bf16", "fp8", "int8-block"])
def test_optimizer_bytes_are_what_compact_adamw_holds(states):
    # The plan's moments are the bytes CompactAdamW's state really holds (whole blocks).
    P = 128 * 64
    p = torch.nn.Parameter(torch.zeros(P))
    opt = CompactAdamW([p], states=states)
    p.grad = torch.randn(P)
    opt.step()
    rows = memory.model_states(P, P, 0, "fp32", 1, states)
    assert rows[-1].name == f"optimizer: Adam moments ({states})"
    assert rows[-1].bytes == opt.state_bytes()
    # bf16-sr: 2 + 2 + moments, no master copy: 6.09 bytes per parameter with fp8 states
    sr = memory.model_states(P, P, 0, "bf16", 1, states, "bf16-sr")
    assert sum(r.bytes for r in sr) == 4 * P + opt.state_bytes()
    # a bf16 engine keeps DeepSpeed's fp32 master copy next to the moments
    assert sum(r.bytes for r in memory.model_states(P, P, 0, "bf16", 1, states)) == (
        2 * P + 6 * P + 4 * P + opt.state_bytes()
    )
