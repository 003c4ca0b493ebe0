"""Grouped launch: per-example squared gradient norms of many Linear sites at once, one launch per shape.

All sites of one (x shape, delta shape, dtypes) group, e.g. every q_proj lora_A factor of a model, are concatenated
along the batch dim into one [G*B, T, n] / [G*B, T, m] pair and sent to a single kernel launch; the [G*B] result is
viewed as [G, B] (or [G, S] for S token segments shared by all sites), so callers still get per-site (per-layer)
values.

Trade-off: the concatenation copies every input once (G*B*T*(n+m) elements of extra memory and one extra pass over
them) to save G-1 launches. The alternative, a device array of per-site data pointers read inside the kernel, avoids
the copy but needs pointer-chasing loads, which the CPU interpreter does not support. Callers that already hold
the sites stacked can pass one [G, B, T, n] tensor (and [G, B, T, m]): a contiguous one is only viewed, no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from .linear_norm import _prepare_ranges, linear_sq_norms
from .reference import PACKED_SPANS, Case, compare, example_grads, grad_sq_norms, ops, padded_spans
from .spec import KernelSpec


def _repeat_segments(ranges: Tensor | None, g: int, bsz: int) -> Tensor | None:
    """[S, 3] (row, start, end) segments shared by all sites, repeated for the G stacked copies of the batch (the
    copy k's rows shifted by k * B)."""
    if ranges is None or g == 1:
        return ranges
    shift = torch.zeros((g, 1, 3), dtype=ranges.dtype, device=ranges.device)
    shift[:, 0, 0] = torch.arange(g, device=ranges.device) * bsz
    return (ranges[None] + shift).reshape(-1, 3)


def grouped_linear_sq_norms(
    xs: Sequence[Tensor] | Tensor,
    deltas: Sequence[Tensor] | Tensor,
    *,
    method: str = "auto",
    valid_range: Tensor | None = None,
    segments: Tensor | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Per-site, per-example ||G||_F^2 of G sites sharing the batch: [G, B] fp32 ([G, S] with `segments`).

    xs / deltas: lists of x [B, T, n] and delta [B, T, m] (site g is xs[g], deltas[g]), or stacked [G, B, T, n]
    and [G, B, T, m] tensors. Sites are grouped by shape and dtype, one launch per group; the method is chosen
    per group as in `linear_sq_norms`. `valid_range` ([B] or [B, 2]) or `segments` ([S, 3] (row, start, end),
    with `max_length`) say which tokens form which example, shared by all sites.
    """
    if isinstance(xs, Tensor) or isinstance(deltas, Tensor):
        if not (isinstance(xs, Tensor) and isinstance(deltas, Tensor)):
            raise ValueError("pass xs and deltas both as lists or both as stacked [G, B, T, *] tensors")
        if xs.dim() != 4 or deltas.dim() != 4 or xs.shape[:3] != deltas.shape[:3]:
            raise ValueError(
                f"expected stacked xs [G, B, T, n] and deltas [G, B, T, m], got {tuple(xs.shape)} and "
                f"{tuple(deltas.shape)}"
            )
        g, bsz = xs.shape[:2]
        ranges = _prepare_ranges(valid_range, segments, None, bsz, xs.shape[2], xs.device)
        norms, _ = linear_sq_norms(
            xs.reshape(g * bsz, *xs.shape[2:]),
            deltas.reshape(g * bsz, *deltas.shape[2:]),
            method=method,
            segments=_repeat_segments(ranges, g, bsz),
            max_length=max_length,
        )
        return norms.view(g, -1)

    xs, deltas = list(xs), list(deltas)
    if len(xs) != len(deltas) or not xs:
        raise ValueError(f"need as many x as delta tensors, at least one: got {len(xs)} and {len(deltas)}")
    for x, d in zip(xs, deltas, strict=True):
        if not isinstance(x, Tensor) or not isinstance(d, Tensor) or x.dim() != 3 or d.dim() != 3:
            raise ValueError("every site needs x [B, T, n] and delta [B, T, m] tensors")
    bsz = xs[0].shape[0]
    if any(x.shape[0] != bsz or d.shape[0] != bsz for x, d in zip(xs, deltas, strict=True)):
        raise ValueError("all sites must share the batch size B")

    groups: dict[tuple, list[int]] = {}
    for i, (x, d) in enumerate(zip(xs, deltas, strict=True)):
        key = (tuple(x.shape), tuple(d.shape), x.dtype, d.dtype, x.device, d.device)
        groups.setdefault(key, []).append(i)

    ranges = _prepare_ranges(valid_range, segments, None, bsz, xs[0].shape[1], xs[0].device)
    out = torch.empty((len(xs), bsz if ranges is None else ranges.shape[0]), dtype=torch.float32,
                      device=xs[0].device)
    for idx in groups.values():
        if len(idx) == 1:
            x, d = xs[idx[0]], deltas[idx[0]]
        else:
            x = torch.cat([xs[i] for i in idx], dim=0)
            d = torch.cat([deltas[i] for i in idx], dim=0)
        site_ranges = None if ranges is None else _repeat_segments(ranges.to(x.device), len(idx), bsz)
        norms, _ = linear_sq_norms(x, d, method=method, segments=site_ranges, max_length=max_length)
        rows = norms.view(len(idx), -1).to(out.device)
        for row, site in zip(rows, idx, strict=True):  # int indexing: `out[list]` would copy the list to the GPU (a sync)
            out[site] = row
    return out


# ------------------------------------------------------------------ self-test cases and the specs of this file
_SHAPES = ((24, 4), (24, 4), (4, 40))  # (n, m): two same-shape sites (one launch) and a third shape


def _check_grouped(case: Case, packed: bool = False) -> None:
    """One launch for two same-shape sites plus one for a third shape, per-site results in order."""
    t, bounds = (21, None) if packed else (19, ((0, 19), (5, 19), (0, 11)))
    pairs = [case.inputs(3, t, n, m, seed=(30 if packed else 10) + i) for i, (n, m) in enumerate(_SHAPES)]
    where = (dict(segments=case.segments(), max_length=21) if packed
             else dict(valid_range=case.ranges(bounds)))
    got = ops().grouped_linear_sq_norms([x for x, _ in pairs], [d for _, d in pairs], **where)
    spans = PACKED_SPANS if packed else padded_spans(bounds)
    ref = torch.stack([grad_sq_norms(example_grads(x, d, spans)) for x, d in pairs])
    compare("segment_grouped" if packed else "grouped", got, ref)


# the grouped launch is the instantiate / Gram kernels' own launch over stacked sites: no AOT site of its own
SPECS = (
    KernelSpec("grouped", "grouped_linear_sq_norms", _check_grouped),
    KernelSpec("segment_grouped", "grouped_linear_sq_norms", partial(_check_grouped, packed=True)),
)

__all__ = ["SPECS", "grouped_linear_sq_norms"]
