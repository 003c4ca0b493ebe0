"""The one step record of `train` and the Trainer integration, against a hand computation."""
from __future__ import annotations

import torch

from fastsel.selection.rules import select_indices
from fastsel.training.step_log import StepTally


def test_two_micro_batches_against_a_hand_computation() -> None:
    first = select_indices(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([0.5, 1.0, 2.0, 4.0]), ratio=0.5,
                           strategy="moderate", loss_band=1.0)
    second = select_indices(torch.tensor([4.0, 4.0]), torch.tensor([3.0, 1.0]), ratio=0.5, strategy="low",
                            loss_band=None)
    tally = StepTally(measures_norms=True)
    tally.add(first, ["a", "b", "c", "d"])
    tally.add(second, ["e", "f"])
    record = tally.fields()
    kept = first.indices.tolist()
    assert record["candidates"] == int(first.candidates.sum()) + 2 and record["batch_size"] == 6
    assert record["kept_ids"] == [["a", "b", "c", "d"][i] for i in kept] + ["f"]
    assert set(record["dropped_ids"]) | set(record["kept_ids"]) == set("abcdef")
    assert record["kept"] == len(kept) + 1 and record["kept_fraction"] == record["kept"] / 6
    losses = [1.0, 2.0, 3.0, 10.0, 4.0, 4.0]
    assert abs(record["loss_all"] - sum(losses) / 6) < 1e-12
    assert abs(record["loss_kept"] - (sum(losses[i] for i in kept) + 4.0) / record["kept"]) < 1e-6
    assert record["norm_median"] == 1.5 and record["norm_min"] == 0.5 and record["norm_max"] == 4.0  # all six rows
    assert len(record["pass_reasons"]) == 2 and "score_mean" not in record


def test_examples_without_ids_and_strategies_without_norms() -> None:
    sel = select_indices(torch.tensor([1.0, 2.0]), torch.zeros(2), ratio=1.0, strategy="full")
    tally = StepTally(measures_norms=False)
    tally.add(sel, None)
    record = tally.fields()
    assert record["kept_ids"] is None and record["dropped_ids"] is None and record["kept"] == 2
    assert record["norm_median"] is None and not record["skipped"]
