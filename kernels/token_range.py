"""The one Triton helper the norm kernels share: an example's valid token range [start, end)."""

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
