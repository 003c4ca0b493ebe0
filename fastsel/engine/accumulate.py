"""Per-parameter accumulation of per-example gradient contributions into exact squared norms.

Every module call that touches a target parameter sends one contribution during backward. A parameter fed by a
single call ("direct") is reduced at once to ||G_i||^2 by the cheapest exact method, so neither its per-example
gradient nor its activations outlive the hook. A parameter fed by several calls (reused modules, tied embeddings,
reentrant checkpointing) needs the norm of the *sum* of its contributions: they are summed as per-example gradients
when those are small enough, otherwise kept and combined by the Gram form with all cross terms.

With reference gradients (the dot pass) each call also adds its exact <G_i, R_k> (`fastsel.engine.dot_math`): dots
are linear, so the calls' dots simply add, or come from the summed per-example gradients when those are built.

Contributions are written as G = sum_t a_t b_t^T over the parameter's [rows, cols] shape, as the parameter's site
factors them (`fastsel.engine.sites`): a dense [B, T, m] (Linear weight [out, in]: a = output-grad, b = input) or
token ids [B, T] standing for one-hot rows (Embedding weight [V, d]: b = output-grad); or, with no b, a per-token
vector summed over the example's tokens (a bias).

Module inputs and output-gradients arrive per row ([R, N, ...]); the batch's `Segments` say which tokens form which
example: one row each (padded) or a segment of a row (packed, where every sum over t runs over the segment's tokens).
The backend's math handed in (`engine.backends`: torch or Triton) is already bound to those segments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsel.engine import dot_math
from fastsel.engine.backends import TorchMath
from fastsel.engine.segments import Segments
from fastsel.engine.sites import Factors

# Largest per-example gradient buffer (bytes) a parameter may instantiate when it is fed by several calls.
INSTANTIATE_BUDGET_BYTES = 256 * 2**20



def as_sequence(t: Tensor, batch_size: int, what: str) -> Tensor:
    """View a module input/grad as [B, T, ...] (T = 1 for [B, features]); refuse rows not split by example."""
    if t.shape[0] != batch_size:
        raise NotImplementedError(
            f"{what} has leading dimension {t.shape[0]} but the batch has {batch_size} rows: fastsel cannot "
            "attribute its rows to examples (a module that flattens the batch, e.g. a mixture-of-experts router)"
        )
    if t.dim() == 2 and t.dtype.is_floating_point:
        return t.unsqueeze(1)
    return t.reshape(batch_size, -1, *t.shape[-1:]) if t.dtype.is_floating_point else t.reshape(batch_size, -1)


def _inner_a(a_p: Tensor, a_q: Tensor) -> Tensor:
    """[B, Tp, Tq] inner products of row factors, each dense [B, T, m] or token ids [B, T] (one-hot rows)."""
    p_ids, q_ids = not a_p.dtype.is_floating_point, not a_q.dtype.is_floating_point
    if p_ids and q_ids:
        return (a_p[:, :, None] == a_q[:, None, :]).float()
    if p_ids:
        b, tp = a_p.shape
        return torch.gather(a_q.float().transpose(1, 2), 1, a_p[:, :, None].expand(b, tp, a_q.shape[1]))
    if q_ids:
        return _inner_a(a_q, a_p).transpose(1, 2)
    return torch.bmm(a_p.float(), a_q.float().transpose(1, 2))


def mixed_gram_sq_norms(sites: list[tuple[Tensor, Tensor]]) -> Tensor:
    """||sum over sites of sum_t a_t b_t^T||^2 per example, all cross terms included (Gram form, fp32)."""
    total = None
    for p, (a_p, b_p) in enumerate(sites):
        for q in range(p, len(sites)):
            a_q, b_q = sites[q]
            term = (_inner_a(a_p, a_q) * torch.bmm(b_p.float(), b_q.float().transpose(1, 2))).sum(dim=(1, 2))
            term = term if p == q else 2 * term
            total = term if total is None else total + term
    return total


def segment_mixed_gram_sq_norms(sites: list[tuple[Tensor, Tensor]], segments: Segments) -> Tensor:
    """`mixed_gram_sq_norms` of every segment of a packed batch, one segment at a time (sites over [R, N] rows)."""
    return torch.cat([mixed_gram_sq_norms([(a[r:r + 1, s:e], b[r:r + 1, s:e]) for a, b in sites])
                      for r, s, e in segments.spans])


def resolve_deferred(accumulators: list[ParamAccumulator], math: TorchMath) -> None:
    """Launch all deferred direct Linear sites at once (grouped by shape inside `math.grouped_sq_norms`; sites with
    references through `math.grouped_sq_norms_dots`, which also returns their dots)."""
    waiting = [acc for acc in accumulators if acc.deferred is not None and acc.refs is None]
    if waiting:
        results = math.grouped_sq_norms([acc.deferred[0] for acc in waiting], [acc.deferred[1] for acc in waiting])
        for acc, sq in zip(waiting, results, strict=True):
            acc.sq, acc.deferred = sq, None
    with_refs = [acc for acc in accumulators if acc.deferred is not None]
    if with_refs:
        sqs, dots = math.grouped_sq_norms_dots([acc.deferred[0] for acc in with_refs],
                                          [acc.deferred[1] for acc in with_refs], [acc.refs for acc in with_refs])
        for acc, sq, dot in zip(with_refs, sqs, dots, strict=True):
            acc.sq, acc.deferred = sq, None
            acc._add_dots(dot)


def embedding_grads(ids: Tensor, delta: Tensor, num_rows: int, segments: Segments | None = None) -> Tensor:
    """Per-example Embedding gradient [B, V, d] in fp32: row v = sum of delta_t over positions with id_t = v.

    With packed `segments`, example i's positions are segment i's tokens ([S, V, d]; padding tokens dropped)."""
    b, t, d = delta.shape
    if segments is not None and segments.packed:
        count, example = len(segments), segments.example_of_token
        example = torch.where(example >= 0, example, count)  # padding: a bucket that is cut off below
    else:
        count, example = b, torch.arange(b, device=ids.device)[:, None]
    grads = delta.new_zeros(((count + 1) * num_rows, d), dtype=torch.float32)
    rows = (ids + num_rows * example).reshape(-1)
    grads.index_add_(0, rows, delta.reshape(-1, d).float())
    return grads[: count * num_rows].view(count, num_rows, d)


class ParamAccumulator:
    """Exact per-example squared gradient norm of one parameter from its module-call contributions."""

    def __init__(self, shape: tuple[int, ...], segments: Segments, expected_calls: int, keep_grads: bool,
                 math: TorchMath, refs: Tensor | None = None) -> None:
        self.shape = shape
        self.segments = segments
        self.batch_size = segments.num_rows  # rows of the module inputs; examples: len(segments)
        self.direct = expected_calls == 1 and not keep_grads
        self.keep_grads = keep_grads
        self.math = math  # the backend's per-site math (engine.backends)
        self.calls = 0
        self.defer = math.groups  # direct Linear sites kept for one grouped launch after backward
        self.deferred: tuple[Tensor, Tensor] | None = None  # (input, output-grad) awaiting that launch
        self.sq: Tensor | None = None  # direct mode result
        self.grads: Tensor | None = None  # summed per-example gradients [B, *shape] (fp32)
        self.sites: list[tuple[Tensor, Tensor]] = []  # kept (a, b) factors for the mixed Gram form
        self.refs = refs  # [K, *shape] fp32 reference gradients (dot pass), or None
        self.dots_sum: Tensor | None = None  # [B, K] dots of the calls not kept as per-example gradients
        numel = 1
        for s in shape:
            numel *= s
        self.instantiate_ok = keep_grads or len(segments) * numel * 4 <= INSTANTIATE_BUDGET_BYTES

    def _mixed_gram(self, sites: list[tuple[Tensor, Tensor]]) -> Tensor:
        if self.segments.packed:
            return segment_mixed_gram_sq_norms(sites, self.segments)
        return mixed_gram_sq_norms(sites)

    def _add_grads(self, g: Tensor) -> None:
        self.grads = g if self.grads is None else self.grads + g

    def _add_dots(self, d: Tensor) -> None:
        self.dots_sum = d if self.dots_sum is None else self.dots_sum + d

    def _call_dots(self, a: Tensor, b: Tensor) -> Tensor:
        """This call's <G_i, R_k> [B, K] without its per-example gradient (factors as in `add`)."""
        if a.dtype.is_floating_point:
            return self.math.dots(b, a, self.refs)
        return dot_math.reduce_tokens(dot_math.embedding_token_dots(a, b, self.refs), self.segments)

    def add(self, factors: Factors) -> None:
        """Take one module call's contribution: its gradient factors (`fastsel.engine.sites`)."""
        self.calls += 1
        a = as_sequence(factors.a, self.batch_size, "a module's output gradient or input")
        packed = self.segments.packed
        if packed and a.shape[1] != self.segments.width:
            raise NotImplementedError(
                f"a module sees {a.shape[1]} positions per row but the packed batch has {self.segments.width} "
                "tokens per row: fastsel cannot split its rows into the packed sequences; use padded batches")
        if factors.b is None:  # a per-token vector summed over the example's tokens (a bias)
            self._add_grads(self.segments.sum(a) if packed else a.float().sum(dim=1))
            return
        b = as_sequence(factors.b, self.batch_size, "a module's output gradient or input")
        dense = a.dtype.is_floating_point  # else token ids: one-hot rows (an embedding)
        if self.direct and dense and self.defer:
            self.deferred = (b, a)
        elif self.direct and dense and self.refs is not None:
            self.sq, dots = self.math.sq_norms_and_dots(b, a, self.refs)
            self._add_dots(dots)
        elif self.direct and dense:
            self.sq = self.math.sq_norms(b, a)
        elif self.direct and not self.instantiate_ok:
            self.sq = self._mixed_gram([(a, b)])
            if self.refs is not None:
                self._add_dots(self._call_dots(a, b))
        elif self.instantiate_ok:  # dots, if any, from the summed gradients in `dots()`
            self._add_grads(self.math.grads(b, a) if dense else embedding_grads(a, b, self.shape[0], self.segments))
        else:
            self.sites.append((a, b))
            if self.refs is not None:
                self._add_dots(self._call_dots(a, b))

    def sq_norms(self) -> Tensor | None:
        """[B] fp32 squared norms, or None if no call contributed."""
        if self.deferred is not None:
            raise RuntimeError("internal error: a deferred site was never launched")
        parts = []
        if self.sq is not None:
            parts.append(self.sq)
        if self.grads is not None:
            parts.append(self.grads.flatten(1).square().sum(dim=1))
        if self.sites:
            parts.append(self._mixed_gram(self.sites))
        if not parts:
            return None
        if len(parts) > 1:
            raise RuntimeError("internal error: a parameter mixed direct and accumulated contributions")
        return parts[0]

    def dots(self) -> Tensor | None:
        """[B, K] fp32 dots with the references, or None if no call contributed (or no references)."""
        if self.refs is None:
            return None
        if self.deferred is not None:
            raise RuntimeError("internal error: a deferred site was never launched")
        total = self.dots_sum
        if self.grads is not None:
            from_grads = dot_math.grads_dots(self.grads, self.refs)
            total = from_grads if total is None else total + from_grads
        return total


class RowSplit:
    """Two accumulators of one parameter over complementary examples: per-example gradients kept for `keep`
    (examples that can still be selected), squared norms (and dots) only for the rest, so every example's norm is
    exactly what one accumulator over all examples would give. `by_row` (padded batches): each module call's
    input and output gradient are split by row. Otherwise (packed batches, where a row holds several examples)
    both accumulators see the whole rows and their Segments (`Segments.subset`) pick each one's sequences'
    tokens."""

    def __init__(self, keep: Tensor, rest: Tensor, kept: ParamAccumulator, others: ParamAccumulator, *,
                 by_row: bool = True) -> None:
        self.keep, self.rest = keep, rest
        self.kept, self.others = kept, others
        self.by_row = by_row

    def add(self, factors: Factors) -> None:
        if not self.by_row:
            self.kept.add(factors)
            self.others.add(factors)
            return
        for rows, acc in ((self.keep, self.kept), (self.rest, self.others)):
            acc.add(Factors(*(None if f is None else f.index_select(0, rows.to(f.device)) for f in factors)))

    def _merge(self, kept: Tensor | None, others: Tensor | None) -> Tensor | None:
        """Per-example values of the two halves ([n, *]) put back in example order ([B, *])."""
        if kept is None and others is None:
            return None
        ref = kept if kept is not None else others
        out = ref.new_zeros((self.keep.numel() + self.rest.numel(), *ref.shape[1:]))
        if kept is not None:
            out[self.keep.to(out.device)] = kept
        if others is not None:
            out[self.rest.to(out.device)] = others
        return out

    def sq_norms(self) -> Tensor | None:
        """[B] fp32 squared norms of all examples (None if no call contributed)."""
        return self._merge(self.kept.sq_norms(), self.others.sq_norms())

    def dots(self) -> Tensor | None:
        """[B, K] fp32 dots of all examples with the references (None without references or contributions)."""
        return self._merge(self.kept.dots(), self.others.dots())

    @property
    def grads(self) -> Tensor | None:
        """Per-example gradients of the kept rows, [len(keep), *shape] (in the order of `keep`)."""
        return self.kept.grads
