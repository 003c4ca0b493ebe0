"""Matched sets for the confounder controls: two groups of training rows, equal in size, that differ in one
covariate (the treatment: the gradient norm, or the response length) and are balanced on the others.

Greedy nearest-neighbour pair matching without replacement: every (treated, control) pair is scored by the
Euclidean distance of its matched covariates, each standardized by the pooled standard deviation of the two pools;
the closest remaining pair is taken first. The pairs' order is fixed, so the matched sets of size n are the first
n pairs; `match_pairs` keeps the largest n (up to `max_pairs`) whose standardized mean differences (SMD) on every
matched covariate are all below `max_smd` (0.1, the usual balance threshold). The balance table reports the SMD of
every covariate before (the two pools) and after (the matched sets), always over the pools' pooled deviation, so
before and after are on one scale.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]


def _var(values: Sequence[float]) -> float:
    """The sample variance; 0 for a single value."""
    return statistics.variance(values) if len(values) > 1 else 0.0


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt((var a + var b) / 2), the sample variances of two groups."""
    return math.sqrt((_var(a) + _var(b)) / 2)


def smd(a: Sequence[float], b: Sequence[float], scale: float | None = None) -> float:
    """Standardized mean difference (mean a - mean b) / scale (default: the pooled SD of a and b); 0 when the
    scale is 0."""
    scale = pooled_sd(a, b) if scale is None else scale
    return 0.0 if scale == 0 else (statistics.fmean(a) - statistics.fmean(b)) / scale


@dataclass(frozen=True)
class Matched:
    """A matched design: the treated and control rows' ids (pair k is treated[k], control[k]) and the balance."""

    treated: list[Any]
    control: list[Any]
    balance: dict[str, dict[str, float]]  # covariate -> {"before", "after"} SMD (treated - control)

    def to_json(self) -> dict[str, Any]:
        return {"treated": self.treated, "control": self.control, "pairs": len(self.treated),
                "balance": self.balance}


def _ordered_pairs(treated: Sequence[Row], control: Sequence[Row], on: Sequence[str],
                   scales: Mapping[str, float]) -> list[tuple[int, int]]:
    """Greedy nearest-neighbour pairs (indices into treated, control), closest first, each row used once."""
    scored = sorted((math.sqrt(sum(((t[c] - k[c]) / (scales[c] or 1.0)) ** 2 for c in on)), i, j)
                    for i, t in enumerate(treated) for j, k in enumerate(control))
    used_t: set[int] = set()
    used_c: set[int] = set()
    pairs = []
    for _, i, j in scored:
        if i not in used_t and j not in used_c:
            used_t.add(i)
            used_c.add(j)
            pairs.append((i, j))
    return pairs


def balance_table(treated: Sequence[Row], control: Sequence[Row], pool_t: Sequence[Row], pool_c: Sequence[Row],
                  covariates: Sequence[str]) -> dict[str, dict[str, float]]:
    """covariate -> {"before": SMD of the pools, "after": SMD of the matched sets} over the pools' pooled SD."""
    table = {}
    for c in covariates:
        scale = pooled_sd([r[c] for r in pool_t], [r[c] for r in pool_c])
        table[c] = {"before": smd([r[c] for r in pool_t], [r[c] for r in pool_c], scale),
                    "after": smd([r[c] for r in treated], [r[c] for r in control], scale) if treated else math.nan}
    return table


def match_pairs(pool_t: Sequence[Row], pool_c: Sequence[Row], *, on: Sequence[str], report: Sequence[str],
                max_pairs: int, max_smd: float = 0.1, min_pairs: int = 2, id_key: str = "id") -> Matched:
    """The largest greedy-matched design of at most `max_pairs` pairs balanced on `on` (|SMD| < max_smd each);
    `report`: the covariates of the balance table (those matched on and the treatment). ValueError when not even
    `min_pairs` pairs balance."""
    if not pool_t or not pool_c:
        raise ValueError(f"matching needs rows in both pools, got {len(pool_t)} and {len(pool_c)}")
    scales = {c: pooled_sd([r[c] for r in pool_t], [r[c] for r in pool_c]) for c in on}
    pairs = _ordered_pairs(pool_t, pool_c, on, scales)
    for n in range(min(max_pairs, len(pairs)), min_pairs - 1, -1):
        treated, control = [pool_t[i] for i, _ in pairs[:n]], [pool_c[j] for _, j in pairs[:n]]
        if all(abs(smd([r[c] for r in treated], [r[c] for r in control], scales[c])) < max_smd for c in on):
            return Matched([r[id_key] for r in treated], [r[id_key] for r in control],
                           balance_table(treated, control, pool_t, pool_c, report))
    raise ValueError(f"no matched design of >= {min_pairs} pairs has |SMD| < {max_smd} on {list(on)} "
                     f"(pools of {len(pool_t)} and {len(pool_c)} rows)")


def thirds(rows: Sequence[Row], key: str) -> tuple[list[Row], list[Row], list[Row]]:
    """The rows split by `key` into its lower, middle and upper third (sorted; ties by input order)."""
    ordered = sorted(rows, key=lambda r: r[key])
    n = len(ordered)
    return ordered[: n // 3], ordered[n // 3: n - n // 3], ordered[n - n // 3:]


def halves(rows: Sequence[Row], key: str) -> tuple[list[Row], list[Row]]:
    """The rows split by `key` at the median: the lower and the upper half (sorted; ties by input order)."""
    ordered = sorted(rows, key=lambda r: r[key])
    return ordered[: len(ordered) // 2], ordered[len(ordered) // 2:]


def norm_and_length_designs(rows: Sequence[Row], *, max_pairs: int, max_smd: float = 0.1) -> dict[str, Matched]:
    """The two designs of the confounder controls, from audit rows with `norm`, `answer_tokens` and `loss`:
    - "norm": the upper third by norm (treated) against the middle third (control), matched on response length and
      loss: does the norm matter beyond length and loss?
    - "length": the shorter half by response length (treated) against the longer half, matched on the norm: does
      length matter at a fixed norm? Halves, not thirds: on format_mix the short and long thirds' norms barely
      overlap (3 balanced pairs), the halves' do."""
    _, middle, high = thirds(rows, "norm")
    short, long_ = halves(rows, "answer_tokens")
    covariates = ("norm", "answer_tokens", "loss")
    return {"norm": match_pairs(high, middle, on=("answer_tokens", "loss"), report=covariates,
                                max_pairs=max_pairs, max_smd=max_smd),
            "length": match_pairs(short, long_, on=("norm",), report=covariates, max_pairs=max_pairs,
                                  max_smd=max_smd)}


__all__ = ["Matched", "balance_table", "halves", "match_pairs", "norm_and_length_designs", "pooled_sd", "smd", "thirds"]
