"""One optimizer step's log record, the same for `fastsel.train` (`log.jsonl`, its history) and the Trainer
integration (`fastsel_selection.jsonl`, `trainer.fastsel_log`): one builder, so each word means one thing.

batch_size: examples measured; candidates: those in the loss band (all for strategies without one); kept,
kept_fraction, kept_ids / dropped_ids (None when the examples have no ids); loss_kept: the kept examples' mean loss
(what the step trained on); loss_all: the mean over every example (comparable with plain training); norm_min,
norm_median, norm_max, norm_mean: over every measured example (None when the strategy measures no norm);
pass_reasons: which step ran, and why; score_mean / scored_harmful for the reference strategies.
"""

from __future__ import annotations

from typing import Any

import torch

from fastsel.selection.rules import Selection
from fastsel.utils import mean_or_none


class StepTally:
    """The selections of one optimizer step over its micro-batches, and the step's record fields."""

    def __init__(self, measures_norms: bool) -> None:
        self.measures_norms = measures_norms
        self.ids_known = True
        self.kept_ids: list[Any] = []
        self.dropped_ids: list[Any] = []
        self.kept_losses: list[float] = []
        self.all_losses: list[float] = []
        self.norms: list[float] = []
        self.scores: list[float] = []
        self.passes: list[str] = []
        self.in_band = 0
        self.reference = False

    def add(self, selection: Selection, ids: list[Any] | None) -> None:
        """One micro-batch's selection; `ids` per example (None: not tracked)."""
        mask, losses = selection.mask.tolist(), selection.losses.tolist()
        self.in_band += int(selection.candidates.sum())
        self.passes.append(getattr(selection, "pass_reason", "") or "selection, then one forward+backward of the kept rows with "
                                                    "the regularizers")
        if ids is None:
            self.ids_known = False
        else:
            self.kept_ids += [i for i, keep in zip(ids, mask, strict=True) if keep]
            self.dropped_ids += [i for i, keep in zip(ids, mask, strict=True) if not keep]
        self.kept_losses += [loss for loss, keep in zip(losses, mask, strict=True) if keep]
        self.all_losses += losses
        if self.measures_norms:
            self.norms += selection.grad_norms.tolist()
        if selection.scores is not None:
            self.reference = True
            self.scores += selection.scores.tolist()

    @property
    def kept(self) -> int:
        return len(self.kept_losses)

    def fields(self) -> dict[str, Any]:
        """The record's selection fields (the module docstring's names)."""
        record = {"loss_kept": mean_or_none(self.kept_losses), "loss_all": mean_or_none(self.all_losses),
                  **norm_stats(self.norms), "kept": self.kept, "batch_size": len(self.all_losses),
                  "candidates": self.in_band, "kept_fraction": self.kept / len(self.all_losses),
                  "skipped": not self.kept, "kept_ids": self.kept_ids if self.ids_known else None,
                  "dropped_ids": self.dropped_ids if self.ids_known else None, "pass_reasons": self.passes}
        if self.reference:  # the reference strategies' scores (positive: judged harmful)
            record.update(score_mean=mean_or_none(self.scores), scored_harmful=sum(1 for v in self.scores if v > 0))
        return record


def norm_stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"norm_min": None, "norm_median": None, "norm_max": None, "norm_mean": None}
    t = torch.tensor(values, dtype=torch.float64)
    return {"norm_min": float(t.min()), "norm_median": float(t.quantile(0.5)), "norm_max": float(t.max()),
            "norm_mean": float(t.mean())}


__all__ = ["StepTally", "norm_stats"]
