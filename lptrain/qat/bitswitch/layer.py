"""`BitSwitchLinear`: a linear layer trained at several bit-widths at once, and its deployable
forms.

Training: y = base_gemm(Q_x,b(x), DoubleRound_b(W)) with b the layer's active bit-width; the
inputs have one learnable LSQ step per bit-width (`input_quantizers[str(b)]`, §7.1). The active
bit-width is a Python int for the forward (no device sync) mirrored in the `active_bits`
buffer so that checkpoints carry it; `hmt` holds the layer's average Hessian trace (HASB,
§7.3; NaN when not measured).

Deployment (`to_store`): a `QuantizedLinear` at the highest bit-width h (int8 codes I_h and the
per-channel scale s) plus a `SwitchInfo` (candidate bit-widths, rounding, every bit-width's
input step, the trace). `switch_store(store, b)` derives the b-bit layer from that int8 store
alone: codes second_round(I_h, h - b), step s·2^d, the b-bit input step. Its forward is the
training model's eval forward at b, bit for bit (same integers, same products, same GEMM).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lptrain.errors import ConfigError
from lptrain.qat.bitswitch import double_rounding as dr
from lptrain.qat.bitswitch.quantizer import DoubleRoundingQuantizer
from lptrain.qat.layers import features, keep_base_gemm, run_gemm, weight_nk
from lptrain.qat.quantized import QuantizedLinear
from lptrain.qat.quantizer import LSQQuantizer


def _sync_bits(module: "BitSwitchLinear", _keys) -> None:
    module._bits = int(module.active_bits)


class BitSwitchLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        bits: tuple[int, ...],
        *,
        rounding: str = "nearest",
        scale_grad: str = "corrected",
        act_bits: bool = True,
        act_signed: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = features(base)
        self.base = base
        self.weight_quantizer = DoubleRoundingQuantizer(
            (self.out_features, self.in_features), bits, rounding=rounding, scale_grad=scale_grad
        )
        self.bits = self.weight_quantizer.bits  # descending
        self.act_signed = act_signed if act_bits else None
        self.input_quantizers = (
            nn.ModuleDict({str(b): LSQQuantizer(b, signed=act_signed, role="input") for b in bits})
            if act_bits
            else None
        )
        self._bits = self.bits[0]
        self.register_buffer("active_bits", torch.full((1,), self._bits, dtype=torch.int64))
        self.register_buffer("hmt", torch.full((1,), float("nan")))
        self.register_load_state_dict_post_hook(_sync_bits)
        self.calibrating = False

    @property
    def active(self) -> int:
        return self._bits

    def set_bits(self, bits: int) -> None:
        self._bits = self.weight_quantizer.check(int(bits))
        self.active_bits.fill_(self._bits)

    def input_quantizer(self, bits: int) -> LSQQuantizer | None:
        return None if self.input_quantizers is None else self.input_quantizers[str(bits)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._bits
        q = self.input_quantizer(b)
        if q is not None:
            if not bool(q.initialized):
                # First training forward at this bit-width (or calibration): the step comes
                # from this batch. Never in eval: evaluation changes no state.
                if not (self.training or self.calibrating):
                    raise RuntimeError(
                        f"BitSwitchLinear: the {b}-bit input quantizer is not calibrated; run "
                        "lptrain.qat.bitswitch.calibrate(model, batch) or a training forward"
                    )
                q.init_from(x)
            x = q(x)
        return run_gemm(self.base, x, self.weight_quantizer(weight_nk(self.base), b))

    @torch.no_grad()
    def to_store(self) -> QuantizedLinear:
        """The deployable int8 store (see the module docstring); evaluates at h bits."""
        wq = self.weight_quantizer
        w = weight_nk(self.base)
        m = QuantizedLinear(self.in_features, self.out_features, "affine", gemm="full")
        n = dr.signed_bounds(wq.h)[0]
        step = wq.step.detach().float()
        m.set_affine(wq.storage_codes(w), step, None, bits=wq.h, group_size=self.in_features, n=n)
        keep_base_gemm(m, self.base)
        if self.input_quantizers is not None:
            m.input_quantizer = copy.deepcopy(self.input_quantizer(wq.h)).requires_grad_(False)
        info = SwitchInfo(self.bits, wq.rounding, self.act_signed).to(w.device)
        if self.input_quantizers is not None:
            steps = [self.input_quantizer(b).step.detach() for b in self.bits]
            info.act_steps.copy_(torch.cat(steps))
        info.hmt.copy_(self.hmt)
        m.switch = info
        return m.to(w.device).train(self.training)

    def export(self, bits: int | None = None) -> QuantizedLinear:
        """The deployable layer at `bits` (default: the int8 store, switchable later)."""
        store = self.to_store()
        return store if bits is None or bits == self.bits[0] else switch_store(store, bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, active={self._bits}"
        )


class SwitchInfo(nn.Module):
    """Beside an int8 store: what switching needs besides the codes and the scale. Buffers only
    (safetensors); `layout()` is what the export JSON records to rebuild it."""

    def __init__(self, bits, rounding: str, act_signed: bool | None):
        super().__init__()
        self.rounding, self.act_signed = rounding, act_signed
        bits = sorted(bits, reverse=True)
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64))
        steps = torch.zeros(len(bits)) if act_signed is not None else None
        self.register_buffer("act_steps", steps)
        self.register_buffer("hmt", torch.full((1,), float("nan")))

    @property
    def candidates(self) -> list[int]:
        return [int(b) for b in self.bits]

    def layout(self) -> dict:
        return {"bits": self.candidates, "rounding": self.rounding, "act_signed": self.act_signed}

    @classmethod
    def from_layout(cls, lay: dict) -> "SwitchInfo":
        return cls(lay["bits"], lay["rounding"], lay["act_signed"])


@torch.no_grad()
def switch_store(store: QuantizedLinear, bits: int) -> QuantizedLinear:
    """The `bits`-bit deployable layer derived from an int8 store (its codes, scale and
    SwitchInfo only: no float weight)."""
    info: SwitchInfo = store.switch
    cands = info.candidates
    if bits not in cands:
        raise ConfigError("bits", f"{bits} is not a candidate bit-width {cands}")
    d = cands[0] - bits
    q = dr.second_round(store.integer_codes().float(), d, bits, info.rounding)
    m = QuantizedLinear(store.in_features, store.out_features, "affine", gemm="full")
    n = dr.signed_bounds(bits)[0]
    step = store.step * 2**d  # s·2^d: exact, and the very factor the training forward uses
    m.set_affine(q, step, None, bits=bits, group_size=store.in_features, n=n)
    m.set_bias(store.bias)
    if store.recipe_layer is not None:
        m.recipe_layer = copy.deepcopy(store.recipe_layer)
    if info.act_signed is not None:
        iq = LSQQuantizer(bits, signed=info.act_signed, role="input").to(store.step.device)
        iq.step.copy_(info.act_steps[cands.index(bits)].reshape(1))
        iq.initialized.fill_(True)
        m.input_quantizer = iq.requires_grad_(False)
    return m.train(store.training)


@torch.no_grad()
def store_weight(store: QuantizedLinear, bits: int) -> torch.Tensor:
    """Ŵ_b (float32, (out, in)) of an int8 store, for the budget's error terms."""
    return switch_store(store, bits).dequantize()
