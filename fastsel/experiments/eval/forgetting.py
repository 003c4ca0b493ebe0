"""Continual-learning metrics from an accuracy matrix.

R is N x N: R[i][j] is the score on task j after training stage i (stage i trains task i). Scores are in any
consistent unit (fastsel uses 0-100). NaN entries (a task not evaluated at a stage) are ignored where a max or
mean allows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastsel.utils import mean_or_none

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> list[list[float]]:
    rows = [[float(x) for x in row] for row in R]
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows):
        raise ValueError(f"R must be a non-empty square matrix (stages x tasks), got shape "
                         f"{[len(r) for r in rows]}")
    return rows


def _mean(values: list[float]) -> float:
    """mean_or_none, NaN where no value is measured (the metrics' convention)."""
    mean = mean_or_none(values)
    return math.nan if mean is None else mean


def average_performance(R: Matrix) -> float:
    """Average performance after the last stage: (1/N) sum_j R[N-1][j]."""
    rows = _check(R)
    return _mean(rows[-1])


def backward_transfer(R: Matrix) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory for Continual Learning"):
    (1/(N-1)) sum_{j=0}^{N-2} (R[N-1][j] - R[j][j]). Negative values mean forgetting; NaN for N = 1."""
    rows = _check(R)
    n = len(rows)
    return _mean([rows[n - 1][j] - rows[j][j] for j in range(n - 1)])


def forgetting_measure(R: Matrix) -> float:
    """Average forgetting (Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning"):
    (1/(N-1)) sum_{j=0}^{N-2} f_j with f_j = max_{l in 0..N-2} R[l][j] - R[N-1][j]. Positive values mean
    forgetting; NaN for N = 1."""
    rows = _check(R)
    n = len(rows)
    out = []
    for j in range(n - 1):
        earlier = [rows[s][j] for s in range(n - 1) if not math.isnan(rows[s][j])]
        out.append(max(earlier) - rows[n - 1][j] if earlier else math.nan)
    return _mean(out)


def max_stage_drop(R: Matrix) -> float:
    """Largest single-stage drop on an already trained task: max over i >= 1, j < i of R[i-1][j] - R[i][j]
    (negative if every trained task improved at every stage; NaN for N = 1)."""
    rows = _check(R)
    drops = [rows[i - 1][j] - rows[i][j] for i in range(1, len(rows)) for j in range(i)]
    drops = [d for d in drops if not math.isnan(d)]
    return max(drops) if drops else math.nan


def continual_metrics(R: Matrix) -> dict[str, float]:
    """{"avg": average_performance, "bwt": backward_transfer, "fm": forgetting_measure,
    "max_drop": max_stage_drop} of the accuracy matrix R."""
    return {"avg": average_performance(R), "bwt": backward_transfer(R), "fm": forgetting_measure(R),
            "max_drop": max_stage_drop(R)}
