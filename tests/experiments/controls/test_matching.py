"""Matched designs: the greedy pairs against a plain reference, the SMD by hand, balance where it is promised."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsel.experiments.controls.matching import match_pairs, norm_and_length_designs, smd, thirds


def _reference_pairs(treated, control, on):  # noqa: ANN001, ANN202
    """Plain greedy matching: repeatedly the closest unused pair (ties: lowest distance, then indices)."""
    def sd(c):  # noqa: ANN001, ANN202
        def var(v):  # noqa: ANN001, ANN202
            m = sum(v) / len(v)
            return sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)
        return math.sqrt((var([r[c] for r in treated]) + var([r[c] for r in control])) / 2) or 1.0

    scale = {c: sd(c) for c in on}
    free_t, free_c, pairs = set(range(len(treated))), set(range(len(control))), []
    while free_t and free_c:
        best = min((math.sqrt(sum(((treated[i][c] - control[j][c]) / scale[c]) ** 2 for c in on)), i, j)
                   for i in free_t for j in free_c)
        pairs.append((best[1], best[2]))
        free_t.discard(best[1])
        free_c.discard(best[2])
    return pairs


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(1, 60)
        loss = rng.uniform(0.2, 3.0) + (1.5 if length < 10 else 0.0)
        norm = 5.0 / math.sqrt(length) + 0.3 * loss + rng.gauss(0, 0.3)  # short, high-loss rows: high norm
        rows.append({"id": f"r{i}", "answer_tokens": length, "loss": loss, "norm": norm})
    return rows


def test_smd_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
    pooled = math.sqrt((1.0 + 4.0) / 2)  # sample variances 1 and 4
    assert smd(a, b) == pytest.approx((2.0 - 4.0) / pooled)
    assert smd(a, b, scale=2.0) == pytest.approx(-1.0)
    assert smd([1.0, 1.0], [1.0, 1.0]) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=4, max_value=14))
def test_pairs_are_the_reference_greedy_prefix(seed: int, max_pairs: int) -> None:
    rows = _rows(60, seed)
    _, middle, high = thirds(rows, "norm")
    try:
        got = match_pairs(high, middle, on=("answer_tokens", "loss"), report=("norm",), max_pairs=max_pairs,
                          max_smd=0.25)
    except ValueError:
        return  # no balanced design: nothing to compare (refusal tested below)
    ref = _reference_pairs(high, middle, ("answer_tokens", "loss"))[: len(got.treated)]
    assert got.treated == [high[i]["id"] for i, _ in ref]
    assert got.control == [middle[j]["id"] for _, j in ref]
    assert len(set(got.treated)) == len(got.treated) and not set(got.treated) & set(got.control)


def test_norm_design_balances_length_and_loss_and_keeps_the_norm_apart() -> None:
    designs = norm_and_length_designs(_rows(240, 1), max_pairs=30)
    norm = designs["norm"].balance
    assert abs(norm["answer_tokens"]["after"]) < 0.1 and abs(norm["loss"]["after"]) < 0.1
    assert abs(norm["answer_tokens"]["before"]) > 0.1  # the pools differed in length: matching did the work
    assert norm["norm"]["after"] > 0.5  # the treatment stays: high against moderate norm
    length = designs["length"].balance
    assert abs(length["norm"]["after"]) < 0.1 and length["answer_tokens"]["after"] < -0.5  # short - long


def test_no_balanced_design_is_refused_by_name() -> None:
    treated = [{"id": i, "x": 10.0 + i} for i in range(5)]
    control = [{"id": 10 + i, "x": float(i)} for i in range(5)]
    with pytest.raises(ValueError, match=r"no matched design of >= 2 pairs has \|SMD\| < 0.1 on \['x'\]"):
        match_pairs(treated, control, on=("x",), report=("x",), max_pairs=5)
    with pytest.raises(ValueError, match="rows in both pools"):
        match_pairs([], control, on=("x",), report=("x",), max_pairs=5)
