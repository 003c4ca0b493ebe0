"""Algorithm 1 of Bach et al. (Moderate-G) and its low/high/random variants, over per-example losses and norms.

Rule: candidates are the examples with |L_i - mean(L)| <= loss_band * std(L) (population std; loss_band=None keeps
all); k = max(1, floor(ratio * B)); `moderate` keeps the k candidates whose gradient norm is closest to the
candidates' median (mean of the two middle values for an even count; ties -> lower batch index), `low` the k
smallest, `high` the k largest, `random` k candidates uniformly (seeded), `full` every example. With fewer
candidates than k, all candidates are kept and the Selection says so. The ops run in fastsel._C when it is built.

Safety-aware strategies, from every example's exact dot <g_i, R> with reference gradients (g_i = grad L_i;
`fastsel.norm_pass(..., reference=...)`); they use neither the loss band nor (gradshield) the ratio:
- `gradshield` (GradShield, arXiv 2605.14194): R = grad S, the gradient of a safety loss S (e.g. the loss of
  refusals to harmful prompts). score_i = -<g_i, grad S> is, up to the learning rate, the first-order change of S
  from an SGD step on example i (positive: the step makes the model less safe). The paper's threshold search is
  not public; fastsel's documented rule (`largest_safe_set`) keeps the largest set of examples whose summed score
  is <= `gradshield_budget` (0: the kept set's mean step does not increase S to first order): the j lowest scores
  for the largest such j, found by binary search over the sorted scores' prefix sums, i.e. a threshold set by
  the data without knowing how much of it is harmful. Ties at the threshold keep the lower batch index first;
  an all-harmful batch keeps nothing (the step is skipped), a none-harmful one keeps all. Swap the rule by
  passing `gradshield_rule=` (a function (scores, budget) -> kept batch positions).
- `harmful_similarity` (He, Xia & Henderson 2024, bidirectional anchoring): references R_harm and optionally
  R_safe, each the mean of unit-normalized anchor gradients (`reference_gradient(..., normalize=True)`);
  score_i = <g_i/||g_i||, R_harm> - <g_i/||g_i||, R_safe> = mean cosine to the harmful anchors minus mean cosine
  to the safe ones (0 for a zero gradient). The k = max(1, floor(ratio B)) lowest-scoring (safest) examples are
  kept, ties to the lower batch index.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastsel.selection import ops as select_ops
from fastsel.selection import strategies
from fastsel.selection.strategies import DEFAULT

GradShieldRule = Callable[[Tensor, float], Tensor]  # (float64 scores [B], budget) -> kept batch positions


@dataclass
class Selection:
    """Which examples of a batch to train on, and the measurements that decided it."""

    indices: Tensor  # sorted LongTensor of kept batch positions
    mask: Tensor  # bool [B]
    grad_norms: Tensor  # [B] fp32 (NaN-free); empty measurements are zeros for strategy 'full'/'random'
    losses: Tensor  # [B] fp32
    candidates: Tensor  # bool [B]
    median: float  # median gradient norm over the candidates (NaN when there is none)
    k: int  # how many the rule keeps: max(1, floor(ratio B)) for the ratio rules; gradshield: its safe set's size
    strategy: str
    short_of_candidates: bool = False  # fewer candidates than k: all candidates kept
    note: str = ""
    scores: Tensor | None = None  # [B] float64 harmfulness scores of the reference strategies (None otherwise)
    threshold: float | None = None  # the largest kept score (reference strategies; None when nothing is kept)

    @property
    def num_selected(self) -> int:
        return int(self.indices.numel())


def check_options(ratio: float, strategy_name: str, loss_band: float | None) -> None:
    """Reject bad selection options with a message naming the problem."""
    strategies.strategy(strategy_name)  # unknown: ValueError naming the choices
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if loss_band is not None and (isinstance(loss_band, bool) or not isinstance(loss_band, (int, float))
                                  or not loss_band >= 0 or math.isinf(loss_band)):
        raise ValueError(f"loss_band must be a finite number >= 0 or None, got {loss_band!r}")


def needs_reference(name: str) -> bool:
    """Whether strategy `name` scores examples by their gradient dots with reference gradients."""
    return strategies.strategy(name).references is not None


def needs_measurement(name: str) -> bool:
    """Whether strategy `name` needs the norm pass (norms, or dots with references)."""
    return strategies.strategy(name).needs_measurement


REFERENCE_HINTS = {  # what to pass as reference= to a reference strategy
    "gradshield": "the gradient of a safety loss, e.g. fastsel.reference_gradient(refusal_batch, model)",
    "harmful_similarity": "[R_harm, R_safe] from fastsel.reference_gradient(anchor_batch, model, normalize=True)",
}


def check_reference_option(name: str, reference: object | None, what: str = "reference") -> None:
    """A reference strategy without a reference, or a reference given to a strategy that ignores it: ValueError."""
    if needs_reference(name) and reference is None:
        raise ValueError(f"strategy {name!r} needs {what}= ({REFERENCE_HINTS.get(name, 'reference gradients')})")
    if reference is not None and not needs_reference(name):
        users = tuple(n for n in REFERENCE_HINTS if needs_reference(n))
        raise ValueError(f"{what}= is used only by the strategies {users}, not by {name!r}")


def check_budget(budget: float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"gradshield_budget must be a finite number, got {budget!r}")


def largest_safe_set(scores: Tensor, budget: float = 0.0) -> Tensor:
    """GradShield's threshold rule: the batch positions of the largest set whose summed score is <= `budget`.

    For any set of j examples the summed score is at least the sum P_j of the j lowest scores, so the answer is
    the j lowest (stable order: ties to the lower position) for the largest j with P_j <= budget. Sorted
    ascending, P decreases while scores are negative and never decreases after, so that j is found by binary
    search on the non-decreasing part (empty when even its minimum exceeds the budget). Sums run left to right
    in float64, as a plain-Python loop would.
    """
    values = scores.detach().double().cpu()
    order = torch.sort(values, stable=True).indices
    ordered = values[order].tolist()
    prefix = [0.0, *itertools.accumulate(ordered)]
    low = sum(1 for v in ordered if v < 0)  # argmin of the prefix sums
    if prefix[low] > budget:
        return torch.zeros(0, dtype=torch.long)
    keep = low + bisect.bisect_right(prefix[low:], budget) - 1
    return order[:keep].sort().values


def reference_scores(name: str, dots: Tensor, grad_norms: Tensor) -> Tensor:
    """float64 [B] scores of a reference strategy from dots ([B] or [B, K]) and norms [B] (module docstring)."""
    strategy_ = strategies.strategy(name)
    lo, hi = strategy_.references
    d = dots.detach().double().cpu()
    d = d[:, None] if d.dim() == 1 else d
    if d.dim() != 2 or d.shape[0] != grad_norms.numel() or not lo <= d.shape[1] <= hi:
        raise ValueError(f"strategy {name!r} takes {lo if lo == hi else f'{lo} or {hi}'} reference(s): "
                         f"dots must be [B] or [B, K] with B = {grad_norms.numel()}, got {tuple(dots.shape)}")
    if not bool(torch.isfinite(d).all()):
        bad = (~torch.isfinite(d)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"non-finite gradient dots for example(s) {bad}")
    if not strategy_.normalized_anchors:  # gradshield: minus the dot with grad S
        return -d[:, 0]
    norms = grad_norms.detach().double().cpu()
    similarity = d[:, 0] - d[:, 1] if d.shape[1] == 2 else d[:, 0]
    return torch.where(norms > 0, similarity / torch.where(norms > 0, norms, 1.0), 0.0)


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


def select_indices(losses: Tensor, grad_norms: Tensor, *, ratio: float = 0.2, strategy: str = DEFAULT,
                   loss_band: float | None = 1.0, seed: int | None = None, dots: Tensor | None = None,
                   gradshield_budget: float = 0.0, gradshield_rule: GradShieldRule | None = None) -> Selection:
    """Apply the selection rule to measured per-example losses and gradient norms (both [B]); the reference
    strategies also take `dots` ([B] or [B, K]: <grad L_i, R_k>)."""
    check_options(ratio, strategy, loss_band)
    check_budget(gradshield_budget)
    losses = losses.detach().float().cpu()
    grad_norms = grad_norms.detach().float().cpu()
    if losses.dim() != 1 or losses.shape != grad_norms.shape or losses.numel() == 0:
        raise ValueError(f"losses and grad_norms must be equal-length non-empty 1-D tensors, got "
                         f"{tuple(losses.shape)} and {tuple(grad_norms.shape)}")
    batch_size = losses.numel()
    k = num_to_keep(ratio, batch_size)
    if needs_reference(strategy):
        if dots is None:
            raise ValueError(f"strategy {strategy!r} needs the examples' gradient dots with its reference (dots=)")
        return _select_by_reference(losses, grad_norms, reference_scores(strategy, dots, grad_norms), k, strategy,
                                    gradshield_budget, gradshield_rule or largest_safe_set)
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


def _select_by_reference(losses: Tensor, grad_norms: Tensor, scores: Tensor, k: int, strategy: str,
                         budget: float, rule: GradShieldRule) -> Selection:
    """gradshield: the rule's kept set; harmful_similarity: the k lowest scores (ties to the lower index)."""
    batch_size = losses.numel()
    if strategy == "gradshield":
        chosen = torch.as_tensor(rule(scores, float(budget)), dtype=torch.long).flatten().sort().values
        k = int(chosen.numel())
        harmful = int((scores > 0).sum())
        note = "" if k else f"gradshield: no subset has summed safety score <= {budget} ({harmful} of " \
                            f"{batch_size} examples score > 0): nothing kept"
    else:
        chosen = select_ops.extreme_k(scores, min(k, batch_size), False).sort().values
        note = ""
    candidates = torch.ones(batch_size, dtype=torch.bool)
    selection = _finish(chosen, losses, grad_norms, candidates, select_ops.median(grad_norms), k, strategy,
                        False, note)
    selection.scores = scores
    selection.threshold = float(scores[chosen].max()) if chosen.numel() else None
    return selection


def _finish(chosen: Tensor, losses: Tensor, grad_norms: Tensor, candidates: Tensor, median: float, k: int,
            strategy: str, short: bool, note: str) -> Selection:
    mask = torch.zeros(losses.numel(), dtype=torch.bool)
    mask[chosen] = True
    return Selection(chosen.long(), mask, grad_norms, losses, candidates, float(median), k, strategy, short, note)


def select(batch: Mapping[str, Tensor], model: nn.Module, *, ratio: float = 0.2, strategy: str = DEFAULT,
           loss_band: float | None = 1.0, seed: int | None = None, params: str = "trainable",
           backend: str = "auto", reference: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | None = None,
           gradshield_budget: float = 0.0, gradshield_rule: GradShieldRule | None = None) -> Selection:
    """Measure every example's loss and exact gradient norm (and, for `gradshield` / `harmful_similarity`, its
    dots with `reference`) in one batched pass, then apply the strategy's rule."""
    from fastsel.engine.norms import norm_pass

    check_options(ratio, strategy, loss_band)
    check_reference_option(strategy, reference)
    check_budget(gradshield_budget)
    measured = norm_pass(batch, model, params=params, backend=backend, reference=reference)
    return select_indices(measured.losses, measured.norms, ratio=ratio, strategy=strategy,
                          loss_band=loss_band, seed=seed, dots=measured.dots, gradshield_budget=gradshield_budget,
                          gradshield_rule=gradshield_rule)
