"""Exact per-example gradient dots <G_i, R_k> of a Linear-like site with K reference gradients, as Triton kernels.

For x [B, T, n], delta [B, T, m] and references R [K, m, n] (fp32), example i's weight gradient is
G_i = sum_t delta_t x_t^T, and its dot with R_k is sum_t delta_t^T R_k x_t. Equal to the torch reference
`fastsel.engine.dot_math` up to fp32 summation order. Two forms:

- instantiate (`_instantiate_dot_kernel`): the tile of G_i is accumulated over T in fp32 registers exactly as the
  norm's instantiate kernel does; then, for every k, the matching R_k tile is loaded and dotted with it in
  registers, and the tile's partial dot is atomically added into dots[b, k]. With `WITH_NORM` the same program
  also adds ||tile||^2 into norms[b]: the norm and the dots of a LoRA site in one launch, G_i never stored.
- project (`_project_dot_kernel`): for sites whose norm takes the Gram (or T == 1) form, the per-token
  contraction delta_t^T (R_k x_t): one program per (example, k, m-tile) projects a token block of x onto the
  R_k rows of its m-tile (tl.dot over n chunks), multiplies by the delta tile and reduces. Cost ~ T m n per k.

Grouping: sites of one shape are concatenated along the batch (G*B rows, as `grouped.py` does for norms) and
their references stacked [G, K, m, n]; example i reads the references of site i // S (S examples per site).
Products are fp32 ("ieee", no tf32): x and delta tiles are cast to fp32, as the references are fp32.

Examples are token segments, as for the norms (`linear_norm.py`): one per row (`valid_range` restricting a
padded row to its tokens) or several per row (`segments` int [S, 3] (row, start, end), packed rows), read with
the shared `token_range.segment_range`; the kernels start with the norms' argument prefix (`launch.site_args`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import choose_method
from .gram_norm import gram_launch
from .grouped import _repeat_segments
from .launch import Launch, site_args
from .linear_norm import _check_inputs, _native_dot, _prepare_ranges, instantiate_setup, outer_launch
from .reference import (
    PACKED_SPANS,
    PADDED_BOUNDS,
    Case,
    compare,
    example_grads,
    grad_dots,
    grad_sq_norms,
    ops,
    padded_spans,
)
from .spec import AotSite, KernelSpec
from .token_range import dot_acc, load_tile, segment_range

_METHODS = ("auto", "instantiate", "project")


@triton.jit
def _instantiate_dot_kernel(
    x_ptr, d_ptr, r_ptr, norms_ptr, T, M, N,  # launch.site_args: the site, its segments and sizes,
    stride_xb, stride_xt, stride_xn, stride_db, stride_dt, stride_dm, stride_rb,  # and their strides
    ref_ptr, dots_ptr, K, S_GROUP,  # references [G, K, m, n], dots [G*S, K], examples per site
    stride_fg, stride_fk, stride_fm, stride_ob,  # references (unit n stride) and dots strides
    HAS_RANGE: tl.constexpr, WITH_NORM: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (G*S, cdiv(m, BLOCK_M), cdiv(n, BLOCK_N)): tile of G_i; dots[i, k] += <tile, R_k tile> for every k
    (and norms[i] += ||tile||^2 with WITH_NORM)."""
    i = tl.program_id(0).to(tl.int64)
    b, start, end = segment_range(r_ptr, i, stride_rb, T, HAS_RANGE)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        dt = load_tile(d_ptr + b * stride_db, offs_m, offs_t, stride_dm, stride_dt, mask_m, mask_t)  # delta^T
        xt = load_tile(x_ptr + b * stride_xb, offs_t, offs_n, stride_xt, stride_xn, mask_t, mask_n)
        acc = dot_acc(dt, xt, acc, NATIVE_DOT)
    if WITH_NORM:
        tl.atomic_add(norms_ptr + i, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    ref_base = ref_ptr + (i // S_GROUP) * stride_fg
    for k in range(0, K):  # the R_k tiles, dotted with the G_i tile in registers
        rt = load_tile(ref_base + k * stride_fk, offs_m, offs_n, stride_fm, 1, mask_m, mask_n)
        tl.atomic_add(dots_ptr + i * stride_ob + k, tl.sum(tl.sum(acc * rt, axis=1), axis=0))


@triton.jit
def _project_dot_kernel(
    x_ptr, d_ptr, r_ptr, norms_ptr, T, M, N,  # launch.site_args (norms_ptr unused: no norm here),
    stride_xb, stride_xt, stride_xn, stride_db, stride_dt, stride_dm, stride_rb,  # and their strides
    ref_ptr, dots_ptr, K, S_GROUP,  # references [G, K, m, n], dots [G*S, K], examples per site
    stride_fg, stride_fk, stride_fm, stride_ob,  # references (unit n stride) and dots strides
    HAS_RANGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (G*S, K, cdiv(m, BLOCK_M)): dots[i, k] += sum over example i's tokens of delta_t[m-tile] .
    (R_k[m-tile] x_t)."""
    i = tl.program_id(0).to(tl.int64)
    b, start, end = segment_range(r_ptr, i, stride_rb, T, HAS_RANGE)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ref_base = ref_ptr + (i // S_GROUP) * stride_fg + tl.program_id(1) * stride_fk
    acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        proj = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)  # x_t projected on the R_k rows of this m-tile
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            xt = load_tile(x_ptr + b * stride_xb, offs_t, offs_n, stride_xt, stride_xn, mask_t, mask_n)
            rt = load_tile(ref_base, offs_n, offs_m, 1, stride_fm, mask_n, mask_m)  # R_k^T [BLOCK_N, BLOCK_M]
            proj = dot_acc(xt, rt, proj, False)
        d = load_tile(d_ptr + b * stride_db, offs_t, offs_m, stride_dt, stride_dm, mask_t, mask_m)
        acc += proj * d.to(tl.float32)
    tl.atomic_add(dots_ptr + i * stride_ob + tl.program_id(1), tl.sum(tl.sum(acc, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------- launches


def _check_refs(refs: Tensor, m: int, n: int, groups: int, device: torch.device) -> Tensor:
    """[G, K, m, n] fp32 references, contiguous along n, on the inputs' device."""
    if not isinstance(refs, Tensor) or refs.dim() != 4 or tuple(refs.shape[2:]) != (m, n) or refs.shape[0] != groups:
        shape = tuple(refs.shape) if isinstance(refs, Tensor) else type(refs).__name__
        raise ValueError(f"expected references [{groups}, K, {m}, {n}] for this site, got {shape}")
    if refs.device != device:
        raise ValueError(f"references are on {refs.device}, the inputs on {device}")
    refs = refs.float()
    return refs if refs.stride(3) == 1 or n == 1 else refs.contiguous()


def project_blocks(t: int, m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_M, BLOCK_N, num_warps) of the project kernel: blocks >= 16 (tl.dot), at most 64. Its dot
    runs in fp32 ("ieee": unrolled FMAs, many live values), so 8 warps share the tiles: compiled ahead of time
    (`aot.py`, sm_80) 4 warps spilled 152 B a thread at BLOCK_T = 32, 8 warps nothing."""
    block_t = 32 if t >= 32 else 16
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    return block_t, block_m, block_n, 8


def _dot_args(x: Tensor, delta: Tensor, ranges: Tensor | None, norms: Tensor, refs: Tensor, dots: Tensor,
              group: int) -> tuple:
    """The dot kernels' arguments: the norms' prefix (`site_args`), then references, dots, K, examples per site
    and the references' and dots' strides."""
    return (*site_args(x, delta, ranges, norms), refs, dots, refs.shape[1], group,
            refs.stride(0), refs.stride(1), refs.stride(2), dots.stride(0))


def instantiate_dot_launch(x: Tensor, delta: Tensor, refs: Tensor, dots: Tensor, norms: Tensor | None,
                           ranges: Tensor | None, group: int,
                           blocks: tuple[int, int, int] | None = None) -> Launch:
    """The fused launch: dots[i, k] (+ norms[i] when `norms` is given) from the instantiated tile of G_i; `group`
    examples per site (references refs[i // group])."""
    native, (bt, bm, bn, warps) = instantiate_setup(x, delta, blocks)
    m, n = delta.shape[2], x.shape[2]
    nrm = norms if norms is not None else dots  # placeholder pointer when WITH_NORM is False
    constexprs = dict(HAS_RANGE=ranges is not None, WITH_NORM=norms is not None, NATIVE_DOT=native,
                      BLOCK_T=bt, BLOCK_M=bm, BLOCK_N=bn)
    grid = (dots.shape[0], triton.cdiv(m, bm), triton.cdiv(n, bn))
    return Launch(_instantiate_dot_kernel, grid, _dot_args(x, delta, ranges, nrm, refs, dots, group), constexprs,
                  warps)


def project_dot_launch(x: Tensor, delta: Tensor, refs: Tensor, dots: Tensor, ranges: Tensor | None,
                       group: int, blocks: tuple[int, int, int] | None = None) -> Launch:
    """The per-token contraction launch adding sum_t delta_t^T R_k x_t into dots[i, k]."""
    t, n, m = x.shape[1], x.shape[2], delta.shape[2]
    bt, bm, bn, warps = project_blocks(t, m, n)
    if blocks is not None:
        bt, bm, bn = blocks
    constexprs = dict(HAS_RANGE=ranges is not None, BLOCK_T=bt, BLOCK_M=bm, BLOCK_N=bn)
    grid = (dots.shape[0], refs.shape[1], triton.cdiv(m, bm))
    return Launch(_project_dot_kernel, grid, _dot_args(x, delta, ranges, dots, refs, dots, group), constexprs,
                  warps)


def _run(x: Tensor, delta: Tensor, refs: Tensor, ranges: Tensor | None, group: int, *, with_norm: bool,
         method: str, blocks: tuple[int, ...] | None, max_length: int | None = None) -> tuple[Tensor | None, Tensor]:
    """(norms or None, dots [G*S, K]) of checked, batch-concatenated inputs with [G, K, m, n] references and
    `group` examples per site (`ranges`: their segments, or None: one per row)."""
    count, t, n = (x.shape[0] if ranges is None else ranges.shape[0]), x.shape[1], x.shape[2]
    m = delta.shape[2]
    k = refs.shape[1]
    dots = torch.zeros((count, k), dtype=torch.float32, device=x.device)
    norms = torch.zeros(count, dtype=torch.float32, device=x.device) if with_norm else None
    if count == 0 or t == 0 or m == 0 or n == 0 or k == 0:
        return norms, dots
    length = t if max_length is None else max_length
    norm_method = choose_method(length, m, n)
    if method == "auto":  # fused with an instantiating norm; alone, instantiate pays off from K = 2 on
        fused = norm_method == "instantiate" if with_norm else (length > 1 and k > 1)
        method = "instantiate" if fused else "project"
    if method == "instantiate":
        instantiate_dot_launch(x, delta, refs, dots, norms, ranges, group, blocks[:3] if blocks else None)()
        return norms, dots
    if with_norm:
        if norm_method == "outer":
            outer_launch(x, delta, norms, ranges)()
        else:
            gram_launch(x, delta, norms, ranges, _native_dot(x, delta), max_length=max_length)()
    project_dot_launch(x, delta, refs, dots, ranges, group, blocks[:3] if blocks else None)()
    return norms, dots


def _single_site(x: Tensor, delta: Tensor, refs: Tensor, method: str, valid_range: Tensor | None,
                 segments: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, int]:
    """Checked inputs of one site: (x, delta, references [1, K, m, n], segments or None, examples)."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(_METHODS)}")
    x, delta = _check_inputs(x, delta)
    refs = _check_refs(refs[None] if isinstance(refs, Tensor) else refs, delta.shape[2], x.shape[2], 1, x.device)
    ranges = _prepare_ranges(valid_range, segments, None, x.shape[0], x.shape[1], x.device)
    return x, delta, refs, ranges, x.shape[0] if ranges is None else ranges.shape[0]


def linear_sq_norms_dots(x: Tensor, delta: Tensor, refs: Tensor, *, valid_range: Tensor | None = None,
                         segments: Tensor | None = None, max_length: int | None = None, method: str = "auto",
                         _blocks: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """(||G_i||^2 [S], <G_i, R_k> [S, K]) of one Linear site with references [K, m, n], fp32.

    Examples: one per row (S = B, `valid_range` as for the norms) or `segments` int [S, 3] (row, start, end) with
    `max_length` bounding their lengths (it decides the form). 'auto': where the norm's cost rule instantiates,
    one fused launch; otherwise the norm's Gram/outer kernel plus the project kernel. 'instantiate' / 'project'
    force the dot form (tests).
    """
    x, delta, refs, ranges, count = _single_site(x, delta, refs, method, valid_range, segments)
    return _run(x, delta, refs, ranges, count, with_norm=True, method=method, blocks=_blocks,
                max_length=max_length)


def linear_dots(x: Tensor, delta: Tensor, refs: Tensor, *, valid_range: Tensor | None = None,
                segments: Tensor | None = None, max_length: int | None = None, method: str = "auto",
                _blocks: tuple[int, ...] | None = None) -> Tensor:
    """<G_i, R_k> [S, K] fp32 of one Linear site with references [K, m, n] (no norm); examples as in
    `linear_sq_norms_dots`."""
    x, delta, refs, ranges, count = _single_site(x, delta, refs, method, valid_range, segments)
    return _run(x, delta, refs, ranges, count, with_norm=False, method=method, blocks=_blocks,
                max_length=max_length)[1]


def grouped_linear_sq_norms_dots(xs: Sequence[Tensor], deltas: Sequence[Tensor], refs: Sequence[Tensor], *,
                                 valid_range: Tensor | None = None, segments: Tensor | None = None,
                                 max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-site norms [G, S] and dots [G, S, K] of G sites sharing the batch, one launch (or two) per shape.

    Site g is (xs[g], deltas[g]) with references refs[g] [K, m, n]; `valid_range` or `segments` (with
    `max_length`) are shared by all sites, as in `grouped.grouped_linear_sq_norms`.
    """
    xs, deltas, refs = list(xs), list(deltas), list(refs)
    if not xs or not (len(xs) == len(deltas) == len(refs)):
        raise ValueError(f"need as many x, delta and reference tensors, at least one: got {len(xs)}, "
                         f"{len(deltas)} and {len(refs)}")
    bsz = xs[0].shape[0]
    k = refs[0].shape[0]
    if any(x.shape[0] != bsz or d.shape[0] != bsz for x, d in zip(xs, deltas, strict=True)):
        raise ValueError("all sites must share the batch size B")
    if any(r.shape[0] != k for r in refs):
        raise ValueError("all sites must have the same number K of references")
    groups: dict[tuple, list[int]] = {}
    for i, (x, d) in enumerate(zip(xs, deltas, strict=True)):
        groups.setdefault((tuple(x.shape), tuple(d.shape), x.dtype, d.dtype, x.device), []).append(i)
    device = xs[0].device
    ranges = _prepare_ranges(valid_range, segments, None, bsz, xs[0].shape[1], device)
    count = bsz if ranges is None else ranges.shape[0]
    norms_out = torch.empty((len(xs), count), dtype=torch.float32, device=device)
    dots_out = torch.empty((len(xs), count, k), dtype=torch.float32, device=device)
    for idx in groups.values():
        g = len(idx)
        x = xs[idx[0]] if g == 1 else torch.cat([xs[i] for i in idx], dim=0)
        d = deltas[idx[0]] if g == 1 else torch.cat([deltas[i] for i in idx], dim=0)
        x, d = _check_inputs(x, d)
        site_refs = _check_refs(torch.stack([refs[i] for i in idx]), d.shape[2], x.shape[2], g, x.device)
        site_ranges = None if ranges is None else _repeat_segments(ranges.to(x.device), g, bsz)
        norms, site_dots = _run(x, d, site_refs, site_ranges, count, with_norm=True, method="auto", blocks=None,
                                max_length=max_length)
        for row, site in enumerate(idx):  # int indexing: `out[list]` would copy the list to the GPU (a sync)
            norms_out[site] = norms.view(g, count)[row]
            dots_out[site] = site_dots.view(g, count, k)[row]
    return norms_out, dots_out


# ------------------------------------------------------------------ self-test cases and the specs of this file


def _where(case: Case, packed: bool, bounds: tuple[tuple[int, int], ...] = PADDED_BOUNDS) -> tuple[dict, list]:
    """(the launcher's keyword arguments saying which tokens form which example, the examples as spans)."""
    if packed:
        return dict(segments=case.segments(), max_length=21), list(PACKED_SPANS)
    return dict(valid_range=case.ranges(bounds)), padded_spans(bounds)


def _check_dots(case: Case, packed: bool = False) -> None:
    """Norms and dots with K = 2 references: fused instantiate (LoRA-shaped site), Gram norm + project (square
    site), and the dots alone (project, and instantiate from K = 2), against the fp32 torch reference."""
    where, spans = _where(case, packed)
    for i, (n, m, method) in enumerate(((150, 5, "instantiate"), (33, 40, "project"))):
        x, d = case.inputs(3, 21, n, m, seed=40 + i)
        refs = case.refs(2, m, n, seed=50 + i)
        grads = example_grads(x, d, spans)
        name = f"{'segment_' if packed else ''}dots {method} n={n} m={m}"
        sq, got = ops().linear_sq_norms_dots(x, d, refs, method=method, **where)
        compare(f"{name} norms", sq, grad_sq_norms(grads))
        compare(f"{name} dots", got, grad_dots(grads, refs))
        compare(f"{name} dots alone", ops().linear_dots(x, d, refs, method=method, **where), grad_dots(grads, refs))


def _check_grouped_dots(case: Case, packed: bool = False) -> None:
    """Three sites of two shapes, one launch per shape: per-site norms and dots in order."""
    shapes = ((24, 4), (24, 4), (4, 40))
    pairs = [case.inputs(3, 21, n, m, seed=60 + i) for i, (n, m) in enumerate(shapes)]
    refs = [case.refs(2, m, n, seed=70 + i) for i, (n, m) in enumerate(shapes)]
    where, spans = _where(case, packed, ((0, 21), (5, 21), (0, 11)))
    grads = [example_grads(x, d, spans) for x, d in pairs]
    sq, got = ops().grouped_linear_sq_norms_dots([x for x, _ in pairs], [d for _, d in pairs], refs, **where)
    compare("grouped_dots norms", sq, torch.stack([grad_sq_norms(g) for g in grads]))
    compare("grouped_dots dots", got, torch.stack([grad_dots(g, r) for g, r in zip(grads, refs, strict=True)]))


SPECS = (
    KernelSpec("dots", "linear_sq_norms_dots", _check_dots, (
        AotSite("7b dots lora_B r=16 T=512 bf16 K=2", 512, 11008, 16, "bfloat16", "bfloat16", "instantiate",
                dots=2),
        AotSite("smollm2 dots lora_A r=64 T=128 fp32 K=1", 128, 64, 576, method="instantiate", dots=1),
        AotSite("7b dots full o_proj T=512 bf16 K=2 (project)", 512, 4096, 4096, "bfloat16", "bfloat16",
                "project", dots=2))),
    KernelSpec("grouped_dots", "grouped_linear_sq_norms_dots", _check_grouped_dots),
    KernelSpec("segment_dots", "linear_sq_norms_dots", partial(_check_dots, packed=True), (
        AotSite("smollm2 packed dots lora_A r=16 bf16 K=2", 4096, 16, 576, "bfloat16", "bfloat16", "instantiate",
                segments=16, max_length=512, dots=2),)),
    KernelSpec("segment_grouped_dots", "grouped_linear_sq_norms_dots", partial(_check_grouped_dots, packed=True)),
)

__all__ = ["SPECS", "grouped_linear_sq_norms_dots", "instantiate_dot_launch", "linear_dots", "linear_sq_norms_dots",
           "project_blocks", "project_dot_launch"]
