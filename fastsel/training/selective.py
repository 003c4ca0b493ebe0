"""`selective_backward`: a drop-in replacement for `loss.backward()` that trains on the selected examples only.

Afterwards every trainable parameter's `.grad` has been increased by `scale` times the gradient of the mean
per-example loss over the selected examples, exactly as if forward+backward had run on that subset alone (under
DDP: over the globally selected examples, identical on every rank). The optimizer step stays the caller's.

Single pass: the norm pass keeps each example's gradient of the trainable parameters (small for LoRA:
B*r*(d_in+d_out) per module), and the subset's gradient is their mean over the kept rows: no second forward or
backward. Two pass: norm pass, then forward+backward of the selected rows. 'auto' takes the single pass when the
per-example gradients fit in `memory_budget_bytes`.

Reference strategies (`gradshield`, `harmful_similarity`): the same norm pass also measures every example's
exact dot with the reference gradients (`reference=`), and the strategy's rule keeps examples by those dots.

Gradient accumulation under DDP: pass `sync=False` for every micro-batch of an optimizer step but the last. The
selection still gathers all ranks' losses and norms every call (global selection; B floats), but only the last
call (`sync=True`) communicates gradients. The mechanism is DDP's own: each rank adds to `.grad` its share, world
size x its rows' part of the kept-mean gradient, and a `sync=True` call ends by averaging the whole `.grad` of the
trainable parameters over ranks. Averaging leaves rank-identical content unchanged (the result of an earlier
`sync=True` call or of a DDP-synced backward, zeros) and reduces each deferred share exactly once, so no sequence
of sync=True/False calls can count a contribution twice. Forgetting the final `sync=True` would leave gradients
that differ between ranks: an optimizer step over a parameter holding an unreduced `sync=False` contribution
raises UnreducedGradientError (a global optimizer step pre-hook, registered only while such contributions exist).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits, model_device
from fastsel.engine.norms import backward_keeping_grads, norm_pass, resolve_backend
from fastsel.engine.references import ReferenceLike, prepare_references
from fastsel.engine.targets import Target, find_targets
from fastsel.selection.rules import (
    GradShieldRule,
    Selection,
    check_budget,
    check_reference_option,
    needs_measurement,
    select_indices,
)
from fastsel.training import distributed
from fastsel.training.options import check_step_options

DEFAULT_MEMORY_BUDGET = 1 << 30

# Parameters whose `.grad` holds a `sync=False` contribution not yet averaged over ranks, and the optimizer step
# pre-hook refusing to step them (registered only while this is non-empty).
_DEFERRED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_GUARD: RemovableHandle | None = None


class UnreducedGradientError(RuntimeError):
    """An optimizer step over gradients that `selective_backward(sync=False)` left unreduced across ranks."""


def _refuse_unreduced_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step pre-hook: raise when a parameter of `optimizer` still holds a deferred contribution."""
    del args, kwargs
    pending = sum(1 for group in optimizer.param_groups for p in group["params"]
                  if p in _DEFERRED and p.grad is not None)  # .grad set to None since: the window was dropped
    if pending:
        raise UnreducedGradientError(
            f"{pending} parameter(s) hold gradients added by selective_backward(..., sync=False) that were never "
            "averaged over ranks: the last micro-batch before optimizer.step() must call selective_backward(..., "
            "sync=True) (with the Trainer integration: accelerate's sync_gradients does this)")


def _mark_deferred(params: list[Tensor]) -> None:
    global _GUARD
    for p in params:
        _DEFERRED[p] = True
    if _GUARD is None:
        _GUARD = register_optimizer_step_pre_hook(_refuse_unreduced_step)


def _clear_deferred(params: list[Tensor]) -> None:
    global _GUARD
    for p in params:
        _DEFERRED.pop(p, None)
    if _GUARD is not None and len(_DEFERRED) == 0:
        _GUARD.remove()
        _GUARD = None


def has_deferred_gradients(model: nn.Module) -> bool:
    """Whether a parameter of `model` holds a `sync=False` contribution not yet averaged over ranks."""
    return any(p in _DEFERRED and p.grad is not None for p in model.parameters())


def _local_model(model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager]:
    """Under DDP, local passes run under `no_sync()`: fastsel averages the gradients over ranks itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model, model.no_sync()
    return model, contextlib.nullcontext()


def _per_example_grad_bytes(targets: list[Target], batch_size: int) -> int:
    return sum(batch_size * t.param.numel() * 4 for t in targets)


def _rows(batch: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: batch[k][rows.to(batch[k].device)] for k in ("input_ids", "attention_mask", "labels")}


def _subset_grads(batch: Mapping[str, Tensor], model: nn.Module, targets: list[Target],
                  rows: Tensor) -> list[Tensor | None]:
    """Summed gradient of the per-example losses of `rows` (forward+backward of those rows only)."""
    prepared = prepare_batch(_rows(batch, rows), model_device(model))
    losses = per_example_losses(forward_logits(model, prepared), prepared["labels"])
    return backward_keeping_grads(losses.sum(), model, [t.param for t in targets])


def _apply(targets: list[Target], summed: list[Tensor | None], kept: int, scale: float, sync: bool) -> None:
    """Add this rank's share of `scale` x kept-mean gradient to `.grad`; with `sync`, average `.grad` over ranks.

    The share is world_size x (the local rows' summed gradient) x scale / (global kept count), so the average over
    ranks is the kept-mean gradient. Without torch.distributed (world size 1) nothing is communicated.
    """
    params = [t.param for t in targets]
    world = distributed.world_size()
    reduce = sync and world > 1 and (kept > 0 or any(p in _DEFERRED for p in params))  # the same on every rank
    shares: list[Tensor | None] = [None] * len(params)
    if kept:
        factor = scale * world / kept
        shares = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() * factor
                  for p, g in zip(params, summed, strict=True)]
    if reduce:  # all-reduce the whole .grad (in fp32): the deferred shares and this call's together
        totals = [torch.zeros_like(p, dtype=torch.float32) if p.grad is None
                  else p.grad.to(torch.float32, copy=True) for p in params]
        for total, share in zip(totals, shares, strict=True):
            if share is not None:
                total += share
        distributed.sum_over_ranks(totals)
        for p, total in zip(params, totals, strict=True):
            p.grad = (total / world).to(p.dtype)
    elif kept:
        for p, share in zip(params, shares, strict=True):
            share = share.to(p.dtype)
            p.grad = share if p.grad is None else p.grad + share
    if sync:
        _clear_deferred(params)
    elif kept:
        _mark_deferred(params)


def selective_backward(batch: Mapping[str, Tensor], model: nn.Module, *, ratio: float = 0.2,
                       strategy: str = "moderate", loss_band: float | None = 1.0, single_pass: bool | str = "auto",
                       seed: int | None = None, scale: float = 1.0, backend: str = "auto",
                       memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, sync: bool = True,
                       reference: ReferenceLike | None = None, gradshield_budget: float = 0.0,
                       gradshield_rule: GradShieldRule | None = None) -> Selection:
    """Select examples of `batch` (Algorithm 1) and accumulate into `.grad` the gradient of their mean loss.

    `scale` multiplies the added gradient (e.g. 1/accumulation_steps). Returns the Selection (global indices
    under DDP; `local_indices` are this rank's rows). Strategies 'full' and 'random' need no norms: one forward
    and one backward of the kept rows' losses.

    `sync` (matters under torch.distributed only): True (default) ends the call by averaging the trainable
    parameters' `.grad` over ranks, so every rank holds the same gradient. False communicates no gradient: this
    rank's share is added to `.grad` unreduced, for a later `sync=True` call to average (the last micro-batch of
    the accumulation window; it averages even when it keeps no example). After the window `.grad` equals, to fp
    rounding, what `sync=True` on every micro-batch gives (module docstring: why nothing is counted twice). An
    optimizer step while a `sync=False` contribution is unreduced raises UnreducedGradientError, also in a single
    process so the misuse shows before DDP; setting `.grad` to None in between drops the window and the check.

    `reference` (strategies 'gradshield' and 'harmful_similarity' only, required there): gradient dicts over the
    trainable parameters (`fastsel.reference_gradient`), checked before anything runs; under DDP every rank must
    pass the same reference. `gradshield_budget` / `gradshield_rule`: see `fastsel.selection.rules`.
    """
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {sync!r}")
    check_step_options(ratio=ratio, strategy=strategy, loss_band=loss_band, single_pass=single_pass,
                       backend=backend, memory_budget_bytes=memory_budget_bytes, scale=scale, seed=seed)
    check_reference_option(strategy, reference)
    check_budget(gradshield_budget)
    model, no_sync = _local_model(model)
    targets = find_targets(model, "trainable")
    references = None if reference is None else prepare_references(reference, targets, model_device(model))
    batch_size = int(batch["input_ids"].shape[0]) if "input_ids" in batch else 0
    fits = _per_example_grad_bytes(targets, batch_size) <= memory_budget_bytes
    if single_pass is True and not fits:
        raise ValueError(f"single_pass=True needs {_per_example_grad_bytes(targets, batch_size) / 2**20:.0f} MiB "
                         f"of per-example gradients, over memory_budget_bytes={memory_budget_bytes}")
    needs_norms = needs_measurement(strategy)
    use_single = needs_norms and (single_pass is True or (single_pass == "auto" and fits))

    with no_sync:
        if needs_norms:
            measured = norm_pass(batch, model, backend=resolve_backend(backend, model), keep_grads=use_single,
                                 targets=targets, reference=references)
            losses, norms = measured.losses, measured.norms
        else:
            prepared = prepare_batch(batch, model_device(model))
            live_losses = per_example_losses(forward_logits(model, prepared), prepared["labels"])
            losses, norms = live_losses.detach(), torch.zeros_like(live_losses.detach())
        all_losses, offset = distributed.gather_rows(losses)
        all_norms, _ = distributed.gather_rows(norms)
        all_dots = None
        if references is not None:  # [B] or [B, K]: gathered column by column
            dots = measured.dots
            columns = [distributed.gather_rows(c)[0] for c in (dots[:, None] if dots.dim() == 1 else dots).T]
            all_dots = torch.stack(columns, dim=1) if dots.dim() == 2 else columns[0]
        selection = select_indices(all_losses, all_norms, ratio=ratio, strategy=strategy, loss_band=loss_band,
                                   seed=distributed.shared_seed(seed) if strategy == "random" else seed,
                                   dots=all_dots, gradshield_budget=gradshield_budget,
                                   gradshield_rule=gradshield_rule)
        local = selection.indices[(selection.indices >= offset) & (selection.indices < offset + losses.numel())]
        local = local - offset
        selection.local_indices = local
        selection.single_pass = use_single
        kept = selection.num_selected
        if kept == 0:  # nothing to add; a sync=True call still averages what earlier sync=False calls deferred
            summed = [None] * len(targets)
        elif not needs_norms:
            summed = backward_keeping_grads(live_losses[local.to(live_losses.device)].sum(), model,
                                            [t.param for t in targets])
        elif use_single:
            rows = local.to(measured.losses.device)
            summed = [measured.per_example_grads[t.name][rows].sum(dim=0) for t in targets]
        elif local.numel():
            summed = _subset_grads(batch, model, targets, local)
        else:
            summed = [None] * len(targets)
    _apply(targets, summed, kept, scale, sync)
    return selection
