"""The one Triton helper the norm kernels share: the tokens of one example, a segment (row, start, end)."""

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
