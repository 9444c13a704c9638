"""Shared quantized inputs (lptrain/nn/shared.py): q/k/v and w1/w3 quantize their common input
once where the recipe allows it, and nothing changes by a bit."""

from __future__ import annotations

import pytest
import torch

import lptrain.nn as lpnn
import lptrain.recipes as recipes
from lptrain.config.schema import ModelConfig
from lptrain.models.decoder import Block, model_args
from lptrain.nn.shared import SharedInputs

ARGS = model_args(ModelConfig(preset="nano", dim=64, n_heads=2, n_kv_heads=2, ffn_dim=128), 256, 8)
# The recipes whose input copy is a pure function of the tensor and kept for the weight
# gradient: shared. The others keep the input itself (one tensor already) or a copy per layer.
SHARED = {"fp8-current"}


def _block(recipe: str, share: bool):
    torch.manual_seed(0)
    block = Block(ARGS)
    lpnn.convert(block, recipe, backend="emulated", log_fn=lambda _: None)
    for _, layer in lpnn.quantized_layers(block):
        layer.backend.share_inputs = share
    return block


def _step(block, hits: list[int]):
    """One forward + backward; outputs and every gradient, and how many copies were reused."""
    get = SharedInputs.get

    def counting(self, x, key):
        found = get(self, x, key)
        hits[0] += found is not None
        return found

    torch.manual_seed(1)
    x = torch.randn(2, 8, ARGS.dim, requires_grad=True)
    cos, sin = torch.randn(8, 16), torch.randn(8, 16)
    SharedInputs.get = counting
    try:
        y = block(x, cos, sin)
    finally:
        SharedInputs.get = get
    y.square().sum().backward()
    return [y, x.grad, *(p.grad for p in block.parameters())]


@pytest.mark.parametrize("recipe", recipes.names())
def test_sharing_is_bit_identical(recipe):
    """Outputs and all gradients torch.equal with sharing on and off, for every named recipe;
    the attention block reuses x for wk, wv and the MLP for w3 exactly where the recipe's input
    copy is deterministic (not delayed scaling, stochastic rounding, random rotations or an
    INT32-accumulating GEMM) and saved for backward; no copy outlives the forward that made it
    unless saved."""
    hits_on, hits_off = [0], [0]
    on = _step(_block(recipe, True), hits_on)
    off = _step(_block(recipe, False), hits_off)
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
    assert hits_off[0] == 0
    assert hits_on[0] == (3 if recipe in SHARED else 0)


def test_copies_are_held_no_longer_than_the_input_lives():
    """Nothing quantized for sharing outlives the forward when the layers keep the input itself
    (fp8-rowwise) or the copy (fp8-current): the block's norm outputs are freed, and so are the
    entries."""
    for recipe in ("fp8-rowwise", "fp8-current"):
        block = _block(recipe, True)
        y = block(torch.randn(2, 8, ARGS.dim, requires_grad=True), *torch.randn(2, 8, 16))
        assert len(next(lpnn.quantized_layers(block))[1].backend.shared_inputs) == 0
        y.sum().backward()


def test_no_sharing_after_in_place_write_and_entries_die_with_the_input():
    store = SharedInputs()
    x = torch.ones(3)
    store.put(x, ("k",), "copy")
    assert store.get(x, ("k",)) == "copy" and store.get(x, ("other",)) is None
    x.add_(1)  # a new version: the copy is stale
    assert store.get(x, ("k",)) is None
    del x
    assert len(store) == 0


def test_recomputed_forward_is_bit_identical():
    """Activation checkpointing recomputes the block: the recomputed norm output is a new tensor,
    quantized again to the same values, and nothing is shared across the two forwards."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for recompute in (False, True):
        block = _block("fp8-current", True)
        torch.manual_seed(1)
        x = torch.randn(2, 8, ARGS.dim, requires_grad=True)
        cos, sin = torch.randn(8, 16), torch.randn(8, 16)
        if recompute:
            y = checkpoint(block, x, cos, sin, use_reentrant=False)
        else:
            y = block(x, cos, sin)
        y.square().sum().backward()
        grads.append([y, x.grad, *(p.grad for p in block.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_an_empty_batch_shares_and_stays_empty():
    """Zero tokens: the shared path runs, with empty outputs and gradients of the right shapes."""
    block = _block("fp8-current", True)
    x = torch.randn(0, 8, ARGS.dim, requires_grad=True)
    y = block(x, torch.randn(8, 16), torch.randn(8, 16))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in block.parameters())


def test_nothing_is_kept_after_a_forward_without_gradients():
    """Under torch.no_grad no layer keeps a copy for backward, so none is shared: three layers
    reading an input the caller still holds leave the store empty (it used to hold the copy as
    long as the input lived), and compute what they compute unshared."""
    layers = torch.nn.ModuleDict({n: torch.nn.Linear(64, 64, bias=False) for n in "qkv"})
    lpnn.convert(layers, "fp8-current", backend="emulated", log_fn=lambda _: None)
    store = next(lpnn.quantized_layers(layers))[1].backend.shared_inputs
    x = torch.randn(4, 64)
    outs = {}
    for share in (False, True):
        for _, layer in lpnn.quantized_layers(layers):
            layer.backend.share_inputs = share
        with torch.no_grad():
            outs[share] = [layers[n](x) for n in "qkv"]
        assert len(store) == 0
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False], strict=True))
    y = layers["q"](x.requires_grad_()), layers["k"](x)  # with gradients: shared, kept
    assert len(store) == 1 and y[0].requires_grad
