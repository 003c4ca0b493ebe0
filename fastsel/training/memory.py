"""Which step `selective_backward` takes - single pass or two pass - and why: the memory budget of the single pass.

The single pass keeps per-example gradients of the trainable parameters (fp32: 4 bytes x trainable numel per
kept row) from the norm pass, so the step needs no second forward or backward. Two facts shrink that footprint
exactly:
- the loss band is known after the forward, before the backward: an example outside it can never be selected by
  the norm strategies, so only rows inside the band (the candidates, over all ranks' losses) keep their gradient;
  the others get their squared norm only. The decision is taken there, with the candidate count;
- nothing smaller than fp32 keeps the subset gradient exact: bf16 (and fp16) storage of the per-example gradients
  was measured to miss the fp32 tolerance (relative 1e-5) by orders of magnitude (README, "Memory"), so they stay
  fp32.

The budget (`memory_budget_bytes`): an int is used as given; None (the default) is adaptive: on CUDA
`CUDA_FREE_FRACTION` of the memory free at the decision (after the forward, activations held; the caching
allocator's reserved-but-unused bytes count as free), elsewhere the fixed `DEFAULT_MEMORY_BUDGET`. Under
torch.distributed every rank must take the same step (under FSDP2 the two-pass step runs collectives), so the
single pass runs only if the candidates fit on every rank; the reason, the same text on every rank, names the
tightest rank. 'auto' falls back to the two-pass step when they do not
fit - recorded on `SelectiveStep.pass_reason` and warned once per process - and `single_pass=True` raises.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from fastsel.engine.targets import Target
from fastsel.selection.rules import candidate_mask, needs_measurement
from fastsel.selection.strategies import strategy
from fastsel.training import distributed
from fastsel.utils import format_bytes

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes: the budget on devices other than CUDA (CPU)
CUDA_FREE_FRACTION = 0.5  # share of the free CUDA memory the adaptive budget allows the per-example gradients

FALLBACK_WARNING = ("selective_backward: the per-example gradients of the single-pass step do not fit the memory "
                    "budget: falling back to the two-pass step (SelectiveStep.pass_reason says why, per call)")


def default_memory_budget(device: torch.device) -> tuple[int, str]:
    """(bytes, how they were chosen) of the adaptive budget on `device`: a fraction of free CUDA memory, else the
    fixed default. The label names no device, so it reads the same on every rank."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(CUDA_FREE_FRACTION * (free + max(0, cached)))
        return budget, f"{CUDA_FREE_FRACTION:.0%} of the free CUDA memory"
    return DEFAULT_MEMORY_BUDGET, f"the fixed default on {device.type}"


def row_bytes(targets: list[Target]) -> int:
    """Bytes of one example's kept gradient: fp32 over every trainable parameter (unsharded size under FSDP2)."""
    return sum(t.param.numel() * 4 for t in targets)


@dataclass
class PassPlan:
    """Decides, between the norm pass's forward and backward, whether the step is single pass; says why.

    `keep_rows` is the norm pass's row plan (`fastsel.engine.norms.batched_norm_pass`): it returns this rank's
    candidate rows when the single pass runs, else None. `single` and `reason` hold the decision afterwards.
    """

    single_pass: bool | str
    strategy: str
    loss_band: float | None
    memory_budget_bytes: int | None
    row_bytes: int
    device: torch.device
    single: bool = False
    reason: str = ""

    @property
    def may_single(self) -> bool:
        """Whether the norm pass needs the plan (a strategy measuring norms or dots, single pass not refused by
        the options)."""
        return needs_measurement(self.strategy) and self.single_pass is not False

    def settle_without_norm_pass(self) -> None:
        """The decision when `keep_rows` is never called."""
        self.single = False
        if not needs_measurement(self.strategy):
            self.reason = f"one pass over the kept rows: strategy {self.strategy!r} needs no gradient norms"
        else:
            self.reason = "two pass: single_pass=False"

    def budget(self) -> tuple[int, str]:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes, "memory_budget_bytes"
        return default_memory_budget(self.device)

    def keep_rows(self, losses: Tensor) -> Tensor | None:
        all_losses, offset = distributed.gather_rows(losses)
        all_losses = all_losses.detach().float().cpu()
        band_rule = strategy(self.strategy).uses_loss_band and strategy(self.strategy).needs_norms
        if band_rule and bool(torch.isfinite(all_losses).all()):
            candidates = candidate_mask(all_losses, self.loss_band)
        else:  # the reference strategies use no loss band; none on non-finite losses (refused after the backward)
            candidates = torch.ones(all_losses.numel(), dtype=torch.bool)
        local = candidates[offset: offset + losses.numel()].nonzero().flatten()
        budget, source = self.budget()
        per_rank = distributed.gather_ints([local.numel() * self.row_bytes, budget])  # the same on every rank
        fits = all(needed <= allowed for needed, allowed in per_rank)
        band = "in the loss band" if band_rule else f"selectable ({self.strategy}: no loss band)"
        what = f"{int(candidates.sum())} of {all_losses.numel()} row(s) {band}"
        if len(per_rank) == 1:
            what += f": {format_bytes(per_rank[0][0])} of per-example gradients, budget {format_bytes(budget)}"
        else:  # the rank closest to (or furthest over) its budget
            tight = max(range(len(per_rank)), key=lambda r: per_rank[r][0] / max(per_rank[r][1], 1))
            what += (f" over {len(per_rank)} ranks; tightest rank {tight}: {format_bytes(per_rank[tight][0])} of "
                     f"per-example gradients, budget {format_bytes(per_rank[tight][1])}")
        what += f" ({source})"
        if self.single_pass is True and not fits:
            raise ValueError(f"single_pass=True: the per-example gradients do not fit the memory budget: {what}; "
                             "raise memory_budget_bytes or pass single_pass='auto'")
        self.single = fits
        if fits:
            self.reason = f"single pass: {what}"
            return local.to(losses.device)
        self.reason = f"two pass (over budget): {what}"
        warnings.warn(FALLBACK_WARNING, RuntimeWarning, stacklevel=2)
        return None
