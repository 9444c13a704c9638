"""`QuantizedLinear`: a frozen linear layer whose weight is *stored* in low precision.

It is the frozen base under LoRA and the deployable layer of an export (L4Q, LSQ, a LoRA
folded into its base). Storage formats, with bytes per weight for an (out, in) layer:

| format | stored as | bytes/param |
| --- | --- | --- |
| `bf16` | bf16 weight | 2 |
| `fp8` | E4M3 codes (uint8), one fp32 scale per output row | 1 + 4/in |
| `int8` | int8 codes, symmetric, one fp32 step per output row | 1 + 4/in |
| `int4` | 4-bit codes, two per byte, symmetric, fp32 step per group | 0.5 + 4/group |
| `nvfp4` | E2M1 codes, two per byte, E4M3 scale per 16, fp32 tensor scale | 0.5625 |
| `nf4` | NF4 codes, two per byte; 8-bit absmax per group, fp32 per 256 | 0.5 + 1/g + 1/(64g) |
| `affine` | b-bit codes, packed at b bits, fp32 step (+ offset) per group | b/8 + 4/group |

`affine` is W = s·I + b per group: the export of L4Q and LSQ layers. Integer codes of b < 8
bits are stored as I - n (n the lowest code) packed at b bits per code (`pack_codes`:
little-endian along each row, rows padded to whole bytes, numerics/codes.py `pack_bits`): 2-bit
codes four per byte, 3-bit eight per 3 bytes, 6-bit four per 3 bytes. 8-bit codes are int8.
`code_bits` is the width each code occupies (b, or 8 for int8; exports written before packing
at b bits used 4 for b <= 4 and 8 above, and say so by leaving `code_bits` out of their layout).
`nf4` is QLoRA's storage, bit-equal to bitsandbytes' (lptrain/numerics/nf4.py): 0.5 + 1/64 +
1/4096 bytes (4.127 bits) per weight at group 64, plus one fp32 offset per layer.

Buffers only (never parameters): ZeRO never partitions or casts them, `state_dict` and
safetensors carry them. The weight is dequantized on the fly, one row chunk at a time
(`chunked.py`), so no dense float copy outlives a chunk. `gemm="full"` instead dequantizes
the whole weight and runs `F.linear` (or an `lptrain.nn.Linear` recipe's GEMMs): the export
of a QAT layer, whose training forward did exactly that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lptrain.errors import ConfigError
from lptrain.nn.chunked import frozen_linear
from lptrain.numerics import (
    QuantSpec,
    decode,
    get_format,
    nf4,
    pack_bits,
    pack_nibbles,
    quantize,
    unpack_bits,
    unpack_nibbles,
)
from lptrain.qat import lsq as L

FORMATS = ("bf16", "fp8", "int8", "int4", "nvfp4", "nf4", "affine")
FP8_SPEC = QuantSpec("fp8_e4m3", scaling="row")  # one scale per output row
NVFP4_SPEC = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")


def pack_codes(q: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Integer codes (out, in) in [n, n + 2^width) -> how they are stored: int8 at width 8,
    else I - n packed at `width` bits per code along each row (uint8, `pack_bits`)."""
    if width == 8:
        return q.to(torch.int8)
    return pack_bits((q.to(torch.int16) - n).to(torch.uint8), width)


def unpack_codes(stored: torch.Tensor, n: int, width: int, count: int) -> torch.Tensor:
    """The inverse of `pack_codes`: (rows, count) int16 codes."""
    if width == 8:
        return stored.to(torch.int16)
    return unpack_bits(stored, width, count).to(torch.int16) + n


def symmetric_codes(w: torch.Tensor, bits: int, group: int):
    """Round-to-nearest symmetric integer quantization per group: s = amax/p, I in [-p, p]."""
    p = 2 ** (bits - 1) - 1
    wg = w.detach().float().reshape(w.shape[0], -1, group)  # (out, G, group)
    s = (wg.abs().amax(-1, keepdim=True) / p).clamp_min(1e-12)
    return L.codes(wg / s, -p, p).reshape(w.shape), s.squeeze(-1)


class QuantizedLinear(nn.Module):
    """A frozen (out, in) linear layer stored in `fmt` (see the module table)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, *, gemm: str = "chunked"):
        super().__init__()
        if fmt not in FORMATS:
            raise ConfigError("base", f"{fmt!r} is not one of {FORMATS}")
        self.in_features, self.out_features, self.fmt, self.gemm = (
            in_features,
            out_features,
            fmt,
            gemm,
        )
        self.bits, self.group_size, self.n = 0, in_features, 0
        self.code_bits = 8  # the width each stored integer code occupies (pack_codes)
        self.recipe_layer: nn.Module | None = None  # an lptrain.nn.Linear with no weight
        self.input_quantizer: nn.Module | None = None  # QAT exports with quantized inputs
        self.register_buffer("bias", None)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_weight(
        cls, w: torch.Tensor, fmt: str, *, bias=None, group_size: int = 64
    ) -> "QuantizedLinear":
        """Quantize a float (out, in) weight once (round to nearest)."""
        out_f, in_f = w.shape
        m = cls(in_f, out_f, fmt)
        w32 = w.detach().float()
        if fmt == "bf16":
            m.register_buffer("weight_bf16", w.detach().to(torch.bfloat16).clone())
        elif fmt == "fp8":
            qt = quantize(w32, FP8_SPEC)
            m.register_buffer("codes", qt.codes.view(torch.uint8).clone())
            m.register_buffer("scale", qt.scales.reshape(out_f, 1).clone())
        elif fmt == "nvfp4":
            if in_f % 16:
                raise ConfigError("base", f"nvfp4 needs in_features divisible by 16, got {in_f}")
            qt = quantize(w32, NVFP4_SPEC)
            m.register_buffer("codes", qt.codes.reshape(out_f, in_f // 2).clone())
            block = qt.scales.reshape(out_f, in_f // 16).to(torch.float8_e4m3fn)
            m.register_buffer("block_scale", block.view(torch.uint8).clone())
            m.register_buffer("global_scale", qt.global_scale.reshape(()).float().clone())
        elif fmt == "nf4":
            m.check_nf4(group_size)
            idx, absmax = nf4.quantize(w32, group_size)  # absmax per group, then quantized:
            m.set_nf4(idx, *nf4.quantize_scales(absmax), group_size=group_size)
        elif fmt in ("int8", "int4"):
            bits = 8 if fmt == "int8" else 4
            group = in_f if fmt == "int8" else group_size
            if in_f % group:
                raise ConfigError(
                    "group_size",
                    f"{group} does not divide in_features {in_f} of a {tuple(w.shape)} weight",
                )
            q, s = symmetric_codes(w32, bits, group)
            m.set_affine(q, s, None, bits=bits, group_size=group, n=-(2 ** (bits - 1) - 1))
            m.fmt = fmt
        else:
            raise ConfigError("base", f"from_weight cannot make {fmt!r}; use set_affine")
        m.set_bias(bias)
        return m.to(w.device)

    def set_affine(
        self, q, step, offset, *, bits: int, group_size: int, n: int, code_bits: int | None = None
    ) -> None:
        """Store integer codes `q` (out, in) with per-group `step`/`offset` (out, in/group),
        packed at `bits` bits per code (`code_bits`: another width, for an older export)."""
        self.bits, self.group_size, self.n = bits, group_size, n
        self.code_bits = code_bits or bits
        codes = pack_codes(q, n, self.code_bits)
        self.register_buffer("codes", codes.contiguous().clone())
        self.register_buffer("step", step.detach().float().reshape(self.out_features, -1).clone())
        if offset is not None:
            offset = offset.detach().float().reshape(self.out_features, -1).clone()
        self.register_buffer("offset", offset)

    def check_nf4(self, group_size: int) -> None:
        if self.in_features % group_size or self.in_features % 2:
            raise ConfigError(
                "group_size",
                f"nf4 needs an even in_features that {group_size} divides, got "
                f"{self.in_features} (a ({self.out_features}, {self.in_features}) weight)",
            )

    def set_nf4(self, idx, scale_codes, scale_absmax, scale_offset, *, group_size: int) -> None:
        """Store NF4 indices `idx` (out, in) and the double-quantized absmax per group: 8-bit
        `scale_codes` (out, in/group), fp32 `scale_absmax` per 256 of them, fp32 `scale_offset`."""
        self.bits, self.group_size = 4, group_size
        self.register_buffer("codes", pack_nibbles(idx).contiguous().clone())
        codes = scale_codes.to(torch.uint8).reshape(self.out_features, -1).clone()
        self.register_buffer("scale_codes", codes)
        self.register_buffer("scale_absmax", scale_absmax.detach().float().reshape(-1).clone())
        self.register_buffer("scale_offset", scale_offset.detach().float().reshape(()).clone())

    def set_bias(self, bias: torch.Tensor | None) -> None:
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    # -- dequantization -------------------------------------------------------------------

    def weight_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the dequantized (out, in) weight, float32."""
        rows = r1 - r0
        if self.fmt == "bf16":
            return self.weight_bf16[r0:r1].float()
        if self.fmt == "fp8":
            return self.codes[r0:r1].view(torch.float8_e4m3fn).float() * self.scale[r0:r1]
        if self.fmt == "nvfp4":
            q = decode(unpack_nibbles(self.codes[r0:r1]), get_format("fp4_e2m1"))
            q = q.reshape(rows, -1, 16)
            s_b = self.block_scale[r0:r1].view(torch.float8_e4m3fn).float().unsqueeze(-1)
            return ((q * s_b) * self.global_scale).reshape(rows, self.in_features)
        if self.fmt == "nf4":
            first = r0 * (self.in_features // self.group_size)  # the chunk's first group
            s = nf4.dequantize_scales(
                self.scale_codes[r0:r1].reshape(-1), self.scale_absmax, self.scale_offset, first
            )
            return nf4.dequantize(unpack_nibbles(self.codes[r0:r1]), s, self.group_size)
        q = unpack_codes(self.codes[r0:r1], self.n, self.code_bits, self.in_features)
        qg = q.float().reshape(rows, -1, self.group_size)  # (rows, G, group)
        step = self.step[r0:r1].unsqueeze(-1)
        off = self.offset[r0:r1].unsqueeze(-1) if self.offset is not None else None
        return L.dequantize(qg, step, off).reshape(rows, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.weight_rows(0, self.out_features)

    def integer_codes(self) -> torch.Tensor | None:
        """The stored integer codes as int16 (out, in), for affine/int formats."""
        if self.fmt not in ("int8", "int4", "affine"):
            return None
        return unpack_codes(self.codes, self.n, self.code_bits, self.in_features)

    def stored_bytes(self) -> int:
        """Bytes of the weight as an export writes it (the layer's state dict, what safetensors
        saves): codes, scales or steps (+ offsets), the input quantizer's step; not the bias,
        which stays float whatever the format."""
        return sum(t.numel() * t.element_size() for k, t in self.state_dict().items()
                   if k != "bias")  # fmt: skip

    def bytes_per_param(self) -> float:
        return self.stored_bytes() / (self.out_features * self.in_features)

    # -- forward --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantizedLinear: expected input with last dim {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.recipe_layer is not None:
            # A QAT or LoRA base's bias is the recipe layer's (added inside its GEMM); an L4Q
            # export's is ours, added after the GEMM as the L4Q layer did in training.
            y = self.recipe_layer.gemm(x, self.dequantize().to(x.dtype))
        elif self.gemm == "full":
            return F.linear(x, self.dequantize().to(x.dtype), self._bias(x))
        else:
            y = frozen_linear(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _bias(self, x):
        return self.bias.to(x.dtype) if self.bias is not None else None

    def extra_repr(self) -> str:
        extra = f", {self.bits} bits, group {self.group_size}" if self.bits else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"base={self.fmt}{extra}, {self.bytes_per_param():.3f} bytes/param"
        )
