"""`selective_backward`: a drop-in replacement for `loss.backward()` that trains on the selected examples only.

Afterwards every trainable parameter's `.grad` has been increased by `scale` times the gradient of the mean
per-example loss over the selected examples, exactly as if forward+backward had run on that subset alone (under
DDP: over the globally selected examples, identical on every rank). The optimizer step stays the caller's.

Single pass: the norm pass keeps each example's gradient of the trainable parameters (small for LoRA:
B*r*(d_in+d_out) per module), and the subset's gradient is their mean over the kept rows: no second forward or
backward. Two pass: norm pass, then forward+backward of the selected rows. 'auto' takes the single pass when the
per-example gradients fit in `memory_budget_bytes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastsel import distributed
from fastsel.batch import per_example_losses, prepare_batch
from fastsel.model_io import forward_logits, model_device
from fastsel.norms import backward_keeping_grads, norm_pass, resolve_backend
from fastsel.selection import Selection, check_options, select_indices
from fastsel.targets import Target, find_targets

DEFAULT_MEMORY_BUDGET = 1 << 30


def _local_model(model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager]:
    """Under DDP, local passes run under `no_sync()`: fastsel sums the gradients over ranks itself."""
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


def _apply(targets: list[Target], summed: list[Tensor | None], kept: int, scale: float) -> None:
    """Sum the local contributions over ranks, divide by the global kept count, and add them to `.grad`."""
    grads = [torch.zeros_like(t.param, dtype=torch.float32) if g is None else g.float()
             for t, g in zip(targets, summed, strict=True)]
    distributed.sum_over_ranks(grads)
    for target, g in zip(targets, grads, strict=True):
        g = (g * (scale / kept)).to(target.param.dtype)
        p = target.param
        p.grad = g if p.grad is None else p.grad + g


def selective_backward(batch: Mapping[str, Tensor], model: nn.Module, *, ratio: float = 0.2,
                       strategy: str = "moderate", loss_band: float | None = 1.0, single_pass: bool | str = "auto",
                       seed: int | None = None, scale: float = 1.0, backend: str = "auto",
                       memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Selection:
    """Select examples of `batch` (Algorithm 1) and accumulate into `.grad` the gradient of their mean loss.

    `scale` multiplies the added gradient (e.g. 1/accumulation_steps). Returns the Selection (global indices
    under DDP; `local_indices` are this rank's rows). Strategies 'full' and 'random' need no norms: one forward
    and one backward of the kept rows' losses.
    """
    check_options(ratio, strategy, loss_band)
    if single_pass not in ("auto", True, False):
        raise ValueError(f"single_pass must be 'auto', True or False, got {single_pass!r}")
    model, no_sync = _local_model(model)
    targets = find_targets(model, "trainable")
    batch_size = int(batch["input_ids"].shape[0]) if "input_ids" in batch else 0
    fits = _per_example_grad_bytes(targets, batch_size) <= memory_budget_bytes
    if single_pass is True and not fits:
        raise ValueError(f"single_pass=True needs {_per_example_grad_bytes(targets, batch_size) / 2**20:.0f} MiB "
                         f"of per-example gradients, over memory_budget_bytes={memory_budget_bytes}")
    needs_norms = strategy in ("moderate", "low", "high")
    use_single = needs_norms and (single_pass is True or (single_pass == "auto" and fits))

    with no_sync:
        if needs_norms:
            measured = norm_pass(batch, model, backend=resolve_backend(backend, model), keep_grads=use_single,
                                 targets=targets)
            losses, norms = measured.losses, measured.norms
        else:
            prepared = prepare_batch(batch, model_device(model))
            live_losses = per_example_losses(forward_logits(model, prepared), prepared["labels"])
            losses, norms = live_losses.detach(), torch.zeros_like(live_losses.detach())
        all_losses, offset = distributed.gather_rows(losses)
        all_norms, _ = distributed.gather_rows(norms)
        selection = select_indices(all_losses, all_norms, ratio=ratio, strategy=strategy, loss_band=loss_band,
                                   seed=distributed.shared_seed(seed) if strategy == "random" else seed)
        local = selection.indices[(selection.indices >= offset) & (selection.indices < offset + losses.numel())]
        local = local - offset
        selection.local_indices = local
        selection.single_pass = use_single
        kept = selection.num_selected
        if kept == 0:
            return selection
        if not needs_norms:
            summed = backward_keeping_grads(live_losses[local.to(live_losses.device)].sum(), model,
                                            [t.param for t in targets])
        elif use_single:
            rows = local.to(measured.losses.device)
            summed = [measured.per_example_grads[t.name][rows].sum(dim=0) for t in targets]
        elif local.numel():
            summed = _subset_grads(batch, model, targets, local)
        else:
            summed = [None] * len(targets)
    _apply(targets, summed, kept, scale)
    return selection
