"""lptrain.qat.bitswitch: train once, deploy at any of several bit-widths (algorithms.md §7:
Double Rounding, ALRS, HASB; Huang et al., arXiv 2502.01199).

    from lptrain.qat import bitswitch as bs
    bs.prepare(model, bs.BitSwitchConfig(bits=(8, 6, 4, 2)))   # BitSwitchLinear wrappers
    bs.calibrate(model, first_batch)      # every bit-width's input steps, before DeepSpeed
    bs.set_bits(model, 4)                 # or {layer: bits}
    store = layer.to_store()              # int8 codes + scale (+ per-bit input steps)
    four = bs.switch_store(store, 4)      # the 4-bit layer from the int8 store alone

The joint multi-precision training step (every bit-width per batch, ALRS, HASB sampling,
optional self-distillation) is `lptrain.trainer.bitswitch`, a step function for the trainer.
"""

from lptrain.qat.bitswitch.budget import Assignment, brute_force, solve
from lptrain.qat.bitswitch.double_rounding import (
    ROUNDINGS,
    SCALE_GRADS,
    DoubleRoundingFunction,
    double_round,
    faithful_reference_scale_grad,
    second_round,
    ste_reference,
    storage_codes,
)
from lptrain.qat.bitswitch.hasb import (
    alrs_multipliers,
    pass_generator,
    roulette,
    roulette_probs,
    sample_bits,
    switch_probability,
)
from lptrain.qat.bitswitch.hessian import TraceResult, hutchinson, layer_traces
from lptrain.qat.bitswitch.layer import BitSwitchLinear, SwitchInfo, store_weight, switch_store
from lptrain.qat.bitswitch.prepare import (
    BitSwitchConfig,
    BitSwitchConfigError,
    active_bits,
    bitswitch_layers,
    calibrate,
    convert,
    prepare,
    set_bits,
)
from lptrain.qat.bitswitch.quantizer import DoubleRoundingQuantizer

__all__ = [
    "ROUNDINGS",
    "SCALE_GRADS",
    "Assignment",
    "BitSwitchConfig",
    "BitSwitchConfigError",
    "BitSwitchLinear",
    "DoubleRoundingFunction",
    "DoubleRoundingQuantizer",
    "SwitchInfo",
    "TraceResult",
    "active_bits",
    "alrs_multipliers",
    "bitswitch_layers",
    "brute_force",
    "convert",
    "calibrate",
    "double_round",
    "faithful_reference_scale_grad",
    "hutchinson",
    "layer_traces",
    "pass_generator",
    "prepare",
    "roulette",
    "roulette_probs",
    "sample_bits",
    "second_round",
    "set_bits",
    "solve",
    "ste_reference",
    "storage_codes",
    "store_weight",
    "switch_probability",
    "switch_store",
]
