"""Bootstrap CIs over seeds x items on distributions whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastsel.experiments.eval.bootstrap import as_matrix, bootstrap_ci, paired_difference_ci


def test_one_seed_bernoulli_matches_the_binomial_interval() -> None:
    """One seed: an ordinary bootstrap over items; for Bernoulli(0.3) items the half-width is 1.96 sqrt(pq/n)."""
    rng = np.random.default_rng(1)
    n, p = 3000, 0.3
    x = (rng.random((1, n)) < p).astype(float)
    out = bootstrap_ci(x, n_boot=4000)
    lo, hi = out["ci95"]
    assert out["mean"] == pytest.approx(x.mean()) and out["per_seed"] == [pytest.approx(x.mean())]
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=0.15)
    assert lo < p < hi


def test_normal_items_half_width() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(5.0, 2.0, size=(1, 1000))
    lo, hi = bootstrap_ci(x, n_boot=4000)["ci95"]
    assert (hi - lo) / 2 == pytest.approx(1.96 * 2.0 / math.sqrt(1000), rel=0.15)


def test_coverage_with_seed_and_item_effects() -> None:
    """X = mu + a_seed + b_item + noise (known mu): the 95% interval covers mu in about 95% of data sets, and is
    about as wide as the true standard error says (the crossed bootstrap's target)."""
    rng = np.random.default_rng(3)
    mu, s, j, sa, sb, se = 1.0, 20, 40, 1.0, 1.0, 0.5
    true_se = math.sqrt(sa ** 2 / s + sb ** 2 / j + se ** 2 / (s * j))
    covered, widths = 0, []
    for k in range(200):
        x = mu + rng.normal(0, sa, (s, 1)) + rng.normal(0, sb, (1, j)) + rng.normal(0, se, (s, j))
        lo, hi = bootstrap_ci(x, n_boot=500, seed=k)["ci95"]
        covered += lo <= mu <= hi
        widths.append((hi - lo) / (2 * 1.96))
    assert 0.88 <= covered / 200 <= 0.995
    assert float(np.median(widths)) == pytest.approx(true_se, rel=0.2)


def test_constant_and_paired() -> None:
    const = bootstrap_ci([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]])
    assert const == {"mean": 2.0, "ci95": [2.0, 2.0], "per_seed": [2.0, 2.0, 2.0]}
    rng = np.random.default_rng(4)
    b = rng.normal(0, 1, (3, 50))
    shifted = paired_difference_ci(b + 0.25, b)  # a shared component cancels exactly
    assert shifted["diff"] == pytest.approx(0.25) and shifted["ci95"] == pytest.approx([0.25, 0.25])
    a = b + 0.25 + rng.normal(0, 0.1, (3, 50))
    out = paired_difference_ci(a, b)
    assert out["ci95"][0] < 0.25 < out["ci95"][1] and out["ci95"][0] > 0  # paired: tight around the shift
    assert bootstrap_ci(a)["ci95"][0] < bootstrap_ci(b)["ci95"][1]  # while the marginal intervals overlap


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="same items"):
        as_matrix([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="same shape"):
        paired_difference_ci([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([[]])
