"""The norm pass: one batched forward and one backward give every example's exact gradient norm.

Data flow: batch -> forward with capture hooks -> per-example losses L_i -> one backward of sum_i L_i (so each
example's output-gradients are exactly its own) -> per-parameter accumulators -> ||grad L_i|| for every i, and,
given reference gradients R_k, <grad L_i, R_k> from the same captured pairs (same forward, same backward).
Backends: `torch` (batched PyTorch math, runs everywhere), `triton` (fused kernels in fastsel.kernels for the
Linear sites), `naive` (one forward+backward per unpadded example: the oracle), `auto` (triton on CUDA, else torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastsel.engine import dot_math, linear_math
from fastsel.engine.accumulate import (
    GroupedSqNorms,
    GroupedSqNormsDots,
    LinearDots,
    LinearGrads,
    LinearSqNorms,
    LinearSqNormsDots,
    ParamAccumulator,
    resolve_deferred,
)
from fastsel.engine.batch import prepare_batch
from fastsel.engine.capture import Capture
from fastsel.engine.losses import check_finite, per_example_losses
from fastsel.engine.model_io import forward_logits, model_device
from fastsel.engine.references import ReferenceLike, References, prepare_references
from fastsel.engine.targets import Target, find_targets

BACKENDS = ("auto", "torch", "triton", "naive")


@dataclass
class NormPass:
    """What one norm pass measured: per-example losses, per-parameter squared norms, optional per-example grads,
    and, with references, per-parameter dots <grad L_i, R_k>."""

    losses: Tensor  # [B] fp32, detached
    sq_norms: dict[str, Tensor]  # parameter name -> [B] fp32
    backend: str
    per_example_grads: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, *shape] (keep_grads only)
    param_dots: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, K] fp32 (reference given only)
    reference_sq_norms: Tensor | None = None  # [K] fp32 ||R_k||^2 (reference given only)
    single_reference: bool = True  # one reference dict was given: `dots` / `cosines` are [B], else [B, K]

    @property
    def norms(self) -> Tensor:
        """Total per-example gradient norm over all covered parameters, [B] fp32."""
        return torch.stack(list(self.sq_norms.values())).sum(dim=0).sqrt()

    def _shaped(self, values: Tensor) -> Tensor:
        return values[:, 0] if self.single_reference else values

    @property
    def dots(self) -> Tensor | None:
        """<grad L_i, R_k> over all covered parameters: [B] for one reference, [B, K] for a list (None without)."""
        if not self.param_dots:
            return None
        return self._shaped(torch.stack(list(self.param_dots.values())).sum(dim=0))

    @property
    def cosines(self) -> Tensor | None:
        """cos(grad L_i, R_k), shaped like `dots`; 0 where either gradient is exactly zero."""
        if not self.param_dots:
            return None
        dots = torch.stack(list(self.param_dots.values())).sum(dim=0)
        denom = self.norms[:, None] * self.reference_sq_norms.sqrt()[None, :]
        return self._shaped(torch.where(denom > 0, dots / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0))


def resolve_backend(backend: str, model: nn.Module) -> str:
    """Map 'auto' to the fastest available backend and reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    from fastsel import kernels

    return "triton" if model_device(model).type == "cuda" and kernels.available() else "torch"


def _valid_range(attention_mask: Tensor) -> Tensor:
    """[B, 2] = [first, last + 1) attended position of each row: the Gram kernel skips blocks outside it."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    attended = attention_mask.bool()
    start = torch.where(attended, positions, attention_mask.shape[1]).min(dim=1).values
    end = torch.where(attended, positions + 1, 0).max(dim=1).values
    return torch.stack([start, end], dim=1)


def _linear_fns(backend: str, attention_mask: Tensor) -> tuple[LinearSqNorms, GroupedSqNorms | None, LinearGrads]:
    """The backend's per-site and grouped squared-norm functions (grouped only for triton) and its per-example
    gradient function (the single-pass step keeps those)."""
    if backend != "triton":
        return linear_math.sq_norms, None, linear_math.per_example_grads
    from fastsel import kernels

    if not kernels.available():
        raise RuntimeError(
            "backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); use backend='torch'"
        )
    seq_len = attention_mask.shape[1]
    valid = _valid_range(attention_mask)

    def ranged(t: int) -> Tensor | None:  # the token ranges apply only to sites over the batch's sequence
        return valid if t == seq_len else None

    def per_site(x: Tensor, delta: Tensor) -> Tensor:
        return kernels.linear_sq_norms(x, delta, valid_range=ranged(x.shape[1]))[0]

    def grouped(xs: list[Tensor], deltas: list[Tensor]) -> Tensor:
        if len({x.shape[1] for x in xs}) != 1:
            return torch.stack([per_site(x, d) for x, d in zip(xs, deltas, strict=True)])
        return kernels.grouped_linear_sq_norms(xs, deltas, valid_range=ranged(xs[0].shape[1]))

    def grads(x: Tensor, delta: Tensor) -> Tensor:
        return kernels.linear_sq_norms(x, delta, method="instantiate", write_grads=True,
                                       valid_range=ranged(x.shape[1]))[1]

    return per_site, grouped, grads


def _dot_fns(backend: str, attention_mask: Tensor) -> tuple[LinearSqNormsDots, GroupedSqNormsDots | None,
                                                              LinearDots]:
    """The backend's direct-site (norms and dots), grouped (triton only) and plain Linear dot functions."""
    if backend != "triton":
        return dot_math.sq_norms_and_dots, None, dot_math.linear_dots
    from fastsel import kernels

    seq_len = attention_mask.shape[1]
    valid = _valid_range(attention_mask)

    def ranged(t: int) -> Tensor | None:
        return valid if t == seq_len else None

    def per_site(x: Tensor, delta: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
        return kernels.linear_sq_norms_dots(x, delta, refs, valid_range=ranged(x.shape[1]))

    def grouped(xs: list[Tensor], deltas: list[Tensor], refs: list[Tensor]) -> tuple[Tensor, Tensor]:
        if len({x.shape[1] for x in xs}) != 1:
            parts = [per_site(x, d, r) for x, d, r in zip(xs, deltas, refs, strict=True)]
            return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        return kernels.grouped_linear_sq_norms_dots(xs, deltas, refs, valid_range=ranged(xs[0].shape[1]))

    def dots(x: Tensor, delta: Tensor, refs: Tensor) -> Tensor:
        return kernels.linear_dots(x, delta, refs, valid_range=ranged(x.shape[1]))

    return per_site, grouped, dots


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
                      backend: str = "torch", keep_grads: bool = False,
                      references: References | None = None) -> NormPass:
    """One batched forward+backward with capture hooks; no .grad is written and the model is left as found.

    With `references` every accumulator also forms its parameter's dots from the same captured pairs.
    """
    prepared = prepare_batch(batch, model_device(model))
    batch_size = prepared["input_ids"].shape[0]
    linear_fn, grouped_fn, grads_fn = _linear_fns(backend, prepared["attention_mask"])
    fused_fn, grouped_dots_fn, dots_fn = _dot_fns(backend, prepared["attention_mask"])
    refs = references.tensors if references is not None else {}
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

    with Capture(owned.keys(), sink) as capture:
        logits = forward_logits(model, prepared)
        losses = per_example_losses(logits, prepared["labels"])
        del logits
        capture.counting = False
        for target in targets:
            calls = sum(capture.forward_calls[module] for _, module, _ in target.owners)
            accumulators[target.name] = ParamAccumulator(
                target.shape, batch_size, calls, keep_grads, linear_fn, defer=grouped_fn is not None,
                linear_grads=grads_fn, refs=refs.get(target.name), linear_sq_norms_dots=fused_fn,
                linear_dots=dots_fn)
        batch_grads = backward_keeping_grads(losses.sum(), model, [t.param for t in targets])
    check_finite(losses.detach(), "loss")  # after backward: no host sync between forward and backward
    if grouped_fn is not None:
        resolve_deferred(list(accumulators.values()), grouped_fn, grouped_dots_fn)

    sq_norms: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    dots: dict[str, Tensor] = {}
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
        if references is not None:
            dot = acc.dots()
            dots[target.name] = dot if dot is not None else torch.zeros(batch_size, references.count,
                                                                        device=losses.device)
    return _with_references(NormPass(losses.detach(), sq_norms, backend, kept, dots), references)


def _with_references(result: NormPass, references: References | None) -> NormPass:
    if references is not None:
        result.reference_sq_norms = references.sq_norms
        result.single_reference = references.single
    return result


def naive_norm_pass(batch: Mapping[str, Tensor], model: nn.Module, targets: list[Target],
                    references: References | None = None) -> NormPass:
    """The oracle: for each example alone (padding stripped), forward, backward, and the norm of its gradient
    (and its dots with the references)."""
    prepared = prepare_batch(batch, model_device(model))
    params = [t.param for t in targets]
    losses, rows, dot_rows = [], [], []
    for i in range(prepared["input_ids"].shape[0]):
        keep = prepared["attention_mask"][i].bool()
        n = int(keep.sum())
        single = {
            "input_ids": prepared["input_ids"][i][keep][None],
            "attention_mask": torch.ones(1, n, dtype=torch.long, device=keep.device),
            "labels": prepared["labels"][i][keep][None],
            "position_ids": torch.arange(n, device=keep.device)[None],
        }
        loss = per_example_losses(forward_logits(model, single), single["labels"])[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        losses.append(loss.detach().float())
        rows.append([
            torch.zeros((), device=loss.device) if g is None else g.float().square().sum() for g in grads
        ])
        if references is not None:
            dot_rows.append([
                torch.zeros(references.count, device=loss.device) if g is None
                else dot_math.grads_dots(g[None], references.tensors[t.name])[0]
                for g, t in zip(grads, targets, strict=True)
            ])
    losses_t = torch.stack(losses)
    check_finite(losses_t, "loss")
    sq_norms = {t.name: torch.stack([row[j] for row in rows]) for j, t in enumerate(targets)}
    dots = {t.name: torch.stack([row[j] for row in dot_rows]) for j, t in enumerate(targets)} if dot_rows else {}
    return _with_references(NormPass(losses_t, sq_norms, "naive", param_dots=dots), references)


def norm_pass(batch: Mapping[str, Tensor], model: nn.Module, *, params: str = "trainable",
              backend: str = "auto", keep_grads: bool = False, targets: list[Target] | None = None,
              reference: ReferenceLike | None = None) -> NormPass:
    """Per-example losses and squared gradient norms over the chosen parameters, by the chosen backend.

    `targets` (from `find_targets(model, params)`) skips the parameter discovery when the caller already did it.
    `reference`: a gradient dict {parameter name: tensor} over exactly those parameters (e.g. from
    `fastsel.reference_gradient`), or a list of them: the same forward and backward then also give every
    example's exact <grad L_i, R_k> (`NormPass.dots`, `NormPass.cosines`). A bad reference raises before the
    model runs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = resolve_backend(backend, model)
    targets = find_targets(model, params) if targets is None else targets
    references = None if reference is None else prepare_references(reference, targets, model_device(model))
    if backend == "naive":
        if keep_grads:
            raise ValueError("keep_grads is not available with backend='naive'")
        result = naive_norm_pass(batch, model, targets, references)
    else:
        result = batched_norm_pass(batch, model, targets, backend=backend, keep_grads=keep_grads,
                                   references=references)
    check_finite(result.norms, "gradient norm")
    if references is not None:
        check_finite(torch.stack(list(result.param_dots.values())).sum(dim=0).sum(dim=1), "gradient dot")
    return result


def grad_norms(batch: Mapping[str, Tensor], model: nn.Module, *, params: str = "trainable",
               backend: str = "auto", per_layer: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Exact L2 norm of grad L_i over the selected parameters for every example i, from one batched pass.

    Returns a float32 tensor [B]; with `per_layer=True` also {parameter name: [B] norms} whose squares sum to the
    total's square. The model is left exactly as found (no hooks, no .grad, same modes), also on error. In train
    mode with dropout the norms are exact for the dropout masks drawn in this pass.
    """
    result = norm_pass(batch, model, params=params, backend=backend)
    if per_layer:
        return result.norms, {name: sq.sqrt() for name, sq in result.sq_norms.items()}
    return result.norms
