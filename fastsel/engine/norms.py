"""The norm pass: one batched forward and one backward give every example's exact gradient norm.

Data flow: batch -> forward with capture hooks -> per-example losses L_i -> one backward of sum_i L_i (so each
example's output-gradients are exactly its own) -> per-parameter accumulators -> ||grad L_i|| for every i.
Backends: `torch` (batched PyTorch math, runs everywhere), `triton` (fused kernels in fastsel.kernels for the
Linear sites), `naive` (one forward+backward per unpadded example: the oracle), `auto` (triton on CUDA, else torch).
Padded and packed batches go the same way: the batch's `Segments` (fastsel.engine.segments) say which tokens form
each example, and every per-example sum runs over those tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastsel.engine import linear_math
from fastsel.engine.accumulate import (
    GroupedSqNorms,
    LinearGrads,
    LinearSqNorms,
    ParamAccumulator,
    resolve_deferred,
)
from fastsel.engine.batch import prepare_batch
from fastsel.engine.capture import Capture
from fastsel.engine.losses import check_finite, per_example_losses, token_statistics
from fastsel.engine.model_io import forward_logits, model_device
from fastsel.engine.segments import Segments
from fastsel.engine.targets import Target, find_targets

BACKENDS = ("auto", "torch", "triton", "naive")


@dataclass
class NormPass:
    """What one norm pass measured: per-example losses, per-parameter squared norms, optional per-example grads."""

    losses: Tensor  # [B] fp32, detached (B = examples: rows, or the sequences of a packed batch)
    sq_norms: dict[str, Tensor]  # parameter name -> [B] fp32
    backend: str
    per_example_grads: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, *shape] (keep_grads only)
    token_stats: dict[str, Tensor] = field(default_factory=dict)  # losses.token_statistics (token_stats only)
    tokens: Tensor | None = None  # [B] tokens of each example (its sequence length)

    @property
    def norms(self) -> Tensor:
        """Total per-example gradient norm over all covered parameters, [B] fp32."""
        return torch.stack(list(self.sq_norms.values())).sum(dim=0).sqrt()


def resolve_backend(backend: str, model: nn.Module) -> str:
    """Map 'auto' to the fastest available backend and reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    from fastsel import kernels

    return "triton" if model_device(model).type == "cuda" and kernels.available() else "torch"


def _linear_fns(backend: str, segments: Segments) -> tuple[LinearSqNorms, GroupedSqNorms | None, LinearGrads]:
    """The backend's per-site and grouped squared-norm functions (grouped only for triton) and its per-example
    gradient function (the single-pass step keeps those), bound to the batch's examples."""
    if backend != "triton":
        if not segments.packed:
            return linear_math.sq_norms, None, linear_math.per_example_grads
        return (lambda x, d: linear_math.segment_sq_norms(x, d, segments), None,
                lambda x, d: linear_math.segment_grads(x, d, segments))
    from fastsel import kernels

    if not kernels.available():
        raise RuntimeError(
            "backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); use backend='torch'"
        )
    seq_len = segments.width
    ranges = segments.ranges
    # the longest example bounds the Gram grid and decides the form (padded: the row width, known without a sync)
    length = segments.max_length if segments.packed else None

    def ranged(t: int) -> Tensor | None:  # the segments apply only to sites over the batch's tokens
        return ranges if t == seq_len else None

    def longest(t: int) -> int | None:
        return length if t == seq_len else None

    def per_site(x: Tensor, delta: Tensor) -> Tensor:
        t = x.shape[1]
        return kernels.linear_sq_norms(x, delta, segments=ranged(t), max_length=longest(t))[0]

    def grouped(xs: list[Tensor], deltas: list[Tensor]) -> Tensor:
        if len({x.shape[1] for x in xs}) != 1:
            return torch.stack([per_site(x, d) for x, d in zip(xs, deltas, strict=True)])
        t = xs[0].shape[1]
        return kernels.grouped_linear_sq_norms(xs, deltas, segments=ranged(t), max_length=longest(t))

    def grads(x: Tensor, delta: Tensor) -> Tensor:
        return kernels.linear_sq_norms(x, delta, method="instantiate", write_grads=True,
                                       segments=ranged(x.shape[1]))[1]

    return per_site, grouped, grads


def backward_keeping_grads(total: Tensor, model: nn.Module, params: list[Tensor]) -> list[Tensor | None]:
    """Backward of `total`; return the targets' batch gradients and leave every `.grad` as it was before.

    Plain `.backward()` rather than `torch.autograd.grad`, because reentrant gradient checkpointing supports only
    the former; the user's `.grad` tensors are set aside first and put back afterwards, also on error.
    """
    leaves = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in leaves]
    try:
        for p in leaves:
            p.grad = None
        total.backward()
        return [p.grad for p in params]
    finally:
        for p, g in zip(leaves, saved, strict=True):
            p.grad = g


def batched_norm_pass(batch: Mapping[str, Tensor], model: nn.Module, targets: list[Target], *,
                      backend: str = "torch", keep_grads: bool = False, token_stats: bool = False) -> NormPass:
    """One batched forward+backward with capture hooks; no .grad is written and the model is left as found."""
    prepared = prepare_batch(batch, model_device(model))
    segments: Segments = prepared["segments"]
    batch_size = len(segments)
    linear_fn, grouped_fn, grads_fn = _linear_fns(backend, segments)
    owned: dict[nn.Module, list[tuple[str, str]]] = {}
    for target in targets:
        for _, module, role in target.owners:
            owned.setdefault(module, []).append((target.name, role))
    accumulators: dict[str, ParamAccumulator] = {}

    def sink(module: nn.Module, inp: Tensor, grad_out: Tensor) -> None:
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            grad_out = grad_out.masked_fill((inp == module.padding_idx)[..., None], 0.0)
        for name, role in owned[module]:
            accumulators[name].add(role, inp, grad_out)

    stats: dict[str, Tensor] = {}
    with Capture(owned.keys(), sink) as capture:
        logits = forward_logits(model, prepared)
        losses = per_example_losses(logits, prepared["labels"], segments)
        if token_stats:
            stats = token_statistics(logits, prepared["labels"], segments)
        del logits
        capture.counting = False
        for target in targets:
            calls = sum(capture.forward_calls[module] for _, module, _ in target.owners)
            accumulators[target.name] = ParamAccumulator(target.shape, segments, calls, keep_grads, linear_fn,
                                                         defer=grouped_fn is not None, linear_grads=grads_fn)
        batch_grads = backward_keeping_grads(losses.sum(), model, [t.param for t in targets])
    check_finite(losses.detach(), "loss")  # after backward: no host sync between forward and backward
    if grouped_fn is not None:
        resolve_deferred(list(accumulators.values()), grouped_fn)

    sq_norms: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    for target, batch_grad in zip(targets, batch_grads, strict=True):
        acc = accumulators[target.name]
        sq = acc.sq_norms()
        if sq is None:
            if batch_grad is not None and bool(batch_grad.ne(0).any()):
                raise RuntimeError(
                    f"parameter {target.name!r} received a gradient that did not pass through the modules fastsel "
                    "hooks (it is used outside its nn.Linear/nn.Embedding module): cannot form its per-example norm"
                )
            sq = torch.zeros(batch_size, device=losses.device)
            if keep_grads:
                kept[target.name] = torch.zeros((batch_size, *target.shape), device=losses.device)
        elif keep_grads:
            kept[target.name] = acc.grads
        sq_norms[target.name] = sq
    return NormPass(losses.detach(), sq_norms, backend, kept, stats, _token_counts(segments))


def _token_counts(segments: Segments) -> Tensor:
    return segments.sum(torch.ones((segments.num_rows, segments.width, 1), device=segments.device))[:, 0]


def _examples_alone(prepared: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every example of a prepared batch as a batch of its own: its tokens only (no padding, no other sequence)."""
    segments: Segments = prepared["segments"]
    singles = []
    for i in range(len(segments)):
        if segments.packed:
            r, s, e = segments.spans[i]
            ids, labels = prepared["input_ids"][r, s:e], prepared["labels"][r, s:e]
        else:
            keep = prepared["attention_mask"][i].bool()
            ids, labels = prepared["input_ids"][i][keep], prepared["labels"][i][keep]
        n = ids.shape[0]
        singles.append({"input_ids": ids[None], "attention_mask": torch.ones(1, n, dtype=torch.long,
                                                                             device=ids.device),
                        "labels": labels[None], "position_ids": torch.arange(n, device=ids.device)[None]})
    return singles


def naive_norm_pass(batch: Mapping[str, Tensor], model: nn.Module, targets: list[Target]) -> NormPass:
    """The oracle: for each example alone (padding and other sequences stripped), forward, backward, and the norm
    of its gradient."""
    prepared = prepare_batch(batch, model_device(model))
    params = [t.param for t in targets]
    losses, rows = [], []
    for single in _examples_alone(prepared):
        loss = per_example_losses(forward_logits(model, single), single["labels"])[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        losses.append(loss.detach().float())
        rows.append([
            torch.zeros((), device=loss.device) if g is None else g.float().square().sum() for g in grads
        ])
    losses_t = torch.stack(losses)
    check_finite(losses_t, "loss")
    sq_norms = {t.name: torch.stack([row[j] for row in rows]) for j, t in enumerate(targets)}
    return NormPass(losses_t, sq_norms, "naive", tokens=_token_counts(prepared["segments"]))


def norm_pass(batch: Mapping[str, Tensor], model: nn.Module, *, params: str = "trainable",
              backend: str = "auto", keep_grads: bool = False, targets: list[Target] | None = None,
              token_stats: bool = False) -> NormPass:
    """Per-example losses and squared gradient norms over the chosen parameters, by the chosen backend.

    `batch`: padded or packed (fastsel.engine.batch); on a packed batch every sequence is one example, in order of
    appearance. `targets` (from `find_targets(model, params)`) skips the parameter discovery when the caller
    already did it. `token_stats` also returns `losses.token_statistics` (entropy, top-1 hits, supervised tokens
    per example; not with backend='naive').
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = resolve_backend(backend, model)
    targets = find_targets(model, params) if targets is None else targets
    if backend == "naive":
        if keep_grads or token_stats:
            raise ValueError("keep_grads and token_stats are not available with backend='naive'")
        result = naive_norm_pass(batch, model, targets)
    else:
        result = batched_norm_pass(batch, model, targets, backend=backend, keep_grads=keep_grads,
                                   token_stats=token_stats)
    check_finite(result.norms, "gradient norm")
    return result


def grad_norms(batch: Mapping[str, Tensor], model: nn.Module, *, params: str = "trainable",
               backend: str = "auto", per_layer: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Exact L2 norm of grad L_i over the selected parameters for every example i, from one batched pass.

    `batch`: padded ([B, T] with attention_mask) or packed (position_ids restarting per sequence: one example per
    sequence, in order of appearance). Returns a float32 tensor [B]; with `per_layer=True` also {parameter name: [B] norms} whose squares sum to the
    total's square. The model is left exactly as found (no hooks, no .grad, same modes), also on error. In train
    mode with dropout the norms are exact for the dropout masks drawn in this pass.
    """
    result = norm_pass(batch, model, params=params, backend=backend)
    if per_layer:
        return result.norms, {name: sq.sqrt() for name, sq in result.sq_norms.items()}
    return result.norms
