"""Block-diagonal Walsh-Hadamard transform (algorithms.md §3.1-3.3).

`hadamard(x, n)` multiplies each length-n chunk of `dim` by the orthonormal Sylvester matrix
H_n / sqrt(n) (rows on the right, x -> x . H, H symmetric), with optional random signs applied
first (D . H, the randomized Hadamard of TE and Tseng et al.). The fast path is the
O(n log n) butterfly; `hadamard_matrix(n)` is the dense definition it is tested against.
"""

from __future__ import annotations

import math

import torch

from lptrain.numerics.rounding import check_floating


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {n!r}")


def hadamard_matrix(
    n: int,
    dtype: torch.dtype = torch.float32,
    normalized: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sylvester H_n with H[i, j] = (-1)^popcount(i & j), divided by sqrt(n) if normalized."""
    _check_n(n)
    idx = torch.arange(n, device=device)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    h = (1 - 2 * parity).to(dtype)
    return h / math.sqrt(n) if normalized else h


def _butterfly(src: torch.Tensor, n: int) -> torch.Tensor:
    """The butterfly over dim 1 of `src` (A, n, B), into a new contiguous (A, n, B) tensor.

    Stage h views the axis as [n/(2h), 2, h] and writes (a + b, a - b) straight into the
    halves of the other of two buffers (torch.stack cost a copy per stage). Each add and sub
    runs over contiguous stretches of h . B elements, so B > 1 (the chunks' axis is not the
    innermost in memory, `_chunks`) vectorizes where B = 1 walks stretches of 1, 2, 4, ...
    """
    a, _, b = src.shape
    bufs = [src.new_empty((a, n, b)), src.new_empty((a, n, b)) if n > 2 else None]
    h = 1
    while h < n:
        v = src.reshape(a, n // (2 * h), 2, h, b)
        dst = bufs[0]
        w = dst.view(a, n // (2 * h), 2, h, b)
        torch.add(v[:, :, 0], v[:, :, 1], out=w[:, :, 0])
        torch.sub(v[:, :, 0], v[:, :, 1], out=w[:, :, 1])
        src, bufs = dst, [bufs[1], dst]
        h *= 2
    return src


def _chunks(xt: torch.Tensor, n: int):
    """`xt` (axis last) as (A, n, B) chunks for `_butterfly`, and the map from the result
    back to xt's shape.

    An operand whose axis is the outer one in memory (a transposed view: the backward GEMMs'
    grad_output and input reduce over tokens) keeps its memory order: the chunks are
    (T/n, n, C) with C contiguous, no copy in and 3-6.5x faster stages than the (C . T/n, n)
    copy the axis-last layout needs (BENCHMARKS.md, "Faster emulation, second pass"). Every
    element sees the same adds in the same order either way, so the bits are the same.
    """
    if xt.dim() >= 2 and xt.shape[-2] > 1 and xt.transpose(-1, -2).is_contiguous():
        mem = xt.transpose(-1, -2)  # (..., T, C), contiguous
        c = xt.shape[-2]
        return mem.reshape(-1, n, c), lambda y: y.reshape(mem.shape).transpose(-1, -2)
    return xt.reshape(-1, n, 1), lambda y: y.reshape(xt.shape)


def check_divides(shape: tuple[int, ...], dim: int, block_size: int) -> None:
    """ValueError unless the rotation's block size divides dim `dim` of `shape`."""
    if shape[dim] % block_size:
        raise ValueError(
            f"Hadamard block size {block_size} does not divide dim {dim} of shape {shape}"
        )


def hadamard(
    x: torch.Tensor,
    block_size: int,
    dim: int = -1,
    signs: torch.Tensor | None = None,
    inverse: bool = False,
) -> torch.Tensor:
    """Orthonormal block-diagonal Hadamard of `x` along `dim` (length divisible by block_size).

    With `signs` (a +-1 vector of length block_size) the transform is x -> (x * signs) . H;
    `inverse=True` undoes it: y -> (y . H) * signs. Without signs it is its own inverse.
    """
    check_floating(x)
    _check_n(block_size)
    dim = dim % x.dim()
    check_divides(tuple(x.shape), dim, block_size)
    if signs is not None and signs.shape != (block_size,):
        raise ValueError(f"signs must have shape ({block_size},), got {tuple(signs.shape)}")
    xt = x.movedim(dim, -1)
    if xt.numel() == 0:  # no chunks
        return xt.clone().movedim(-1, dim)
    if block_size == 1:  # H_1 = [1]
        y = xt * signs.to(xt.dtype) if signs is not None else xt.clone()
        return y.movedim(-1, dim)
    chunks, back = _chunks(xt, block_size)
    if signs is not None and not inverse:
        chunks = chunks * signs.to(chunks.dtype)[:, None]
    y = _butterfly(chunks, block_size).mul_(1.0 / math.sqrt(block_size))
    if signs is not None and inverse:
        y = y.mul_(signs.to(y.dtype)[:, None])  # y is a new tensor
    return back(y).movedim(-1, dim)


def random_signs(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A +-1 float32 vector of length n, i.i.d. uniform, from `generator`."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=device)
    return (1 - 2 * bits).to(torch.float32)


# TE's fixed NVFP4 random-Hadamard sign vector (algorithms.md §3.7).
TE_NVFP4_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
