"""The whole-dataset filters against plain-Python references on random scores: ties, all / none kept, budgets."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reference_rules import gradshield_reference
from test_rules import reference as moderate_reference

from fastsel.selection.dataset_filters import filter_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

value = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)
tie_value = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 3.0])


def lowest_reference(scores: list[float], ratio: float) -> list[int]:
    k = max(1, math.floor(ratio * len(scores)))
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), ties=st.booleans(),
       budget=st.sampled_from([0.0, -1.0, 2.5, 1e9, -1e9]))
def test_gradshield_is_the_largest_set_within_budget(data, n: int, ties: bool, budget: float) -> None:
    scores = data.draw(st.lists(tie_value if ties else value, min_size=n, max_size=n))
    got = filter_dataset("gradshield", scores=torch.tensor(scores, dtype=torch.float32), budget=budget)
    dots = [-float(torch.tensor(s, dtype=torch.float32)) for s in scores]  # the reference takes <g_i, grad S>
    expected = gradshield_reference(dots, budget)
    assert got.kept.tolist() == expected
    assert got.summary()["kept"] == len(expected) and got.summary()["dropped"] == n - len(expected)
    if budget == 1e9:
        assert expected == list(range(n))  # none harmful enough: all kept
    if budget == -1e9:
        assert expected == []  # nothing fits: none kept


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), ties=st.booleans(), ratio=st.sampled_from([1e-6, 0.2, 0.5, 1.0]))
def test_harmful_similarity_keeps_the_safest(data, n: int, ties: bool, ratio: float) -> None:
    scores = data.draw(st.lists(tie_value if ties else value, min_size=n, max_size=n))
    got = filter_dataset("harmful_similarity", scores=torch.tensor(scores, dtype=torch.float32), ratio=ratio)
    assert got.kept.tolist() == lowest_reference(scores, ratio)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), ties=st.booleans(), ratio=st.sampled_from([0.2, 0.5, 1.0]),
       band=st.sampled_from([None, 0.5, 1.0]))
def test_moderate_is_algorithm_1_over_the_whole_set(data, n: int, ties: bool, ratio: float,
                                                    band: float | None) -> None:
    losses = data.draw(st.lists(tie_value if ties else value, min_size=n, max_size=n))
    norms = data.draw(st.lists(st.floats(0.0, 10.0, width=32), min_size=n, max_size=n))
    got = filter_dataset("moderate", losses=torch.tensor(losses), norms=torch.tensor(norms), ratio=ratio,
                         loss_band=band)
    assert got.kept.tolist() == moderate_reference(losses, norms, ratio, "moderate", band)[0]


def test_bad_filters_are_named() -> None:
    with pytest.raises(ValueError, match="unknown filter 'safest'; known filters: gradshield, moderate"):
        filter_dataset("safest", losses=torch.ones(3), norms=torch.ones(3))
    with pytest.raises(ValueError, match="filter 'gradshield' needs the scores .*--references anchors"):
        filter_dataset("gradshield", losses=torch.ones(3), norms=torch.ones(3))
    with pytest.raises(ValueError, match="the dataset is empty"):
        filter_dataset("harmful_similarity", scores=torch.zeros(0))
    with pytest.raises(ValueError, match=r"non-finite scores .* positions \[1\]"):
        filter_dataset("gradshield", scores=torch.tensor([0.0, math.nan]))
