"""Bootstrap confidence intervals over seeds x items (prompts, held-out rows).

A metric of a strategy is a matrix X[s, j]: seed s (a fine-tuning run) on item j (a prompt, the same prompts
for every seed). Its estimate is the grand mean. Both seeds and items are samples (a new seed trains a different
model; a new prompt set asks different things), so each bootstrap replicate resamples both, the seeds and the
items with replacement, independently ("pigeonhole" bootstrap, Owen 2007), and takes the mean of the resampled
cells. The 95% interval is the 2.5 / 97.5 percentile of the replicates. Paired differences (strategy A - B)
apply the same resampled seeds and items to both matrices, so what the two share (the prompt set, a seed's
initialisation and data order) cancels.

With 3 seeds the seed part of the interval is coarse (a bootstrap over 3 values); with one seed the interval
is over items only. The crossed bootstrap is conservative when seeds and items have no effects of their own
(independent cells): its variance is then up to 3x the true one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def as_matrix(values: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """[seeds, items] float array; every seed must have the same items, every value finite."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except ValueError as e:  # ragged
        raise ValueError(f"every seed needs a value for the same items (a seeds x items matrix): {e}") from None
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"expected a non-empty seeds x items matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the matrix holds NaN or infinite values")
    return x


def _weights(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n] multinomial counts: how often each index is drawn in each replicate."""
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts


def _replicates(mats: Sequence[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Bootstrap means of each matrix under shared resampled seeds and items."""
    s, j = mats[0].shape
    rng = np.random.default_rng(seed)
    ws, wj = _weights(rng, s, n_boot), _weights(rng, j, n_boot)
    return [np.einsum("rs,sj,rj->r", ws, m, wj) / (s * j) for m in mats]


def _interval(reps: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[Sequence[float]] | np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci95": [lo, hi], "per_seed": [mean of each seed's items]} of a seeds x items matrix."""
    x = as_matrix(values)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    (reps,) = _replicates([x], n_boot, seed)
    return {"mean": float(x.mean()), "ci95": _interval(reps, level), "per_seed": [float(v) for v in x.mean(1)]}


def paired_difference_ci(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray, *,
                         n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
    """mean(a) - mean(b) with its interval, both matrices resampled with the same seeds and items."""
    x, y = as_matrix(a), as_matrix(b)
    if x.shape != y.shape:
        raise ValueError(f"paired matrices must have the same shape, got {x.shape} and {y.shape}")
    ra, rb = _replicates([x, y], n_boot, seed)
    return {"diff": float(x.mean() - y.mean()), "ci95": _interval(ra - rb, level)}
