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

A `valid_range` ([B] lengths, or [B, 2] [start, end) per example) restricts each example to its valid tokens:
blocks wholly outside the range are skipped, and tokens outside it do not count (padded positions normally have
delta = 0, so the result is the same as without the range, only cheaper).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import choose_method
from .gram_norm import gram_launch
from .launch import Launch
from .token_range import example_token_range

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_METHODS = ("auto", "instantiate", "gram", "outer")


@triton.jit
def _instantiate_kernel(
    x_ptr,
    d_ptr,
    r_ptr,
    norms_ptr,
    g_ptr,
    T,
    M,
    N,
    stride_xb,
    stride_xt,
    stride_xn,
    stride_db,
    stride_dt,
    stride_dm,
    stride_rb,
    stride_gb,
    stride_gm,
    HAS_RANGE: tl.constexpr,
    WRITE_GRADS: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (B, cdiv(m, BLOCK_M), cdiv(n, BLOCK_N)): tile of G_b = sum_t delta_t x_t^T; norms_sq[b] += ||tile||^2."""
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start, end = example_token_range(r_ptr, b, stride_rb, T, HAS_RANGE)
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
        d = tl.load(  # delta^T tile [BLOCK_M, BLOCK_T]
            d_base + offs_m[:, None] * stride_dm + offs_t[None, :] * stride_dt,
            mask=mask_m[:, None] & mask_t[None, :],
            other=0.0,
        )
        xt = tl.load(  # x tile [BLOCK_T, BLOCK_N]
            x_base + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
            mask=mask_t[:, None] & mask_n[None, :],
            other=0.0,
        )
        if NATIVE_DOT:  # 16-bit products are exact in fp32: tensor cores, fp32 accumulation
            acc = tl.dot(d, xt, acc)
        else:  # "ieee": no tf32 rounding of fp32 inputs
            acc = tl.dot(d.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")

    tl.atomic_add(norms_ptr + b, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if WRITE_GRADS:  # grads is a fresh contiguous [B, m, n] fp32 tensor: unit stride along n
        g_ptrs = g_ptr + b * stride_gb + offs_m[:, None] * stride_gm + offs_n[None, :]
        tl.store(g_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _outer_kernel(
    x_ptr,
    d_ptr,
    r_ptr,
    norms_ptr,
    M,
    N,
    stride_xb,
    stride_xn,
    stride_db,
    stride_dm,
    stride_rb,
    HAS_RANGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (B,), T == 1: norms_sq[b] = ||delta_b||^2 * ||x_b||^2 (0 when the example's range excludes t = 0)."""
    b = tl.program_id(0).to(tl.int64)
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
        start = tl.load(r_ptr + b * stride_rb)
        end = tl.load(r_ptr + b * stride_rb + 1)
        res = tl.where((start <= 0) & (end > 0), res, 0.0)
    tl.store(norms_ptr + b, res)


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


def _prepare_ranges(valid_range: Tensor | None, bsz: int, t: int, device: torch.device) -> Tensor | None:
    """[B] lengths or [B, 2] [start, end) -> contiguous int32 [B, 2] clamped to [0, T] on `device` (None: all)."""
    if valid_range is None:
        return None
    vr = torch.as_tensor(valid_range, device=device)
    if vr.dtype.is_floating_point or vr.dtype.is_complex or vr.dtype == torch.bool:
        raise ValueError(f"valid_range must hold integers, got {vr.dtype}")
    if vr.dim() == 1 and vr.shape[0] == bsz:
        vr = torch.stack([torch.zeros_like(vr), vr], dim=1)
    elif tuple(vr.shape) != (bsz, 2):
        raise ValueError(
            f"valid_range must be [B] lengths or [B, 2] [start, end) with B = {bsz}, got {tuple(vr.shape)}"
        )
    return vr.clamp(0, t).to(torch.int32).contiguous()


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


def instantiate_launch(
    x: Tensor,
    delta: Tensor,
    norms: Tensor,
    ranges: Tensor | None,
    grads: Tensor | None,
    blocks: tuple[int, int, int] | None = None,
) -> Launch:
    """The instantiate-form launch adding ||G_i||^2 into `norms` (zeroed fp32 [B]) and, with `grads`, writing G_i."""
    bsz, t, n = x.shape
    m = delta.shape[2]
    native = _native_dot(x, delta)
    bt, bm, bn, warps = instantiate_blocks(t, m, n, native)
    if blocks is not None:
        bt, bm, bn = blocks
    g = grads if grads is not None else norms  # placeholder pointer when WRITE_GRADS is False
    r = ranges if ranges is not None else norms  # placeholder pointer when HAS_RANGE is False
    args = (
        x,
        delta,
        r,
        norms,
        g,
        t,
        m,
        n,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        delta.stride(0),
        delta.stride(1),
        delta.stride(2),
        r.stride(0) if ranges is not None else 0,
        g.stride(0) if grads is not None else 0,
        g.stride(1) if grads is not None else 0,
    )
    constexprs = dict(
        HAS_RANGE=ranges is not None,
        WRITE_GRADS=grads is not None,
        NATIVE_DOT=native,
        BLOCK_T=bt,
        BLOCK_M=bm,
        BLOCK_N=bn,
    )
    grid = (bsz, triton.cdiv(m, bm), triton.cdiv(n, bn))
    return Launch(_instantiate_kernel, grid, args, constexprs, warps)


def outer_block(m: int, n: int) -> int:
    """BLOCK of the T == 1 kernel: the larger side rounded up to a power of 2, within [16, 1024]."""
    return min(1024, max(16, triton.next_power_of_2(max(m, n))))


def outer_launch(x: Tensor, delta: Tensor, norms: Tensor, ranges: Tensor | None) -> Launch:
    """The T == 1 launch writing ||delta||^2 ||x||^2 into `norms`: one program per example, no atomics."""
    bsz, _, n = x.shape
    m = delta.shape[2]
    r = ranges if ranges is not None else norms
    args = (
        x,
        delta,
        r,
        norms,
        m,
        n,
        x.stride(0),
        x.stride(2),
        delta.stride(0),
        delta.stride(2),
        r.stride(0) if ranges is not None else 0,
    )
    return Launch(_outer_kernel, (bsz,), args, dict(HAS_RANGE=ranges is not None, BLOCK=outer_block(m, n)), 4)


# ---------------------------------------------------------------------------------------------- public API


def linear_sq_norms(
    x: Tensor,
    delta: Tensor,
    *,
    method: str = "auto",
    write_grads: bool = False,
    valid_range: Tensor | None = None,
    _blocks: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Exact per-example ||G_i||_F^2 of a Linear site: (sq_norms [B] fp32, grads [B, m, n] fp32 or None).

    x [B, T, n] and delta [B, T, m] (fp32/bf16/fp16, CUDA, or CPU under TRITON_INTERPRET=1). `method` is
    'instantiate', 'gram', 'outer' (T == 1 only) or 'auto': the cheapest by the rule of
    `fastsel.engine.linear_math.choose_method` (instantiate ~ T*m*n, Gram ~ T^2*(m+n), T == 1 -> outer), or
    'instantiate' when `write_grads` asks for the per-example gradients, which only that form builds.
    `valid_range`: optional [B] lengths or [B, 2] [start, end) token ranges; tokens outside do not count.
    `_blocks` overrides block sizes (tests): (BLOCK_T, BLOCK_M, BLOCK_N) for instantiate, (BLOCK_T, BLOCK_K) for gram.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(_METHODS)}")
    x, delta = _check_inputs(x, delta)
    bsz, t, n = x.shape
    m = delta.shape[2]
    if method == "auto":
        method = "instantiate" if write_grads else choose_method(t, m, n)
    if write_grads and method != "instantiate":
        raise ValueError(f"write_grads needs method 'instantiate' (or 'auto'), got {method!r}")
    if method == "outer" and t != 1:
        raise ValueError(f"the outer-product form is exact only for T == 1, got T = {t}")
    ranges = _prepare_ranges(valid_range, bsz, t, x.device)
    norms = torch.zeros(bsz, dtype=torch.float32, device=x.device)
    if bsz == 0 or t == 0 or m == 0 or n == 0:  # empty sums: nothing to launch
        grads = torch.zeros((bsz, m, n), dtype=torch.float32, device=x.device) if write_grads else None
        return norms, grads
    grads = None
    if method == "instantiate":
        blocks = (_blocks[0], _blocks[1], _blocks[2]) if _blocks is not None else None
        grads = torch.empty((bsz, m, n), dtype=torch.float32, device=x.device) if write_grads else None
        launch = instantiate_launch(x, delta, norms, ranges, grads, blocks)
    elif method == "gram":
        bt, bk = (_blocks[0], _blocks[1]) if _blocks is not None else (None, None)
        launch = gram_launch(x, delta, norms, ranges, _native_dot(x, delta), block_t=bt, block_k=bk)
    else:
        launch = outer_launch(x, delta, norms, ranges)
    launch()
    return norms, grads


__all__ = ["instantiate_blocks", "instantiate_launch", "linear_sq_norms", "outer_block", "outer_launch"]
