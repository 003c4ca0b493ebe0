"""`select` / `select_indices` against a plain-Python reference of Algorithm 1 (Moderate-G and variants)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import lora, make_batch, tiny_model

import fastsel
from fastsel.selection.rules import select_indices


def reference(losses: list[float], norms: list[float], ratio: float, strategy: str, band: float | None,
              seed: int | None = None) -> tuple[list[int], list[bool], float, bool]:
    """Algorithm 1 on Python floats: (kept indices, candidate mask, median, short_of_candidates)."""
    b = len(losses)
    k = max(1, math.floor(ratio * b))
    if band is None:
        cand = [True] * b
    else:
        mean = sum(losses) / b
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / b)
        cand = [abs(x - mean) <= band * std for x in losses]
    idx = [i for i in range(b) if cand[i]]
    vals = sorted(norms[i] for i in idx)
    n = len(vals)
    if n == 0:
        return [], cand, math.nan, True
    med = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
    if n <= k:
        return idx, cand, med, n < k
    if strategy == "moderate":
        kept = sorted(idx, key=lambda i: (abs(norms[i] - med), i))[:k]
    elif strategy == "low":
        kept = sorted(idx, key=lambda i: (norms[i], i))[:k]
    elif strategy == "high":
        kept = sorted(idx, key=lambda i: (-norms[i], i))[:k]
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        kept = [idx[j] for j in perm[:k]]
    return sorted(kept), cand, med, False


def check(losses: list[float], norms: list[float], ratio: float, strategy: str, band: float | None,
          seed: int | None = 0) -> None:
    lt = torch.tensor(losses, dtype=torch.float32)
    nt = torch.tensor(norms, dtype=torch.float32)
    # the reference sees exactly the float32 values the engine sees
    losses, norms = lt.double().tolist(), nt.double().tolist()
    got = select_indices(lt, nt, ratio=ratio, strategy=strategy, loss_band=band, seed=seed)
    kept, cand, med, short = reference(losses, norms, ratio, strategy, band, seed)
    assert got.indices.tolist() == kept
    assert got.candidates.tolist() == cand
    assert got.mask.tolist() == [i in kept for i in range(len(losses))]
    assert got.median == med or (math.isnan(med) and math.isnan(got.median))
    assert got.short_of_candidates == short
    assert bool(got.note) == short
    assert got.indices.dtype == torch.long


STRATS = ["moderate", "low", "high", "random"]
small_floats = st.floats(min_value=0, max_value=10, allow_nan=False, width=32)
tie_floats = st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0])


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    b=st.integers(1, 40),
    ratio=st.one_of(st.sampled_from([1e-6, 0.2, 0.5, 0.999, 1.0]), st.floats(0.01, 1.0)),
    strategy=st.sampled_from(STRATS),
    band=st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 2.0])),
    ties=st.booleans(),
)
def test_matches_reference(data, b, ratio, strategy, band, ties) -> None:
    elems = tie_floats if ties else small_floats
    losses = data.draw(st.lists(elems, min_size=b, max_size=b))
    norms = data.draw(st.lists(elems, min_size=b, max_size=b))
    check(losses, norms, ratio, strategy, band, seed=data.draw(st.integers(0, 1000)))


@pytest.mark.parametrize("strategy", STRATS)
def test_adversarial_cases(strategy: str) -> None:
    check([2.0] * 10, [1.0] * 10, 0.2, strategy, 1.0)  # equal losses: std 0, all candidates; all-equal norms
    check([1.0, 5.0, 1.0, 5.0], [3.0, 1.0, 2.0, 4.0], 0.5, strategy, 1.0)
    check([0.5], [7.0], 0.2, strategy, 1.0)  # B = 1
    check([1.0, 2.0, 3.0, 4.0, 100.0], [5.0, 4.0, 3.0, 2.0, 1.0], 1e-9, strategy, 1.0)  # ratio near 0: k = 1
    check([1.0, 2.0, 3.0, 4.0, 100.0], [5.0, 4.0, 3.0, 2.0, 1.0], 1.0, strategy, 1.0)  # ratio 1: short
    check([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 3.0, 1.0], 0.5, strategy, None)  # median 2.0, four-way tie
    check([0.0, 10.0] * 5, [1.0, 2.0] * 5, 0.2, strategy, 0.0)  # band 0: no candidates equal the mean


def test_moderate_picks_middle_norms() -> None:
    norms = [0.1, 9.0, 5.0, 4.0, 6.0, 0.2, 8.5, 5.1, 4.9, 0.3]
    got = select_indices(torch.ones(10), torch.tensor(norms), ratio=0.3, strategy="moderate")
    assert got.indices.tolist() == [2, 7, 8]
    assert got.median == pytest.approx(4.95)


def test_random_is_seeded() -> None:
    losses, norms = torch.rand(30), torch.rand(30)
    a = select_indices(losses, norms, strategy="random", seed=3)
    b = select_indices(losses, norms, strategy="random", seed=3)
    assert torch.equal(a.indices, b.indices)


def test_full_keeps_everything() -> None:
    got = select_indices(torch.rand(7), torch.rand(7), strategy="full")
    assert got.indices.tolist() == list(range(7))


def test_select_end_to_end_matches_reference_on_measured_values() -> None:
    model = lora(tiny_model())
    batch = make_batch([5, 9, 7, 6, 8, 4, 10, 5, 6, 7], side="left")
    sel = fastsel.select(batch, model, ratio=0.3, backend="torch")
    naive = fastsel.grad_norms(batch, model, backend="naive")
    torch.testing.assert_close(sel.grad_norms, naive, rtol=1e-5, atol=0)
    kept, cand, med, short = reference(sel.losses.double().tolist(), sel.grad_norms.double().tolist(), 0.3,
                                       "moderate", 1.0)
    assert sel.indices.tolist() == kept and sel.candidates.tolist() == cand and sel.median == med
    assert sel.indices.numel() == 3
