"""Gram ("ghost") form of the per-example squared gradient norm, as a Triton kernel.

||G_i||_F^2 = sum_{t,s} <delta_t, delta_s> <x_t, x_s> over example i's tokens. One program owns one (t-block,
s-block) pair of one example (a segment (row, start, end) of the rows: a padded row's valid tokens, or one sequence
of a packed row) and builds both T-block x T-block Gram tiles in fp32 registers with `tl.dot`, looping over the
feature dims in chunks; it multiplies them elementwise, reduces, and atomically adds into norms_sq[i]. Only pairs
with s-block >= t-block do work (the Gram matrices are symmetric: an off-diagonal pair counts twice), and pairs
lying past the example's last token end at once. Neither a B*T*T nor a B*m*n tensor is ever materialised: the
cost is ~L^2 (m + n) per example of L tokens, cheap when L is short and m*n is large.

Only the kernel and its launch description live here; input checks and method choice are in `linear_norm.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import Launch, site_args
from .reference import PACKED_SPANS, Case, compare, example_grads, grad_sq_norms, ops, padded_spans
from .spec import AotSite, KernelSpec
from .token_range import dot_acc, load_tile, segment_range


@triton.jit
def _gram_tile(base, offs_t, offs_s, mask_t, mask_s, stride_t, stride_k, K, BLOCK_T: tl.constexpr,
               BLOCK_K: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """[BLOCK_T, BLOCK_T] fp32 tile of <v_t, v_s> for the K-feature vectors v_t at base + t * stride_t."""
    g = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = load_tile(base, offs_t, offs_k, stride_t, stride_k, mask_t, mask_k)
        c = load_tile(base, offs_k, offs_s, stride_k, stride_t, mask_k, mask_s)
        g = dot_acc(a, c, g, NATIVE_DOT)
    return g


@triton.jit
def _gram_sq_norm_kernel(
    x_ptr, d_ptr, r_ptr, norms_ptr, T, M, N,  # launch.site_args: the site, its segments and sizes,
    stride_xb, stride_xt, stride_xn, stride_db, stride_dt, stride_dm, stride_rb,  # and their strides
    HAS_RANGE: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_KN: tl.constexpr, BLOCK_KM: tl.constexpr,
):
    """Grid (S, cdiv(L, BLOCK_T), cdiv(L, BLOCK_T)), L the longest example: norms_sq[i] += (2 - [tb == sb]) *
    sum(Gx_tile * Gd_tile)."""
    i = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    sb = tl.program_id(2)
    b, start, end = segment_range(r_ptr, i, stride_rb, T, HAS_RANGE)
    # Blocks are laid out from the example's first token, so padding (or the row's other sequences) costs no block.
    t_lo = start + tb * BLOCK_T
    s_lo = start + sb * BLOCK_T
    if (tb <= sb) & (s_lo < end):
        offs_t = t_lo + tl.arange(0, BLOCK_T)
        offs_s = s_lo + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        mask_s = offs_s < end
        x_base = x_ptr + b * stride_xb
        d_base = d_ptr + b * stride_db

        gx = _gram_tile(x_base, offs_t, offs_s, mask_t, mask_s, stride_xt, stride_xn, N, BLOCK_T, BLOCK_KN,
                        NATIVE_DOT)
        gd = _gram_tile(d_base, offs_t, offs_s, mask_t, mask_s, stride_dt, stride_dm, M, BLOCK_T, BLOCK_KM,
                        NATIVE_DOT)
        partial = tl.sum(tl.sum(gx * gd, axis=1), axis=0)
        if tb == sb:
            tl.atomic_add(norms_ptr + i, partial)
        else:
            tl.atomic_add(norms_ptr + i, 2.0 * partial)


def gram_blocks(t: int, m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_KN, BLOCK_KM, num_warps) for a site: blocks >= 16 (tl.dot), powers of 2."""
    block_t = 64 if t >= 256 else (32 if t > 16 else 16)
    block_kn = min(64, max(16, triton.next_power_of_2(n)))
    block_km = min(64, max(16, triton.next_power_of_2(m)))
    return block_t, block_kn, block_km, (8 if block_t == 64 else 4)


def gram_launch(
    x: Tensor,
    delta: Tensor,
    norms: Tensor,
    ranges: Tensor | None,
    native_dot: bool,
    block_t: int | None = None,
    block_k: int | None = None,
    max_length: int | None = None,
) -> Launch:
    """The Gram-form launch adding ||G_i||^2 into `norms` (zeroed fp32 [S]); inputs already checked by the caller.

    `ranges`: int32 [S, 3] (row, start, end) segments or None (one example per row, all T tokens); `max_length`
    bounds their lengths (default T) and sizes the grid. `block_t` / `block_k` override the automatic block sizes
    (both powers of 2, >= 16): tests use small ones so that several blocks, off-diagonal pairs and ragged edges
    are exercised on small shapes.
    """
    t, n, m = x.shape[1], x.shape[2], delta.shape[2]
    length = t if max_length is None else max_length
    bt, bkn, bkm, warps = gram_blocks(length, m, n)
    if block_t is not None:
        bt = block_t
    if block_k is not None:
        bkn = bkm = block_k
    nblk = max(1, triton.cdiv(length, bt))
    constexprs = dict(HAS_RANGE=ranges is not None, NATIVE_DOT=native_dot, BLOCK_T=bt, BLOCK_KN=bkn, BLOCK_KM=bkm)
    return Launch(_gram_sq_norm_kernel, (norms.shape[0], nblk, nblk), site_args(x, delta, ranges, norms),
                  constexprs, warps)


# ------------------------------------------------------------------ self-test cases and the specs of this file

def _check_gram(case: Case) -> None:
    """Gram form over several token blocks (off-diagonal pairs counted twice), ranges."""
    x, d = case.inputs(3, 40, 48, 40, seed=2)
    bounds = ((0, 40), (9, 40), (0, 17))
    got, _ = ops().linear_sq_norms(x, d, method="gram", valid_range=case.ranges(bounds))
    compare("gram", got, grad_sq_norms(example_grads(x, d, padded_spans(bounds))))


def _check_segment_gram(case: Case) -> None:
    """Packed segments, Gram form over several token blocks (a segment starting inside a block)."""
    x, d = case.inputs(3, 21, 48, 40, seed=22)
    got, _ = ops().linear_sq_norms(x, d, method="gram", segments=case.segments(), max_length=21)
    compare("segment_gram", got, grad_sq_norms(example_grads(x, d, PACKED_SPANS)))


SPECS = (
    KernelSpec("gram", "linear_sq_norms", _check_gram, (
        AotSite("smollm2 full q_proj T=128 bf16 (gram)", 128, 576, 576, "bfloat16", "bfloat16"),
        AotSite("7b full o_proj T=512 fp32 (gram)", 512, 4096, 4096))),
    KernelSpec("segment_gram", "linear_sq_norms", _check_segment_gram, (
        AotSite("smollm2 packed full q_proj 16 seqs <= 96 tokens (gram)", 1024, 576, 576, "bfloat16", "bfloat16",
                "gram", segments=16, max_length=96),)),
)

__all__ = ["SPECS", "gram_blocks", "gram_launch"]
