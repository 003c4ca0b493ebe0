"""The Triton helpers the kernels share: an example's valid token range, a masked tile load, an fp32 dot."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def example_token_range(r_ptr, b, stride_rb, T, HAS_RANGE: tl.constexpr):
    """[start, end) of example b from the ranges tensor, or [0, T) when no ranges were given."""
    if HAS_RANGE:
        start = tl.load(r_ptr + b * stride_rb)
        end = tl.load(r_ptr + b * stride_rb + 1)
    else:
        start = 0
        end = T
    return start, end


@triton.jit
def load_tile(base, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c):
    """The tile base[offs_r * stride_r + offs_c * stride_c] ([len(offs_r), len(offs_c)]), zero where masked."""
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=mask_r[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def dot_acc(a, b, acc, NATIVE_DOT: tl.constexpr):
    """acc + a @ b in fp32: 16-bit tiles as they are (products exact in fp32, tensor cores), else cast to fp32
    and multiplied in "ieee" precision (no tf32 rounding)."""
    if NATIVE_DOT:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc
