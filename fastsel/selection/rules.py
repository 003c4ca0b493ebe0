"""Algorithm 1 of Bach et al. (Moderate-G) and its low/high/random variants, over per-example losses and norms.

Rule: candidates are the examples with |L_i - mean(L)| <= loss_band * std(L) (population std; loss_band=None keeps
all); k = max(1, floor(ratio * B)); `moderate` keeps the k candidates whose gradient norm is closest to the
candidates' median (mean of the two middle values for an even count; ties -> lower batch index), `low` the k
smallest, `high` the k largest, `random` k candidates uniformly (seeded), `full` every example. With fewer
candidates than k, all candidates are kept and the Selection says so. The ops run in fastsel._C when it is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastsel.selection import ops as select_ops

STRATEGIES = ("moderate", "low", "high", "random", "full")


@dataclass
class Selection:
    """Which examples of a batch to train on, and the measurements that decided it."""

    indices: Tensor  # sorted LongTensor of kept batch positions
    mask: Tensor  # bool [B]
    grad_norms: Tensor  # [B] fp32 (NaN-free); empty measurements are zeros for strategy 'full'/'random'
    losses: Tensor  # [B] fp32
    candidates: Tensor  # bool [B]
    median: float  # median gradient norm over the candidates (NaN when there is none)
    k: int  # requested number of kept examples
    strategy: str
    short_of_candidates: bool = False  # fewer candidates than k: all candidates kept
    note: str = ""
    local_indices: Tensor | None = None  # this rank's kept rows (selective_backward; = indices without DDP)
    single_pass: bool | None = None  # how selective_backward formed the gradient
    pass_reason: str = ""  # why selective_backward took that step (memory budget, options, strategy)
    token_stats: dict[str, Tensor] | None = None  # selective_backward(token_stats=True): this rank's per-example sums

    @property
    def num_selected(self) -> int:
        return int(self.indices.numel())


def check_options(ratio: float, strategy: str, loss_band: float | None) -> None:
    """Reject bad selection options with a message naming the problem."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if loss_band is not None and (isinstance(loss_band, bool) or not isinstance(loss_band, (int, float))
                                  or not loss_band >= 0 or math.isinf(loss_band)):
        raise ValueError(f"loss_band must be a finite number >= 0 or None, got {loss_band!r}")


def num_to_keep(ratio: float, batch_size: int) -> int:
    """k = max(1, floor(ratio * B))."""
    return max(1, math.floor(ratio * batch_size))


def candidate_mask(losses: Tensor, loss_band: float | None) -> Tensor:
    """Bool [B]: the examples the norm strategies may keep (within the loss band; all when loss_band is None).

    Known once the losses are, before any gradient: the single-pass step keeps per-example gradients only for
    these rows. `losses` as `select_indices` sees them (1-D, float32, CPU).
    """
    if loss_band is None:
        return torch.ones(losses.numel(), dtype=torch.bool)
    return select_ops.loss_band(losses, float(loss_band))


def select_indices(losses: Tensor, grad_norms: Tensor, *, ratio: float = 0.2, strategy: str = "moderate",
                   loss_band: float | None = 1.0, seed: int | None = None) -> Selection:
    """Apply the selection rule to measured per-example losses and gradient norms (both [B])."""
    check_options(ratio, strategy, loss_band)
    losses = losses.detach().float().cpu()
    grad_norms = grad_norms.detach().float().cpu()
    if losses.dim() != 1 or losses.shape != grad_norms.shape or losses.numel() == 0:
        raise ValueError(f"losses and grad_norms must be equal-length non-empty 1-D tensors, got "
                         f"{tuple(losses.shape)} and {tuple(grad_norms.shape)}")
    batch_size = losses.numel()
    k = num_to_keep(ratio, batch_size)
    if strategy == "full":
        candidates = torch.ones(batch_size, dtype=torch.bool)
        chosen = torch.arange(batch_size)
        median = select_ops.median(grad_norms)
        return _finish(chosen, losses, grad_norms, candidates, median, batch_size, strategy, False, "")
    candidates = candidate_mask(losses, loss_band)
    cand_idx = candidates.nonzero().flatten()
    cand_norms = grad_norms[cand_idx]
    median = select_ops.median(cand_norms) if cand_idx.numel() else math.nan
    short = cand_idx.numel() < k
    note = ""
    if cand_idx.numel() <= k:
        pick = torch.arange(cand_idx.numel())
        if short:
            note = f"only {cand_idx.numel()} candidate(s) in the loss band for k={k}: all candidates kept"
    elif strategy == "moderate":
        pick = select_ops.closest_k(cand_norms, median, k)
    elif strategy in ("low", "high"):
        pick = select_ops.extreme_k(cand_norms, k, strategy == "high")
    else:  # random
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        pick = torch.randperm(cand_idx.numel(), generator=generator)[:k]
    chosen = cand_idx[pick].sort().values
    return _finish(chosen, losses, grad_norms, candidates, median, k, strategy, short, note)


def _finish(chosen: Tensor, losses: Tensor, grad_norms: Tensor, candidates: Tensor, median: float, k: int,
            strategy: str, short: bool, note: str) -> Selection:
    mask = torch.zeros(losses.numel(), dtype=torch.bool)
    mask[chosen] = True
    return Selection(chosen.long(), mask, grad_norms, losses, candidates, float(median), k, strategy, short, note)


def select(batch: Mapping[str, Tensor], model: nn.Module, *, ratio: float = 0.2, strategy: str = "moderate",
           loss_band: float | None = 1.0, seed: int | None = None, params: str = "trainable",
           backend: str = "auto") -> Selection:
    """Measure every example's loss and exact gradient norm in one batched pass, then apply Algorithm 1."""
    from fastsel.engine.norms import norm_pass

    check_options(ratio, strategy, loss_band)
    measured = norm_pass(batch, model, params=params, backend=backend)
    return select_indices(measured.losses, measured.norms, ratio=ratio, strategy=strategy,
                          loss_band=loss_band, seed=seed)
