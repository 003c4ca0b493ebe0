"""The Triton helpers the norm kernels share: an example's tokens (a segment), a masked tile load, an fp32 dot."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_range(r_ptr, s, stride_rs, T, HAS_RANGE: tl.constexpr):
    """(row, start, end) of example s from the int32 [S, 3] segments, or (s, 0, T) when none were given."""
    if HAS_RANGE:
        row = tl.load(r_ptr + s * stride_rs).to(tl.int64)
        start = tl.load(r_ptr + s * stride_rs + 1)
        end = tl.load(r_ptr + s * stride_rs + 2)
    else:
        row = s
        start = 0
        end = T
    return row, start, end


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
