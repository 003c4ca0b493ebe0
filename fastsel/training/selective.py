"""`selective_backward`: a drop-in replacement for `loss.backward()` that trains on the selected examples only.

Afterwards every trainable parameter's `.grad` has been increased by `scale` times the gradient of the mean
per-example loss over the selected examples, exactly as if forward+backward had run on that subset alone (under
DDP: over the globally selected examples, identical on every rank). The optimizer step stays the caller's.

Single pass: the norm pass keeps each example's gradient of the trainable parameters (small for LoRA:
B*r*(d_in+d_out) per module), and the subset's gradient is their mean over the kept rows: no second forward or
backward. Two pass: norm pass, then forward+backward of the selected rows. 'auto' takes the single pass when the
per-example gradients of the rows inside the loss band fit the memory budget, decided between the norm pass's
forward and backward (fastsel.training.memory); `SelectiveStep.pass_reason` says which step ran and why.

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
raises UnreducedGradientError (`training.window`: the one optimizer step pre-hook, armed only while a window is
open, shared with FSDP2's window).

How a window is followed (torch has no zero_grad hook): fastsel records, per parameter, the `.grad` tensor it
wrote (weakly) and its version counter. A backward accumulating onto that tensor keeps the window open (a tensor
hook before and a post-accumulate-grad hook after each accumulation update the record, whether autograd adds in
place or makes a new tensor). Any other change of `.grad` (setting it to None, `zero_grad(set_to_none=False)`,
another tensor, an in-place op) is inspected when it matters, at the next accumulation or optimizer step: if
`.grad` is None or all zeros the deferred share is gone and the window is over; otherwise (clipping, scaling)
it is still pending. Only that inspection syncs with the host, and only after such an outside change.

FSDP2 (`fully_shard`): the same contract with sharded `.grad` and one reduce-scatter per window; the deferred
contributions live in fastsel's own buffer instead of `.grad` (fastsel.training.fsdp).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from fastsel.engine.batch import check_batch, take_examples
from fastsel.engine.losses import check_finite
from fastsel.engine.model_io import forward_losses, in_layout, model_device, prepare_for
from fastsel.engine.norms import NormPass, backward_keeping_grads, norm_pass
from fastsel.engine.packed_attention import packed_attention
from fastsel.engine.references import ReferenceLike, prepare_references
from fastsel.engine.sharded import ForwardLeaves, is_sharded
from fastsel.engine.targets import Target, find_targets
from fastsel.selection import strategies
from fastsel.selection.rules import (
    GradShieldRule,
    Selection,
    check_budget,
    check_reference_option,
    needs_measurement,
    select_indices,
)
from fastsel.selection.strategies import DEFAULT
from fastsel.training import distributed, fsdp
from fastsel.training import window as accumulation
from fastsel.training.memory import PassPlan, row_bytes
from fastsel.training.options import check_step_options
from fastsel.training.window import UnreducedGradientError, WindowKind  # noqa: F401 - public here (fastsel.*)

# Parameters whose `.grad` holds a `sync=False` contribution not yet averaged over ranks (-> their _Window); the
# optimizer step pre-hook refusing to step them is `training.window`'s (armed only while a window is open).
_DEFERRED: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class _Window:
    """What a parameter's open accumulation window knows of its `.grad`: the tensor holding the deferred share
    (weakly) and its version counter when fastsel, or a backward accumulating onto it, last wrote it."""

    grad: weakref.ref
    version: int
    handles: list[RemovableHandle]
    accumulating: bool = False


def _before_accumulation(param_ref: weakref.ref) -> Callable[[Tensor], None]:
    """Tensor hook (runs before autograd adds a backward's gradient into `.grad`): a backward accumulating onto the
    deferred `.grad` keeps the window open, unless `.grad` was zeroed in place since (then the window is over)."""

    def hook(grad: Tensor) -> None:
        del grad
        param = param_ref()
        window = _DEFERRED.get(param) if param is not None else None
        if window is None or param.grad is None or param.grad is not window.grad():
            return  # no window, or a backward with .grad set aside (fastsel's own passes): not ours
        if _still_pending(param, window):
            window.accumulating = True

    return hook


def _after_accumulation(param: Tensor) -> None:
    """Post-accumulate-grad hook: the accumulated `.grad` (in place or a new tensor) still holds the deferred share."""
    window = _DEFERRED.get(param)
    if window is not None and window.accumulating and param.grad is not None:
        window.grad, window.version, window.accumulating = weakref.ref(param.grad), param.grad._version, False


def _still_pending(param: Tensor, window: _Window) -> bool:
    """Whether `param.grad` still holds the deferred share; forget the window when it does not.

    The share is gone when `.grad` is None, or was changed by something other than fastsel or an accumulating
    backward (another tensor, or the same one modified in place) and is now all zeros: `zero_grad()` with either
    `set_to_none`. A change that leaves values (clipping, scaling in place) keeps the share pending.
    """
    grad = param.grad
    if grad is None:
        _forget(param)
        return False
    if grad is window.grad() and grad._version == window.version:
        return True
    if not bool(grad.any()):  # a host sync, only after an outside change of .grad
        _forget(param)
        return False
    window.grad, window.version = weakref.ref(grad), grad._version
    return True


def _pending(param: Tensor) -> bool:
    window = _DEFERRED.get(param)
    return window is not None and _still_pending(param, window)


accumulation.register_kind(WindowKind(
    "grad", _pending, lambda: len(_DEFERRED) > 0,
    lambda n: f"{n} parameter(s) hold gradients added by selective_backward(..., sync=False) that were never averaged "
              "over ranks"))


def _mark_deferred(params: list[Tensor]) -> None:
    """Record the `.grad` tensors now holding a deferred share (hooks follow later backward accumulations)."""
    for p in params:
        if p.grad is None:
            continue
        window = _DEFERRED.get(p)
        if window is None:
            p_ref = weakref.ref(p)
            handles = [p.register_hook(_before_accumulation(p_ref)),
                       p.register_post_accumulate_grad_hook(_after_accumulation)]
            _DEFERRED[p] = _Window(weakref.ref(p.grad), p.grad._version, handles)
        else:
            window.grad, window.version, window.accumulating = weakref.ref(p.grad), p.grad._version, False
    if len(_DEFERRED):
        accumulation.arm()


def _forget(param: Tensor) -> None:
    window = _DEFERRED.pop(param, None)
    if window is not None:
        for handle in window.handles:
            handle.remove()


def _clear_deferred(params: list[Tensor]) -> None:
    for p in params:
        _forget(p)
    accumulation.disarm_if_idle()


def has_deferred_gradients(model: nn.Module) -> bool:
    """Whether a parameter of `model` holds a `sync=False` contribution not yet averaged over ranks."""
    pending = any([_pending(p) for p in model.parameters()])  # a list: every parameter's window is checked
    accumulation.disarm_if_idle()
    return pending or fsdp.has_pending(model)


def _local_model(model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager]:
    """Under DDP, local passes run under `no_sync()`: fastsel averages the gradients over ranks itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model, model.no_sync()
    return model, contextlib.nullcontext()


def _subset_grads(prepared: Mapping[str, Any], model: nn.Module, targets: list[Target],
                  examples: Tensor) -> list[Tensor | None]:
    """Summed gradient of the per-example losses of `examples` (forward+backward of those examples only: their
    rows of a padded batch, or their sequences packed into one row).

    Under FSDP2 every rank must run the same forward and backward (their all-gathers): a rank holding no selected
    example runs its first example with weight 0, which adds exactly nothing.
    """
    weight = 1.0
    if examples.numel() == 0:
        examples, weight = torch.zeros(1, dtype=torch.long), 0.0
    subset = prepare_for(model, take_examples(prepared, examples))
    with ForwardLeaves(model, targets) as recorded:
        losses = forward_losses(model, subset)[0]
    return backward_keeping_grads(losses.sum() * weight, model, [t.param for t in targets], recorded)


def _apply(targets: list[Target], summed: list[Tensor | None], kept: int, scale: float, sync: bool) -> None:
    """Add this rank's share of `scale` x kept-mean gradient to `.grad`; with `sync`, average `.grad` over ranks.

    The share is world_size x (the local rows' summed gradient) x scale / (global kept count), so the average over
    ranks is the kept-mean gradient. Without torch.distributed (world size 1) nothing is communicated.
    """
    params = [t.param for t in targets]
    world = distributed.world_size()
    reduce = sync and world > 1 and (kept > 0 or any([_pending(p) for p in params]))  # same on every rank
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


@dataclass
class SelectiveStep(Selection):
    """What `selective_backward` did: the rule's `Selection` plus the step's own state."""

    local_indices: Tensor | None = None  # this rank's kept rows (= indices without DDP / FSDP2)
    single_pass: bool | None = None  # how the gradient was formed
    pass_reason: str = ""  # why that step was taken (memory budget, options, strategy)
    token_stats: dict[str, Tensor] | None = None  # token_stats=True: this rank's per-example sums


def selective_backward(batch: Mapping[str, Tensor], model: nn.Module, *, ratio: float = 0.2,
                       strategy: str = DEFAULT, loss_band: float | None = 1.0, single_pass: bool | str = "auto",
                       seed: int | None = None, scale: float = 1.0, backend: str = "auto",
                       memory_budget_bytes: int | None = None, sync: bool = True,
                       token_stats: bool = False, reference: ReferenceLike | None = None,
                       gradshield_budget: float = 0.0, gradshield_rule: GradShieldRule | None = None) -> SelectiveStep:
    """Select examples of `batch` (Algorithm 1) and accumulate into `.grad` the gradient of their mean loss.

    `batch`: padded or packed (one example per sequence; the two-pass step packs the selected sequences into one
    row). `scale` multiplies the added gradient (e.g. 1/accumulation_steps). Returns the Selection (global indices
    under DDP / FSDP2; `local_indices` are this rank's examples; `single_pass` and `pass_reason`: which step ran
    and why). Strategies 'full' and 'random' need no norms: one forward and one backward of the kept examples'
    losses. `token_stats` puts this rank's per-example token statistics (`fastsel.engine.losses.token_statistics`,
    and `length`: sequence lengths) on `SelectiveStep.token_stats`.

    `single_pass`: 'auto' takes the single pass when the per-example gradients of the examples inside the loss band
    fit `memory_budget_bytes` (None: adaptive, fastsel.training.memory), else the two-pass step (warned once);
    True raises instead of falling back; False always runs two passes. On a packed batch the examples are the
    sequences: the kept per-example gradients are those of the candidate sequences, wherever they lie in the rows.

    `sync` (matters under torch.distributed only): True (default) ends the call by averaging the trainable
    parameters' `.grad` over ranks, so every rank holds the same gradient. False communicates no gradient: this
    rank's share is added to `.grad` unreduced, for a later `sync=True` call to average (the last micro-batch of
    the accumulation window; it averages even when it keeps no example). After the window `.grad` equals, to fp
    rounding, what `sync=True` on every micro-batch gives (module docstring: why nothing is counted twice). An
    optimizer step while a `sync=False` contribution is unreduced raises UnreducedGradientError, also in a single
    process so the misuse shows before DDP. Zeroing the gradients in between (`optimizer.zero_grad()` or
    `model.zero_grad()`, with `set_to_none` True or False) drops the window and the check; a plain
    `loss.backward()` onto the unreduced `.grad` does not.

    `reference` (strategies 'gradshield' and 'harmful_similarity' only, required there): gradient dicts over the
    trainable parameters (`fastsel.reference_gradient`), checked before anything runs; under DDP every rank must
    pass the same reference. `gradshield_budget` / `gradshield_rule`: see `fastsel.selection.rules`. On a packed
    batch the dots are per sequence, like the norms.

    Refused before anything reaches `.grad`: a malformed batch (TypeError / ValueError naming the key), token ids
    or labels outside the model's vocabulary (naming example and position), a non-finite loss (every strategy)
    or gradient norm (the norm strategies), naming the examples.
    Under FSDP2 (`fully_shard`) the same contract holds with sharded `.grad`: fastsel.training.fsdp.
    """
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {sync!r}")
    check_step_options(ratio=ratio, strategy=strategy, loss_band=loss_band, single_pass=single_pass,
                       backend=backend, memory_budget_bytes=memory_budget_bytes, scale=scale, seed=seed)
    check_reference_option(strategy, reference)
    check_budget(gradshield_budget)
    check_batch(batch)  # before any shape is read
    model, no_sync = _local_model(model)
    targets = find_targets(model, "trainable")
    sharded = is_sharded(model)
    if sharded:
        fsdp.check_sharded_targets(targets)
    references = None if reference is None else prepare_references(reference, targets, model_device(model))
    prepared = in_layout(model, prepare_for(model, batch))  # on a CPU a padded batch runs packed (model_io)
    plan = PassPlan(single_pass, strategy, loss_band, memory_budget_bytes, row_bytes(targets), model_device(model))
    with no_sync, packed_attention(model, prepared["segments"].packed):
        measured = _measure(prepared, model, targets, strategy, plan, backend, token_stats, references)
        selection, local = _select_globally(measured, ratio=ratio, strategy=strategy, loss_band=loss_band,
                                            seed=seed, gradshield_budget=gradshield_budget,
                                            gradshield_rule=gradshield_rule)
        selection.single_pass, selection.pass_reason = plan.single, plan.reason
        if token_stats:
            lengths = torch.tensor(prepared["segments"].lengths, dtype=torch.float32)
            selection.token_stats = {**{k: v.detach().cpu() for k, v in measured.stats.items()}, "length": lengths}
        summed = _summed_grads(measured, prepared, model, targets, local, plan, sharded, selection.num_selected)
    if sharded:
        fsdp.apply_sharded(targets, summed, selection.num_selected, scale, sync)
    else:
        _apply(targets, summed, selection.num_selected, scale, sync)
    return selection


@dataclass
class _Measured:
    """This rank's measurements for the selection: losses, norms (zeros for the norm-free strategies), token
    statistics, dots; the norm pass (norm strategies) or the live losses and recorded leaves (the others)."""

    losses: Tensor
    norms: Tensor
    stats: dict[str, Tensor]
    dots: Tensor | None = None
    norm_pass: NormPass | None = None
    live_losses: Tensor | None = None
    recorded: ForwardLeaves | None = None


def _measure(prepared: Mapping[str, Any], model: nn.Module, targets: list[Target], strategy: str, plan: PassPlan,
             backend: str, token_stats: bool, references: Any) -> _Measured:
    """The norm pass (norms, dots, kept per-example gradients as `plan` decides), or for the strategies that need
    no norms one forward whose losses stay live for the kept examples' backward."""
    if needs_measurement(strategy):
        measured = norm_pass(prepared, model, backend=backend, targets=targets,
                             keep_rows=plan.keep_rows if plan.may_single else None, token_stats=token_stats,
                             reference=references)
        out = _Measured(measured.losses, measured.norms, measured.token_stats, measured.dots, norm_pass=measured)
    else:
        with ForwardLeaves(model, targets) as recorded:
            live_losses, stats = forward_losses(model, prepared, token_stats=token_stats)
        losses = live_losses.detach()
        out = _Measured(losses, torch.zeros_like(losses), stats, live_losses=live_losses, recorded=recorded)
    if not plan.may_single:
        plan.settle_without_norm_pass()
    return out


def _select_globally(measured: _Measured, *, ratio: float, strategy: str, loss_band: float | None,
                     seed: int | None, gradshield_budget: float, gradshield_rule: GradShieldRule | None
                     ) -> tuple[SelectiveStep, Tensor]:
    """Algorithm 1 over every rank's examples (gathered); returns the Selection and this rank's kept rows."""
    all_losses, offset = distributed.gather_rows(measured.losses)
    all_norms, _ = distributed.gather_rows(measured.norms)
    if measured.norm_pass is None:  # the norm pass checked its losses; here nothing must reach .grad (every rank)
        check_finite(all_losses, "loss")
    all_dots = None
    if measured.dots is not None:  # [B] or [B, K]: gathered column by column
        dots = measured.dots
        columns = [distributed.gather_rows(c)[0] for c in (dots[:, None] if dots.dim() == 1 else dots).T]
        all_dots = torch.stack(columns, dim=1) if dots.dim() == 2 else columns[0]
    selection = select_indices(all_losses, all_norms, ratio=ratio, strategy=strategy, loss_band=loss_band,
                               seed=distributed.shared_seed(seed) if strategies.strategy(strategy).draws else seed,
                               dots=all_dots, gradshield_budget=gradshield_budget, gradshield_rule=gradshield_rule)
    count = measured.losses.numel()
    local = selection.indices[(selection.indices >= offset) & (selection.indices < offset + count)] - offset
    step = SelectiveStep(**{f.name: getattr(selection, f.name) for f in fields(selection)}, local_indices=local)
    return step, local


def _summed_grads(measured: _Measured, prepared: Mapping[str, Any], model: nn.Module, targets: list[Target],
                  local: Tensor, plan: PassPlan, sharded: bool, kept: int) -> list[Tensor | None]:
    """This rank's summed gradient of its kept examples' losses: from the live losses (norm-free strategies), the
    norm pass's kept per-example gradients (single pass), or a second pass over the kept examples."""
    if kept == 0:  # nothing to add; a sync=True call still averages what earlier sync=False calls deferred
        return [None] * len(targets)
    if measured.norm_pass is None:
        live = measured.live_losses
        return backward_keeping_grads(live[local.to(live.device)].sum(), model, [t.param for t in targets],
                                      measured.recorded)
    if plan.single:
        pass_ = measured.norm_pass
        rows = _kept_positions(pass_.grad_rows, local.to(pass_.losses.device))
        return [pass_.per_example_grads[t.name][rows].sum(dim=0) for t in targets]
    if local.numel() or sharded:  # FSDP2: every rank takes part in the second pass
        return _subset_grads(prepared, model, targets, local)
    return [None] * len(targets)


def _kept_positions(grad_rows: Tensor | None, local: Tensor) -> Tensor:
    """Positions of the selected local rows among the rows whose per-example gradients the norm pass kept (all
    rows when `grad_rows` is None). Selected rows are candidates, which the plan kept: anything else is a bug."""
    if grad_rows is None:
        return local
    positions = torch.searchsorted(grad_rows, local)
    found = positions < grad_rows.numel()
    if not bool(found.all()) or not torch.equal(grad_rows[positions], local):
        raise RuntimeError("internal error: a selected row is outside the rows whose gradients were kept")
    return positions
