"""The norm pass: one batched forward and one backward give every example's exact gradient norm.

Data flow: batch -> forward with capture hooks -> per-example losses L_i -> one backward of sum_i L_i (so each
example's output-gradients are exactly its own) -> per-parameter accumulators -> ||grad L_i|| for every i, and,
given reference gradients R_k, <grad L_i, R_k> from the same captured pairs (same forward, same backward).
Backends: `torch` (batched PyTorch math, runs everywhere), `triton` (fused kernels in fastsel.kernels for the
Linear sites), `naive` (one forward+backward per unpadded example: the oracle), `auto` (triton on CUDA, else torch).
Padded and packed batches go the same way: the batch's `Segments` (fastsel.engine.segments) say which tokens form
each example, and every per-example sum runs over those tokens only. Each Triton kernel family runs only after its
first-use self-test passed on that device and dtype (`fastsel.engine.kernel_selftest`): with 'auto' a failing
family falls back to the torch math, with an explicit 'triton' it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine import dot_math
from fastsel.engine.accumulate import (
    ParamAccumulator,
    RowSplit,
    resolve_deferred,
)
from fastsel.engine.backends import TorchMath, math_for
from fastsel.engine.capture import Capture
from fastsel.engine.losses import check_finite
from fastsel.engine.model_io import forward_losses, in_layout, model_device, prepare_for
from fastsel.engine.packed_attention import packed_attention
from fastsel.engine.references import ReferenceLike, References, prepare_references
from fastsel.engine.segments import Segments
from fastsel.engine.sharded import ForwardLeaves
from fastsel.engine.sites import Role
from fastsel.engine.targets import Target, find_targets

BACKENDS = ("auto", "torch", "triton", "naive")


@dataclass
class NormPass:
    """What one norm pass measured: per-example losses, per-parameter squared norms, optional per-example grads,
    and, with references, per-parameter dots <grad L_i, R_k>."""

    losses: Tensor  # [B] fp32, detached (B = examples: rows, or the sequences of a packed batch)
    sq_norms: dict[str, Tensor]  # parameter name -> [B] fp32
    backend: str
    per_example_grads: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, *shape] (keep_grads only)
    grad_rows: Tensor | None = None  # keep_rows: the examples whose gradients per_example_grads holds, in its order
    token_stats: dict[str, Tensor] = field(default_factory=dict)  # losses.token_statistics (token_stats only)
    tokens: Tensor | None = None  # [B] tokens of each example (its sequence length)
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


def backward_keeping_grads(total: Tensor, model: nn.Module, params: list[Tensor],
                           recorded: ForwardLeaves | None = None) -> list[Tensor | None]:
    """Backward of `total`; return the targets' batch gradients and leave every `.grad` as it was before.

    Plain `.backward()` rather than `torch.autograd.grad`, because reentrant gradient checkpointing supports only
    the former; the user's `.grad` tensors are set aside first and put back afterwards, also on error. A sharded
    (FSDP2) model, whose forward ran under `recorded`, is differentiated with `torch.autograd.grad` with respect to
    the recorded unsharded leaves instead (fastsel.engine.sharded: why): the result is this rank's local gradient.
    """
    if recorded is not None and recorded.active:
        return list(torch.autograd.grad(total, recorded.leaves(params), allow_unused=True))
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


def backward_to_hooks(total: Tensor, model: nn.Module, capture: Capture, params: list[Tensor],
                      recorded: ForwardLeaves) -> list[Tensor | None] | None:
    """The norm pass's backward: it only has to bring every hooked call its output gradient.

    When the hooked calls form chains (`Capture.chain_inputs`: LoRA-only targets) the backward stops at the chain
    tensors and autograd computes no parameter gradient at all (the LoRA weight gradients a plain backward
    computes: the accumulators form the per-example ones instead), and None is returned. Otherwise (full
    fine-tuning, embeddings, reentrant checkpointing where the hooks fire in the recompute, FSDP2, DDP outside
    `no_sync`) `backward_keeping_grads`, returning the batch gradients.
    """
    chain = None if recorded.active or _ddp_syncing(model) else capture.chain_inputs()
    if chain is None:
        return backward_keeping_grads(total, model, params, recorded)
    try:
        torch.autograd.backward(total, inputs=chain)
    finally:
        for t in chain:
            t.grad = None
    return None


def _ddp_syncing(model: nn.Module) -> bool:
    """DDP outside `no_sync`: its reducer expects the parameters' gradients of this backward."""
    return isinstance(model, nn.parallel.DistributedDataParallel) and model.require_backward_grad_sync


RowPlan = Callable[[Tensor], "Tensor | None"]


def batched_norm_pass(batch: Mapping[str, Tensor], model: nn.Module, targets: list[Target], *,
                      backend: str = "torch", keep_grads: bool = False, keep_rows: RowPlan | None = None,
                      strict: bool = True, token_stats: bool = False,
                      references: References | None = None, layout: str = "auto") -> NormPass:
    """One batched forward+backward with capture hooks; no .grad is written and the model is left as found.

    `keep_grads` keeps every example's per-example gradients. `keep_rows` decides it after the forward, before the
    backward: called with the detached per-example losses, it returns the ascending examples whose per-example
    gradients to keep (the others get their squared norms only), or None to keep none; `NormPass.grad_rows` then
    says which examples `per_example_grads` holds. The squared norms of all examples are the same either way. On a
    padded batch the split is by row; on a packed one by sequence (two accumulators over the same rows, each
    reducing its own sequences' tokens). `strict` (triton only): a kernel family failing its self-test raises
    instead of falling back to torch. `token_stats`: also `losses.token_statistics` per example. With
    `references` every accumulator also forms its parameter's dots from the same captured pairs. `layout`:
    `model_io.in_layout` (by default a padded batch runs packed on a CPU; results are per example either way).
    """
    if keep_grads and keep_rows is not None:
        raise ValueError("pass keep_grads or keep_rows, not both")
    prepared = in_layout(model, prepare_for(model, batch), layout)
    segments: Segments = prepared["segments"]
    refs = references.tensors if references is not None else {}
    owned: dict[nn.Module, list[tuple[str, Role]]] = {}
    for target in targets:
        for _, module, role in target.owners:
            owned.setdefault(module, []).append((target.name, role))
    accumulators: dict[str, ParamAccumulator | RowSplit] = {}

    def sink(module: nn.Module, inp: Tensor, grad_out: Tensor) -> None:
        for name, role in owned[module]:
            accumulators[name].add(role.factors(inp, grad_out))

    with Capture(owned.keys(), sink) as capture, ForwardLeaves(model, targets) as recorded, \
            packed_attention(model, segments.packed):
        losses, stats = forward_losses(model, prepared, token_stats=token_stats)
        capture.counting = False
        grad_rows = None if keep_rows is None else keep_rows(losses.detach())
        plan = _KeepPlan(len(segments), keep_grads, grad_rows, losses.device)
        accumulators.update(_accumulators(plan, prepared, targets, capture, refs,
                                          lambda seg: math_for(backend, seg, strict=strict)))
        batch_grads = backward_to_hooks(losses.sum(), model, capture, [t.param for t in targets], recorded)
    check_finite(losses.detach(), "loss")  # after backward: no host sync between forward and backward
    for group, math in plan.groups:
        if math.groups:
            resolve_deferred(group, math)
    sq_norms, kept, dots = _collect(plan, targets, accumulators, batch_grads, references)
    result = NormPass(losses.detach(), sq_norms, backend, per_example_grads=kept,
                      grad_rows=None if plan.keep_all else plan.grad_rows, token_stats=stats,
                      tokens=_token_counts(segments), param_dots=dots)
    return _with_references(result, references)


class _KeepPlan:
    """Which examples' per-example gradients the pass keeps: all (`keep_all`), those of `grad_rows` (`split`: two
    accumulators per parameter), or none; `groups` are the accumulators launched together after backward."""

    def __init__(self, batch_size: int, keep_grads: bool, grad_rows: Tensor | None, device: torch.device) -> None:
        self.batch_size, self.device = batch_size, device
        self.keep_all = keep_grads or (grad_rows is not None and grad_rows.numel() == batch_size)
        self.split = grad_rows is not None and 0 < grad_rows.numel() < batch_size
        self.grad_rows = grad_rows.to(device) if self.split else grad_rows
        self.keeping = self.keep_all or grad_rows is not None  # an empty plan keeps gradients of no row
        self.n_kept = batch_size if self.keep_all else (0 if grad_rows is None else grad_rows.numel())
        self.groups: list[tuple[list[ParamAccumulator], TorchMath]] = []


def _accumulators(plan: _KeepPlan, prepared: Mapping[str, Any], targets: list[Target], capture: Capture,
                  refs: Mapping[str, Tensor], math_of: Callable[[Segments], TorchMath]) -> dict[str, Any]:
    """One accumulator per target (a RowSplit of two when only some examples' gradients are kept)."""
    segments: Segments = prepared["segments"]
    calls = {t.name: sum(capture.forward_calls[module] for _, module, _ in t.owners) for t in targets}
    if not plan.split:
        math = math_of(segments)
        out = {t.name: ParamAccumulator(t.shape, segments, calls[t.name], plan.keep_all, math, refs.get(t.name))
               for t in targets}
        plan.groups = [(list(out.values()), math)]
        return out
    rest = torch.ones(plan.batch_size, dtype=torch.bool, device=plan.grad_rows.device)
    rest[plan.grad_rows] = False
    rest_rows = rest.nonzero().flatten()
    if segments.packed:  # by sequence: both halves see whole rows, each sums its own sequences' tokens
        keep_seg, rest_seg = segments.subset(plan.grad_rows), segments.subset(rest_rows)
    else:  # by row: each half sees its own rows
        mask = prepared["attention_mask"]
        keep_seg, rest_seg = Segments.one_per_row(mask[plan.grad_rows]), Segments.one_per_row(mask[rest_rows])
    keep_math, rest_math = math_of(keep_seg), math_of(rest_seg)
    out = {t.name: RowSplit(plan.grad_rows, rest_rows,
                            ParamAccumulator(t.shape, keep_seg, calls[t.name], True, keep_math, refs.get(t.name)),
                            ParamAccumulator(t.shape, rest_seg, calls[t.name], False, rest_math, refs.get(t.name)),
                            by_row=not segments.packed) for t in targets}
    plan.groups = [([a.kept for a in out.values()], keep_math), ([a.others for a in out.values()], rest_math)]
    return out


def _collect(plan: _KeepPlan, targets: list[Target], accumulators: Mapping[str, Any],
             batch_grads: list[Tensor | None] | None, references: References | None
             ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(squared norms, kept per-example gradients, dots) per parameter, from the accumulators."""
    sq_norms: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    dots: dict[str, Tensor] = {}
    for target, batch_grad in zip(targets, batch_grads or [None] * len(targets), strict=True):
        acc = accumulators[target.name]
        sq = acc.sq_norms()
        if sq is None:
            if batch_grad is not None and bool(batch_grad.ne(0).any()):
                raise RuntimeError(
                    f"parameter {target.name!r} received a gradient that did not pass through the modules fastsel "
                    "hooks (it is used outside its module's forward): cannot form its per-example norm"
                )
            sq = torch.zeros(plan.batch_size, device=plan.device)
        sq_norms[target.name] = sq
        if plan.keeping:
            grads = acc.grads if plan.keep_all or plan.split else None
            kept[target.name] = grads if grads is not None else torch.zeros((plan.n_kept, *target.shape),
                                                                            device=sq.device)
        if references is not None:
            dot = acc.dots()
            dots[target.name] = dot if dot is not None else torch.zeros(plan.batch_size, references.count,
                                                                        device=sq.device)
    return sq_norms, kept, dots


def _with_references(result: NormPass, references: References | None) -> NormPass:
    if references is not None:
        result.reference_sq_norms = references.sq_norms
        result.single_reference = references.single
    return result


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


def naive_norm_pass(batch: Mapping[str, Tensor], model: nn.Module, targets: list[Target],
                    references: References | None = None) -> NormPass:
    """The oracle: for each example alone (padding and other sequences stripped), forward, backward, and the norm
    of its gradient (and its dots with the references)."""
    prepared = prepare_for(model, batch)
    params = [t.param for t in targets]
    losses, rows, dot_rows = [], [], []
    for single in _examples_alone(prepared):
        with ForwardLeaves(model, targets) as recorded:  # FSDP2: the unsharded leaves (engine.sharded)
            loss = forward_losses(model, prepare_for(model, single))[0][0]
        grads = torch.autograd.grad(loss, recorded.leaves(params), allow_unused=True)
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
    result = NormPass(losses_t, sq_norms, "naive", tokens=_token_counts(prepared["segments"]), param_dots=dots)
    return _with_references(result, references)


def norm_pass(batch: Mapping[str, Tensor], model: nn.Module, *, params: str = "trainable",
              backend: str = "auto", keep_grads: bool = False, targets: list[Target] | None = None,
              keep_rows: RowPlan | None = None, token_stats: bool = False,
              reference: ReferenceLike | None = None, layout: str = "auto") -> NormPass:
    """Per-example losses and squared gradient norms over the chosen parameters, by the chosen backend.

    `batch`: padded or packed (fastsel.engine.batch); on a packed batch every sequence is one example, in order of
    appearance. `targets` (from `find_targets(model, params)`) skips the parameter discovery when the caller
    already did it. `keep_grads` / `keep_rows`: per-example gradients kept for every example / for the examples
    chosen after the forward (`batched_norm_pass`). `token_stats` also returns `losses.token_statistics`
    (entropy, top-1 hits, supervised tokens per example; not with backend='naive'). `reference`: a gradient dict
    {parameter name: tensor} over exactly those parameters (e.g. from `fastsel.reference_gradient`), or a list of
    them: the same forward and backward then also give every example's exact <grad L_i, R_k> (`NormPass.dots`,
    `NormPass.cosines`; per sequence on a packed batch). A bad reference raises before the model runs.
    `layout`: 'auto' (a padded batch runs as one packed row on a CPU: cheaper, same per-example results),
    'given' or 'packed' (`fastsel.engine.model_io.in_layout`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    strict = backend == "triton"  # asked for by name: a kernel failing its self-test raises, no fallback
    backend = resolve_backend(backend, model)
    targets = find_targets(model, params) if targets is None else targets
    references = None if reference is None else prepare_references(reference, targets, model_device(model))
    if backend == "naive":
        if keep_grads or keep_rows is not None or token_stats:
            raise ValueError("keep_grads, keep_rows and token_stats are not available with backend='naive'")
        result = naive_norm_pass(batch, model, targets, references)
    else:
        result = batched_norm_pass(batch, model, targets, backend=backend, keep_grads=keep_grads,
                                   keep_rows=keep_rows, strict=strict, token_stats=token_stats,
                                   references=references, layout=layout)
    check_finite(result.norms, "gradient norm")
    if references is not None:
        check_finite(torch.stack(list(result.param_dots.values())).sum(dim=0).sum(dim=1), "gradient dot")
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
