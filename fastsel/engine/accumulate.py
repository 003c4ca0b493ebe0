"""Per-parameter accumulation of per-example gradient contributions into exact squared norms.

Every module call that touches a target parameter sends one contribution during backward. A parameter fed by a
single call ("direct") is reduced at once to ||G_i||^2 by the cheapest exact method, so neither its per-example
gradient nor its activations outlive the hook. A parameter fed by several calls (reused modules, tied embeddings,
reentrant checkpointing) needs the norm of the *sum* of its contributions: they are summed as per-example gradients
when those are small enough, otherwise kept and combined by the Gram form with all cross terms.

With reference gradients (the dot pass) each call also adds its exact <G_i, R_k> (`fastsel.engine.dot_math`): dots
are linear, so the calls' dots simply add, or come from the summed per-example gradients when those are built.

Contributions are written as G = sum_t a_t b_t^T over the parameter's [rows, cols] shape:
- Linear weight [out, in]: a = output-grad, b = input;
- Embedding weight [V, d]: a = one-hot(token id) (kept as ids), b = output-grad;
- Linear bias [out]: the per-example gradient sum_t delta_t directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastsel.engine import dot_math, linear_math

# Largest per-example gradient buffer (bytes) a parameter may instantiate when it is fed by several calls.
INSTANTIATE_BUDGET_BYTES = 256 * 2**20

LinearSqNorms = Callable[[Tensor, Tensor], Tensor]
GroupedSqNorms = Callable[[list[Tensor], list[Tensor]], Tensor]
LinearGrads = Callable[[Tensor, Tensor], Tensor]  # (input, output-grad) -> per-example gradients [B, out, in]
# (input, output-grad, references [K, out, in]) -> (squared norms [B], dots [B, K]) of a direct Linear site
LinearSqNormsDots = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
LinearDots = Callable[[Tensor, Tensor, Tensor], Tensor]  # (input, output-grad, references) -> dots [B, K]
GroupedSqNormsDots = Callable[[list[Tensor], list[Tensor], list[Tensor]], tuple[Tensor, Tensor]]


def as_sequence(t: Tensor, batch_size: int, what: str) -> Tensor:
    """View a module input/grad as [B, T, ...] (T = 1 for [B, features]); refuse rows not split by example."""
    if t.shape[0] != batch_size:
        raise NotImplementedError(
            f"{what} has leading dimension {t.shape[0]} but the batch has {batch_size} examples: fastsel cannot "
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


def resolve_deferred(accumulators: list[ParamAccumulator], grouped_sq_norms: GroupedSqNorms,
                     grouped_sq_norms_dots: GroupedSqNormsDots | None = None) -> None:
    """Launch all deferred direct Linear sites at once (grouped by shape inside `grouped_sq_norms`; sites with
    references through `grouped_sq_norms_dots`, which also returns their dots)."""
    waiting = [acc for acc in accumulators if acc.deferred is not None and acc.refs is None]
    if waiting:
        results = grouped_sq_norms([acc.deferred[0] for acc in waiting], [acc.deferred[1] for acc in waiting])
        for acc, sq in zip(waiting, results, strict=True):
            acc.sq, acc.deferred = sq, None
    with_refs = [acc for acc in accumulators if acc.deferred is not None]
    if with_refs:
        if grouped_sq_norms_dots is None:
            raise RuntimeError("internal error: deferred sites with references but no grouped dot function")
        sqs, dots = grouped_sq_norms_dots([acc.deferred[0] for acc in with_refs],
                                          [acc.deferred[1] for acc in with_refs], [acc.refs for acc in with_refs])
        for acc, sq, dot in zip(with_refs, sqs, dots, strict=True):
            acc.sq, acc.deferred = sq, None
            acc._add_dots(dot)


def embedding_grads(ids: Tensor, delta: Tensor, num_rows: int) -> Tensor:
    """Per-example Embedding gradient [B, V, d] in fp32: row v = sum of delta_t over positions with id_t = v."""
    b, t, d = delta.shape
    grads = delta.new_zeros((b * num_rows, d), dtype=torch.float32)
    rows = (ids + num_rows * torch.arange(b, device=ids.device)[:, None]).reshape(-1)
    grads.index_add_(0, rows, delta.reshape(-1, d).float())
    return grads.view(b, num_rows, d)


class ParamAccumulator:
    """Exact per-example squared gradient norm of one parameter from its module-call contributions."""

    def __init__(self, shape: tuple[int, ...], batch_size: int, expected_calls: int, keep_grads: bool,
                 linear_sq_norms: LinearSqNorms, defer: bool = False,
                 linear_grads: LinearGrads = linear_math.per_example_grads, refs: Tensor | None = None,
                 linear_sq_norms_dots: LinearSqNormsDots = dot_math.sq_norms_and_dots,
                 linear_dots: LinearDots = dot_math.linear_dots) -> None:
        self.shape = shape
        self.batch_size = batch_size
        self.direct = expected_calls == 1 and not keep_grads
        self.keep_grads = keep_grads
        self.linear_sq_norms = linear_sq_norms
        self.linear_grads = linear_grads
        self.calls = 0
        self.defer = defer  # direct Linear sites kept for one grouped launch after backward
        self.deferred: tuple[Tensor, Tensor] | None = None  # (input, output-grad) awaiting that launch
        self.sq: Tensor | None = None  # direct mode result
        self.grads: Tensor | None = None  # summed per-example gradients [B, *shape] (fp32)
        self.sites: list[tuple[Tensor, Tensor]] = []  # kept (a, b) factors for the mixed Gram form
        self.refs = refs  # [K, *shape] fp32 reference gradients (dot pass), or None
        self.linear_sq_norms_dots = linear_sq_norms_dots
        self.linear_dots = linear_dots
        self.dots_sum: Tensor | None = None  # [B, K] dots of the calls not kept as per-example gradients
        numel = 1
        for s in shape:
            numel *= s
        self.instantiate_ok = keep_grads or batch_size * numel * 4 <= INSTANTIATE_BUDGET_BYTES

    def _add_grads(self, g: Tensor) -> None:
        self.grads = g if self.grads is None else self.grads + g

    def _add_dots(self, d: Tensor) -> None:
        self.dots_sum = d if self.dots_sum is None else self.dots_sum + d

    def _call_dots(self, role: str, a: Tensor, b: Tensor) -> Tensor:
        """This call's <G_i, R_k> [B, K] without its per-example gradient (roles as in `add`)."""
        if role == "linear.weight":
            return self.linear_dots(b, a, self.refs)
        return dot_math.reduce_tokens(dot_math.embedding_token_dots(a, b, self.refs))

    def add(self, role: str, inp: Tensor, grad_out: Tensor) -> None:
        """Take one module call's contribution (role: 'linear.weight', 'linear.bias' or 'embedding.weight')."""
        self.calls += 1
        delta = as_sequence(grad_out, self.batch_size, "an output gradient")
        if role == "linear.bias":
            self._add_grads(delta.float().sum(dim=1))
            return
        if role == "linear.weight":
            a, b = delta, as_sequence(inp, self.batch_size, "a Linear input")
        elif role == "embedding.weight":
            a, b = as_sequence(inp, self.batch_size, "an Embedding input"), delta
        else:
            raise ValueError(f"unknown parameter role {role!r}")
        if self.direct and role == "linear.weight" and self.defer:
            self.deferred = (b, a)
        elif self.direct and role == "linear.weight" and self.refs is not None:
            self.sq, dots = self.linear_sq_norms_dots(b, a, self.refs)
            self._add_dots(dots)
        elif self.direct and role == "linear.weight":
            self.sq = self.linear_sq_norms(b, a)
        elif self.direct and not self.instantiate_ok:
            self.sq = mixed_gram_sq_norms([(a, b)])
            if self.refs is not None:
                self._add_dots(self._call_dots(role, a, b))
        elif self.instantiate_ok:  # dots, if any, from the summed gradients in `dots()`
            if role == "linear.weight":
                self._add_grads(self.linear_grads(b, a))
            else:
                self._add_grads(embedding_grads(a, b, self.shape[0]))
        else:
            self.sites.append((a, b))
            if self.refs is not None:
                self._add_dots(self._call_dots(role, a, b))

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
            parts.append(mixed_gram_sq_norms(self.sites))
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
