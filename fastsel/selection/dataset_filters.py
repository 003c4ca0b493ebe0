"""Filters over a whole scored dataset (`fastsel score --filter`): the per-batch rules applied once to every example.

- `gradshield`: GradShield's dataset-level protocol: the largest set of examples whose summed safety score
  (-<g_i, grad S>) is <= `budget`, by binary search over the sorted scores of the whole set (`largest_safe_set`);
  the online per-batch rule of `select` is the same function on one batch.
- `moderate`: an offline variant of Algorithm 1 (Bach et al.): the loss band over the whole dataset, then the
  floor(ratio * N) candidates whose norm is closest to the candidates' median (`select_indices`). The paper applies
  it per batch during training; over the whole set it keeps the same kind of rows without the batch noise.
- `harmful_similarity` (He et al.): the floor(ratio * N) examples with the lowest bidirectional-anchoring score
  (the safest), ties to the lower position.

Each returns the kept positions (ascending) and what decided them (the threshold, the median, the counts), which
`fastsel score` writes to its filter summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastsel.selection import ops as select_ops
from fastsel.selection.rules import largest_safe_set, num_to_keep, reference_scores, select_indices

RULES = ("gradshield", "moderate", "harmful_similarity")
SCORE_COLUMNS = {"gradshield": "gradshield_score", "harmful_similarity": "harmful_similarity_score"}
# the named references each reference rule's score takes, in order (`fastsel score --references anchors` computes
# them): GradShield's grad S; He et al.'s harmful (and optional safe) mean unit anchor gradients
SCORE_REFERENCES = {"gradshield": ("safety",), "harmful_similarity": ("harm_unit", "safe_unit")}


@dataclass
class DatasetFilter:
    """The kept positions of a whole-dataset filter (ascending) and the numbers that decided them."""

    rule: str
    kept: Tensor
    total: int
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"rule": self.rule, "kept": int(self.kept.numel()), "dropped": self.total - int(self.kept.numel()),
                "total": self.total, **self.details}


def reference_rule_scores(names: list[str], dots: Tensor, norms: Tensor) -> dict[str, list[float]]:
    """Each reference rule's per-example score column (`SCORE_COLUMNS`) from the dots [N, K] with the references
    `names` and the norms [N], for the rules whose first reference is among `names`
    (`selection.rules.reference_scores`)."""
    out = {}
    for rule, wanted in SCORE_REFERENCES.items():
        cols = [names.index(n) for n in wanted if n in names]
        if wanted[0] in names:
            out[SCORE_COLUMNS[rule]] = reference_scores(rule, dots[:, cols], norms).tolist()
    return out


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown filter {rule!r}; known filters: {', '.join(RULES)}")


def filter_dataset(rule: str, *, losses: Tensor | None = None, norms: Tensor | None = None,
                   scores: Tensor | None = None, ratio: float = 0.2, budget: float = 0.0,
                   loss_band: float | None = 1.0) -> DatasetFilter:
    """Apply `rule` to the whole dataset's per-example losses, norms and (reference rules) scores."""
    check_rule(rule)
    if rule == "gradshield":
        values = _needed(scores, "scores (gradshield_score)", rule)
        kept = largest_safe_set(values, budget)
        threshold = float(values[kept].max()) if kept.numel() else None
        return DatasetFilter(rule, kept, values.numel(), {"budget": budget, "threshold": threshold,
                                                          "harmful": int((values > 0).sum())})
    if rule == "harmful_similarity":
        values = _needed(scores, "scores (harmful_similarity_score)", rule)
        k = num_to_keep(ratio, values.numel())
        kept = select_ops.extreme_k(values.double(), k, False).sort().values
        return DatasetFilter(rule, kept, values.numel(), {"ratio": ratio, "k": k,
                                                          "threshold": float(values[kept].max()) if k else None})
    losses, norms = _needed(losses, "losses", rule), _needed(norms, "norms", rule)
    selection = select_indices(losses, norms, ratio=ratio, strategy="moderate", loss_band=loss_band)
    return DatasetFilter(rule, selection.indices.sort().values, losses.numel(),
                         {"ratio": ratio, "loss_band": loss_band, "k": selection.k, "median": selection.median,
                          "candidates": int(selection.candidates.sum())})


def _needed(values: Tensor | None, what: str, rule: str) -> Tensor:
    if values is None:
        raise ValueError(f"filter {rule!r} needs the {what} column: score with references (--references anchors)"
                         if "score" in what else f"filter {rule!r} needs the {what}")
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError(f"filter {rule!r}: the dataset is empty")
    bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"filter {rule!r}: non-finite {what} at positions {bad[:10]}")
    return values


__all__ = ["RULES", "SCORE_COLUMNS", "SCORE_REFERENCES", "DatasetFilter", "check_rule", "filter_dataset",
           "reference_rule_scores"]
