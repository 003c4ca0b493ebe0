"""gradshield and harmful_similarity against plain-Python references of their rules (hypothesis), end to end."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import lora, make_batch, tiny_model

import fastsel
from fastsel.selection.rules import largest_safe_set, select_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def gradshield_reference(dots: list[float], budget: float) -> list[int]:
    """The largest set of examples whose summed score -<g_i, grad S> is <= budget: the j lowest scores (ties to
    the lower index) for the largest such j, by trying every j from B down."""
    scores = [-d for d in dots]
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    for j in range(len(order), -1, -1):
        total = 0.0
        for i in order[:j]:
            total += scores[i]
        if total <= budget:
            return sorted(order[:j])
    return []


def similarity_reference(dots: list[list[float]], norms: list[float], ratio: float) -> list[int]:
    """He et al.: mean cosine to the harmful anchors minus mean cosine to the safe ones; keep the k lowest."""
    scores = []
    for row, n in zip(dots, norms, strict=True):
        sim = row[0] - row[1] if len(row) == 2 else row[0]
        scores.append(sim / n if n > 0 else 0.0)
    k = max(1, math.floor(ratio * len(scores)))
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


value = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)
tie_value = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 3.0])
positive = st.floats(min_value=0.25, max_value=10, width=32)
negative = st.floats(min_value=-10, max_value=-0.25, width=32)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), b=st.integers(1, 30), kind=st.sampled_from(["any", "ties", "all_harmful", "none_harmful"]),
       budget=st.sampled_from([0.0, 0.0, 1.5, -1.0, 100.0]))
def test_gradshield_matches_reference(data, b: int, kind: str, budget: float) -> None:
    elems = {"any": value, "ties": tie_value, "all_harmful": negative, "none_harmful": positive}[kind]
    dots = f32(data.draw(st.lists(elems, min_size=b, max_size=b)))  # harmful: <g_i, grad S> < 0
    expected = gradshield_reference(dots.double().tolist(), budget)
    got = select_indices(torch.rand(b), torch.rand(b) + 0.1, strategy="gradshield", dots=dots,
                         gradshield_budget=budget)
    assert got.indices.tolist() == expected
    assert got.mask.tolist() == [i in expected for i in range(b)]
    assert got.k == len(expected) and bool(got.note) == (not expected)
    torch.testing.assert_close(got.scores, -dots.double())
    if kind == "all_harmful" and budget <= 0:
        assert expected == []
    if kind == "none_harmful" and budget >= 0:
        assert expected == list(range(b))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), b=st.integers(1, 30), refs=st.sampled_from([1, 2]), ties=st.booleans(),
       ratio=st.sampled_from([1e-6, 0.2, 0.5, 1.0]), zero_norm=st.booleans())
def test_harmful_similarity_matches_reference(data, b: int, refs: int, ties: bool, ratio: float,
                                              zero_norm: bool) -> None:
    elems = tie_value if ties else value
    dots = f32([data.draw(st.lists(elems, min_size=refs, max_size=refs)) for _ in range(b)])
    norms = f32(data.draw(st.lists(st.sampled_from([1.0, 2.0]) if ties else positive, min_size=b, max_size=b)))
    if zero_norm:
        norms[0] = 0.0
        dots[0] = 0.0
    expected = similarity_reference(dots.double().tolist(), norms.double().tolist(), ratio)
    got = select_indices(torch.rand(b), norms, ratio=ratio, strategy="harmful_similarity",
                         dots=dots if refs == 2 else dots[:, 0])
    assert got.indices.tolist() == expected
    assert got.candidates.all()  # no loss band for the reference strategies


def test_gradshield_rule_is_swappable_and_cases_by_hand() -> None:
    dots = f32([1.0, -3.0, 0.5, 2.0, -1.0])  # scores -1, 3, -0.5, -2, 1: sorted -2, -1, -0.5, 1, 3
    assert largest_safe_set(-dots.double()).tolist() == [0, 2, 3, 4]  # -2-1-0.5+1 = -2.5 <= 0; +3 > 0
    assert largest_safe_set(-dots.double(), budget=-3.0).tolist() == [0, 2, 3]  # -3.5 <= -3, -2.5 is not
    assert largest_safe_set(-dots.double(), budget=-4.0).tolist() == []  # even the minimum -3.5 is over
    got = select_indices(torch.ones(5), torch.ones(5), strategy="gradshield", dots=dots,
                         gradshield_rule=lambda scores, budget: torch.tensor([1]))
    assert got.indices.tolist() == [1] and got.threshold == 3.0


def test_select_end_to_end_matches_the_references_on_measured_dots() -> None:
    model = lora(tiny_model())
    refusal = fastsel.reference_gradient(make_batch([6, 8, 5], seed=9), model)
    anchors = [fastsel.reference_gradient(make_batch([6, 8], seed=s), model, normalize=True) for s in (10, 11)]
    batch = make_batch([5, 9, 7, 6, 8, 4, 10, 5], side="left")
    naive = fastsel.norm_pass(batch, model, backend="naive", reference=refusal)
    sel = fastsel.select(batch, model, strategy="gradshield", reference=refusal, backend="torch")
    assert float((sel.scores + naive.dots.double()).abs().max()) <= 1e-5 * float(naive.dots.abs().max())
    assert sel.indices.tolist() == gradshield_reference((-sel.scores).tolist(), 0.0)
    sel = fastsel.select(batch, model, strategy="harmful_similarity", reference=anchors, ratio=0.25,
                         backend="torch")
    measured = fastsel.norm_pass(batch, model, backend="torch", reference=anchors)
    assert sel.indices.tolist() == similarity_reference(measured.dots.double().tolist(),
                                                        measured.norms.double().tolist(), 0.25)
    assert sel.num_selected == 2


def test_reference_option_errors() -> None:
    model = lora(tiny_model())
    ref = fastsel.reference_gradient(make_batch([6, 8], seed=9), model)
    batch = make_batch([5, 9, 7])
    with pytest.raises(ValueError, match="strategy 'gradshield' needs reference="):
        fastsel.select(batch, model, strategy="gradshield")
    with pytest.raises(ValueError, match="used only by the strategies"):
        fastsel.select(batch, model, strategy="moderate", reference=ref)
    with pytest.raises(ValueError, match="takes 1 or 2 reference"):
        fastsel.select(batch, model, strategy="harmful_similarity", reference=[ref, ref, ref])
    with pytest.raises(ValueError, match="takes 1 reference"):
        fastsel.select(batch, model, strategy="gradshield", reference=[ref, ref])
    with pytest.raises(ValueError, match="gradshield_budget"):
        fastsel.select(batch, model, strategy="gradshield", reference=ref, gradshield_budget=float("nan"))
    with pytest.raises(ValueError, match="needs the examples' gradient dots"):
        select_indices(torch.ones(3), torch.ones(3), strategy="gradshield")
