"""Exact per-example squared gradient norms of a Linear-like site, as Triton kernels, and their launcher.

For x [B, T, n] (the site's input) and delta [B, T, m] (the gradient w.r.t. its output), example i has the
weight gradient G_i = sum_t delta_{i,t} x_{i,t}^T (m x n); `linear_sq_norms` returns ||G_i||_F^2 in fp32 and equals
`fastsel.engine.linear_math.sq_norms` (the pure-torch reference) up to fp32 summation order. Three forms:

- instantiate (`_instantiate_kernel`): one program per (example, m-tile, n-tile) accumulates its tile of G_i over
  T in fp32 registers with `tl.dot`, squares and reduces it, and atomically adds into norms_sq[b]. A LoRA factor's
  small side (the rank r <= 128) is kept whole in one padded power-of-2 block, so the large side is read once.
  With `write_grads` the same kernel also stores the tile into grads [B, m, n] (fp32).
- gram (`gram_norm.py`): sum_{t,s} <delta_t, delta_s><x_t, x_s>, for short T and large m*n.
- outer (`_outer_kernel`): T == 1, ||delta||^2 ||x||^2 exactly.

Inputs may be fp32, bf16 or fp16: tiles are loaded in their dtype and either cast to fp32 (dot in "ieee" precision,
no tf32) or, when both inputs share a 16-bit dtype, fed to `tl.dot` as they are with fp32 accumulation, which gives
the same products (a product of two bf16/fp16 numbers is exact in fp32). bf16 dots stay in fp32 under the CPU
interpreter, which cannot multiply bf16. Results are accumulated with fp32 atomics, so on a GPU the last bits may
differ from run to run (summation order); the outer form writes without atomics.

Examples as segments: by default example b is row b, all T tokens. `segments` (int [S, 3] (row, start, end)), or
`cu_seqlens` (offsets over the row-major flattened [B * T] tokens: flash-attention varlen), makes example i the
tokens [start, end) of one row, so a packed row of several sequences gives one result per sequence ([S]), with
no padding multiplied and nothing of size S x T or B x T x T built. `valid_range` ([B] lengths, or [B, 2]
[start, end) per row) is the padded special case, one segment per row: blocks outside it are skipped (padded
positions normally have delta = 0, so the result is the same as without the range, only cheaper).
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import choose_method
from .gram_norm import gram_launch
from .launch import Launch, site_args
from .reference import (
    PACKED_SPANS,
    PADDED_BOUNDS,
    Case,
    KernelMismatch,
    compare,
    example_grads,
    grad_sq_norms,
    ops,
    padded_spans,
)
from .spec import AotSite, KernelSpec
from .token_range import dot_acc, load_tile, segment_range

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_METHODS = ("auto", "instantiate", "gram", "outer")


@triton.jit
def _instantiate_kernel(
    x_ptr, d_ptr, r_ptr, norms_ptr, T, M, N,  # launch.site_args: the site, its segments and sizes,
    stride_xb, stride_xt, stride_xn, stride_db, stride_dt, stride_dm, stride_rb,  # and their strides
    g_ptr,
    stride_gb,
    stride_gm,
    HAS_RANGE: tl.constexpr, WRITE_GRADS: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (S, cdiv(m, BLOCK_M), cdiv(n, BLOCK_N)): tile of G_i = sum over example i's tokens of delta_t x_t^T;
    norms_sq[i] += ||tile||^2."""
    i = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    b, start, end = segment_range(r_ptr, i, stride_rb, T, HAS_RANGE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_base = x_ptr + b * stride_xb
    d_base = d_ptr + b * stride_db

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):  # only the valid tokens: padded blocks cost nothing
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        d = load_tile(d_base, offs_m, offs_t, stride_dm, stride_dt, mask_m, mask_t)  # delta^T [BLOCK_M, BLOCK_T]
        xt = load_tile(x_base, offs_t, offs_n, stride_xt, stride_xn, mask_t, mask_n)  # x [BLOCK_T, BLOCK_N]
        acc = dot_acc(d, xt, acc, NATIVE_DOT)

    tl.atomic_add(norms_ptr + i, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if WRITE_GRADS:  # grads is a fresh contiguous [S, m, n] fp32 tensor: unit stride along n
        g_ptrs = g_ptr + i * stride_gb + offs_m[:, None] * stride_gm + offs_n[None, :]
        tl.store(g_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _outer_kernel(
    x_ptr, d_ptr, r_ptr, norms_ptr, T, M, N,  # launch.site_args: the site, its segments and sizes,
    stride_xb, stride_xt, stride_xn, stride_db, stride_dt, stride_dm, stride_rb,  # and their strides
    HAS_RANGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (S,), T == 1: norms_sq[i] = ||delta||^2 * ||x||^2 of example i's row (0 when its tokens exclude t = 0)."""
    i = tl.program_id(0).to(tl.int64)
    b, start, end = segment_range(r_ptr, i, stride_rb, T, HAS_RANGE)
    acc_x = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, N, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + b * stride_xb + offs * stride_xn, mask=offs < N, other=0.0).to(tl.float32)
        acc_x += v * v
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, M, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(d_ptr + b * stride_db + offs * stride_dm, mask=offs < M, other=0.0).to(tl.float32)
        acc_d += v * v
    res = tl.sum(acc_x, axis=0) * tl.sum(acc_d, axis=0)
    if HAS_RANGE:
        res = tl.where((start <= 0) & (end > 0), res, 0.0)
    tl.store(norms_ptr + i, res)


# ---------------------------------------------------------------------------------------------- input handling


def _is_interpreted() -> bool:
    """True when the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 set before their import)."""
    return type(_instantiate_kernel).__name__ == "InterpretedFunction"


def _check_inputs(x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes, dtypes and device; return inputs with a unit last-dim stride (copied at most once)."""
    if not isinstance(x, Tensor) or not isinstance(delta, Tensor):
        raise TypeError("x and delta must be torch tensors")
    if x.dim() != 3 or delta.dim() != 3 or x.shape[:2] != delta.shape[:2]:
        raise ValueError(
            f"expected x [B, T, n] and delta [B, T, m], got {tuple(x.shape)} and {tuple(delta.shape)}"
        )
    if x.dtype not in _DTYPES or delta.dtype not in _DTYPES:
        raise ValueError(f"x and delta must be float32, bfloat16 or float16, got {x.dtype} and {delta.dtype}")
    if x.device != delta.device:
        raise ValueError(f"x and delta are on different devices: {x.device} and {delta.device}")
    if x.device.type == "cpu":
        if not _is_interpreted():
            raise ValueError(
                "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before fastsel.kernels runs its "
                "first kernel, or move the tensors to a CUDA device (or use the torch backend, fastsel.engine.linear_math)"
            )
    elif x.device.type != "cuda":
        raise ValueError(
            f"Triton kernels need CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {x.device}"
        )
    # Kernels take strides, so only a non-unit stride along features (poor coalescing) is worth a copy.
    if x.stride(2) != 1 and x.shape[2] > 1:
        x = x.contiguous()
    if delta.stride(2) != 1 and delta.shape[2] > 1:
        delta = delta.contiguous()
    return x, delta


def _int_tensor(value: Tensor, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t


def segments_from_cu_seqlens(cu_seqlens: Tensor, t: int) -> Tensor:
    """int32 [S, 3] (row, start, end) segments from cumulative lengths over row-major flattened [B * T] tokens."""
    cu = _int_tensor(cu_seqlens, "cu_seqlens", cu_seqlens.device).flatten().long()
    if cu.numel() < 2:
        raise ValueError(f"cu_seqlens needs at least 2 offsets, got {cu.numel()}")
    rows = cu[:-1] // t
    return torch.stack([rows, cu[:-1] - rows * t, cu[1:] - rows * t], dim=1).to(torch.int32).contiguous()


def _prepare_ranges(valid_range: Tensor | None, segments: Tensor | None, cu_seqlens: Tensor | None, bsz: int,
                    t: int, device: torch.device) -> Tensor | None:
    """The examples as contiguous int32 [S, 3] (row, start, end) segments on `device`, start/end clamped to
    [0, T]; None: one example per row, all tokens. `valid_range` [B] lengths or [B, 2] [start, end) per row."""
    given = [name for name, v in (("valid_range", valid_range), ("segments", segments), ("cu_seqlens", cu_seqlens))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of valid_range, segments and cu_seqlens, got {given}")
    if cu_seqlens is not None:
        segments = segments_from_cu_seqlens(torch.as_tensor(cu_seqlens, device=device), t)
    if segments is not None:
        seg = _int_tensor(segments, "segments", device)
        if seg.dim() != 2 or seg.shape[1] != 3:
            raise ValueError(f"segments must be [S, 3] (row, start, end), got {tuple(seg.shape)}")
        bounds = seg[:, 1:].clamp(0, t)
        return torch.cat([seg[:, :1], bounds], dim=1).to(torch.int32).contiguous()
    if valid_range is None:
        return None
    vr = _int_tensor(valid_range, "valid_range", device)
    if vr.dim() == 1 and vr.shape[0] == bsz:
        vr = torch.stack([torch.zeros_like(vr), vr], dim=1)
    elif tuple(vr.shape) != (bsz, 2):
        raise ValueError(
            f"valid_range must be [B] lengths or [B, 2] [start, end) with B = {bsz}, got {tuple(vr.shape)}"
        )
    rows = torch.arange(bsz, device=device)[:, None]
    return torch.cat([rows, vr.clamp(0, t)], dim=1).to(torch.int32).contiguous()


def _native_dot(x: Tensor, delta: Tensor) -> bool:
    """Feed tl.dot 16-bit tiles directly when both inputs share a 16-bit dtype (interpreter: fp16 only)."""
    if x.dtype != delta.dtype or x.dtype == torch.float32:
        return False
    return not (_is_interpreted() and x.dtype == torch.bfloat16)


def instantiate_blocks(t: int, m: int, n: int, native_dot: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_M, BLOCK_N, num_warps): a side <= 128 (the LoRA rank) is one padded power-of-2 block.

    The other side gets 128 columns when the small block is <= 64, else 64, keeping the fp32 accumulator at
    <= 8192 values (64 registers a thread at 4 warps); two large sides are tiled 64 x 64. Every block is >= 16,
    as tl.dot requires. Without `native_dot` (fp32 or mixed inputs) tl.dot runs as unrolled fp32 FMAs, which hold
    many more values in registers: there BLOCK_T is 16 and 8 warps share the tile. Compiled ahead of time
    (`aot.py`, Triton 3.6 and 3.9, sm_80/sm_90) that spills nothing, where BLOCK_T = 64 at 4 warps spilled up to
    7 KB a thread on sm_80.
    """
    block_t = 64 if t >= 64 else (32 if t >= 32 else 16)
    pm = max(16, triton.next_power_of_2(m))
    pn = max(16, triton.next_power_of_2(n))
    if pm <= 128 and pn <= 128:
        block_m, block_n = pm, pn
    elif pm <= 128:
        block_m, block_n = pm, (128 if pm <= 64 else 64)
    elif pn <= 128:
        block_m, block_n = (128 if pn <= 64 else 64), pn
    else:
        block_m, block_n = 64, 64
    if not native_dot:
        return 16, block_m, block_n, 8
    return block_t, block_m, block_n, 4


# ---------------------------------------------------------------------------------------------- per-form launches


def instantiate_setup(x: Tensor, delta: Tensor, blocks: tuple[int, int, int] | None = None,
                      ) -> tuple[bool, tuple[int, int, int, int]]:
    """(native 16-bit dot, (BLOCK_T, BLOCK_M, BLOCK_N, num_warps)) of an instantiate-form launch (the norm's, and
    the fused norm + dots of `linear_dot.py`); `blocks` overrides the block sizes (tests)."""
    native = _native_dot(x, delta)
    bt, bm, bn, warps = instantiate_blocks(x.shape[1], delta.shape[2], x.shape[2], native)
    if blocks is not None:
        bt, bm, bn = blocks
    return native, (bt, bm, bn, warps)


def instantiate_launch(
    x: Tensor,
    delta: Tensor,
    norms: Tensor,
    ranges: Tensor | None,
    grads: Tensor | None,
    blocks: tuple[int, int, int] | None = None,
) -> Launch:
    """The instantiate-form launch adding ||G_i||^2 into `norms` (zeroed fp32 [S]) and, with `grads`, writing G_i."""
    native, (bt, bm, bn, warps) = instantiate_setup(x, delta, blocks)
    m, n = delta.shape[2], x.shape[2]
    g = grads if grads is not None else norms  # placeholder pointer when WRITE_GRADS is False
    args = (*site_args(x, delta, ranges, norms), g, g.stride(0) if grads is not None else 0,
            g.stride(1) if grads is not None else 0)
    constexprs = dict(
        HAS_RANGE=ranges is not None,
        WRITE_GRADS=grads is not None,
        NATIVE_DOT=native,
        BLOCK_T=bt,
        BLOCK_M=bm,
        BLOCK_N=bn,
    )
    grid = (norms.shape[0], triton.cdiv(m, bm), triton.cdiv(n, bn))
    return Launch(_instantiate_kernel, grid, args, constexprs, warps)


def outer_block(m: int, n: int) -> int:
    """BLOCK of the T == 1 kernel: the larger side rounded up to a power of 2, within [16, 1024]."""
    return min(1024, max(16, triton.next_power_of_2(max(m, n))))


def outer_launch(x: Tensor, delta: Tensor, norms: Tensor, ranges: Tensor | None) -> Launch:
    """The T == 1 launch writing ||delta||^2 ||x||^2 into `norms`: one program per example, no atomics."""
    constexprs = dict(HAS_RANGE=ranges is not None, BLOCK=outer_block(delta.shape[2], x.shape[2]))
    return Launch(_outer_kernel, (norms.shape[0],), site_args(x, delta, ranges, norms), constexprs, 4)


# ---------------------------------------------------------------------------------------------- public API


def linear_sq_norms(
    x: Tensor,
    delta: Tensor,
    *,
    method: str = "auto",
    write_grads: bool = False,
    valid_range: Tensor | None = None,
    segments: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    max_length: int | None = None,
    _blocks: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Exact per-example ||G_i||_F^2 of a Linear site: (sq_norms [S] fp32, grads [S, m, n] fp32 or None).

    x [B, T, n] and delta [B, T, m] (fp32/bf16/fp16, CUDA, or CPU under TRITON_INTERPRET=1). Examples: one per row
    (S = B), restricted by `valid_range` ([B] lengths or [B, 2] [start, end)), or the token segments of packed
    rows: `segments` int [S, 3] (row, start, end) or `cu_seqlens` [S + 1] over the flattened [B * T] tokens (a
    segment may not cross rows). `max_length` (host int, default T) bounds the segments' lengths: it sizes the Gram
    grid and, with method 'auto', the choice. `method` is 'instantiate', 'gram', 'outer' (T == 1 only) or 'auto':
    the cheapest by the rule of `fastsel.kernels.cost.choose_method` (instantiate ~ L*m*n, Gram ~
    L^2*(m+n), T == 1 -> outer), or 'instantiate' when `write_grads` asks for the per-example gradients, which only
    that form builds. `_blocks` overrides block sizes (tests): (BLOCK_T, BLOCK_M, BLOCK_N) for instantiate,
    (BLOCK_T, BLOCK_K) for gram.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(_METHODS)}")
    x, delta = _check_inputs(x, delta)
    bsz, t, n = x.shape
    m = delta.shape[2]
    if method == "auto":
        method = "instantiate" if write_grads else choose_method(t if max_length is None else max_length, m, n)
    if write_grads and method != "instantiate":
        raise ValueError(f"write_grads needs method 'instantiate' (or 'auto'), got {method!r}")
    if method == "outer" and t != 1:
        raise ValueError(f"the outer-product form is exact only for T == 1, got T = {t}")
    ranges = _prepare_ranges(valid_range, segments, cu_seqlens, bsz, t, x.device)
    count = bsz if ranges is None else ranges.shape[0]
    norms = torch.zeros(count, dtype=torch.float32, device=x.device)
    if count == 0 or t == 0 or m == 0 or n == 0:  # empty sums: nothing to launch
        grads = torch.zeros((count, m, n), dtype=torch.float32, device=x.device) if write_grads else None
        return norms, grads
    grads = None
    if method == "instantiate":
        blocks = (_blocks[0], _blocks[1], _blocks[2]) if _blocks is not None else None
        grads = torch.empty((count, m, n), dtype=torch.float32, device=x.device) if write_grads else None
        launch = instantiate_launch(x, delta, norms, ranges, grads, blocks)
    elif method == "gram":
        bt, bk = (_blocks[0], _blocks[1]) if _blocks is not None else (None, None)
        launch = gram_launch(x, delta, norms, ranges, _native_dot(x, delta), block_t=bt, block_k=bk,
                             max_length=max_length)
    else:
        launch = outer_launch(x, delta, norms, ranges)
    launch()
    return norms, grads


# ------------------------------------------------------------------ self-test cases and the specs of this file


def _check_instantiate(case: Case) -> None:
    """Instantiate form, both LoRA orientations (small side m, then small side n), several tiles, ranges."""
    for i, (n, m) in enumerate(((150, 5), (5, 150))):
        x, d = case.inputs(3, 21, n, m, seed=i)
        got, _ = ops().linear_sq_norms(x, d, method="instantiate", valid_range=case.ranges(PADDED_BOUNDS))
        compare(f"instantiate n={n} m={m}", got, grad_sq_norms(example_grads(x, d, padded_spans(PADDED_BOUNDS))))


def _check_outer(case: Case) -> None:
    """T == 1: ||delta||^2 ||x||^2, an example whose range excludes the token gives 0."""
    x, d = case.inputs(4, 1, 40, 24, seed=3)
    bounds = ((0, 1), (0, 1), (1, 1), (0, 1))
    got, _ = ops().linear_sq_norms(x, d, method="outer", valid_range=case.ranges(bounds))
    compare("outer (T=1)", got, grad_sq_norms(example_grads(x, d, padded_spans(bounds))))


def _check_write_grads(case: Case, packed: bool = False) -> None:
    """Instantiate with write_grads: the per-example gradients themselves, and their norms."""
    name = "segment_write_grads" if packed else "write_grads"
    x, d = case.inputs(3, 21, 33, 6, seed=24 if packed else 4)
    where = (dict(segments=case.segments(), max_length=21) if packed
             else dict(valid_range=case.ranges(PADDED_BOUNDS)))
    norms, grads = ops().linear_sq_norms(x, d, method="instantiate", write_grads=True, **where)
    ref = example_grads(x, d, PACKED_SPANS if packed else padded_spans(PADDED_BOUNDS))
    if grads is None:
        raise KernelMismatch(f"{name}: no gradients returned")
    compare(f"{name} gradients", grads, ref)
    compare(f"{name} norms", norms, grad_sq_norms(ref))


def _check_segment_instantiate(case: Case) -> None:
    """Packed segments, instantiate form, both LoRA orientations, several tiles."""
    for i, (n, m) in enumerate(((150, 5), (5, 150))):
        x, d = case.inputs(3, 21, n, m, seed=20 + i)
        got, _ = ops().linear_sq_norms(x, d, method="instantiate", segments=case.segments(), max_length=21)
        compare(f"segment_instantiate n={n} m={m}", got, grad_sq_norms(example_grads(x, d, PACKED_SPANS)))


SPECS = (
    KernelSpec("instantiate", "linear_sq_norms", _check_instantiate, (
        AotSite("7b lora_A r=128 T=512 fp32", 512, 128, 4096),
        AotSite("7b lora_B r=16 T=512 bf16", 512, 11008, 16, "bfloat16", "bfloat16"))),
    KernelSpec("outer", "linear_sq_norms", _check_outer, (AotSite("T=1 head", 1, 576, 576, has_range=False),)),
    KernelSpec("write_grads", "linear_sq_norms", _check_write_grads, (
        AotSite("smollm2 lora_A single-pass r=64 T=64 bf16", 64, 64, 576, "bfloat16", "bfloat16",
                write_grads=True),)),
    KernelSpec("segment_instantiate", "linear_sq_norms", _check_segment_instantiate, (
        AotSite("smollm2 packed lora_A 16 seqs in 4096 tokens bf16", 4096, 16, 576, "bfloat16", "bfloat16",
                segments=16, max_length=512),)),
    KernelSpec("segment_write_grads", "linear_sq_norms", partial(_check_write_grads, packed=True)),
)

__all__ = ["SPECS", "instantiate_blocks", "instantiate_launch", "instantiate_setup", "linear_sq_norms", "outer_block", "outer_launch",
           "segments_from_cu_seqlens"]
