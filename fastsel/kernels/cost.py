"""The one cost rule of the exact per-example norm forms, used by the torch math (`fastsel.engine.linear_math`) and
the Triton launchers alike (plain Python: importing it needs no triton).

For an example of T tokens at an m x n weight: instantiate G_i costs ~ T*m*n multiply-adds (its memory m*n), the
Gram form sum_{t,s} <delta_t, delta_s><x_t, x_s> ~ T^2*(m+n); a single token's outer product is exact and cheapest.
"""

from __future__ import annotations


def instantiate_cost(t: int, m: int, n: int) -> int:
    """Multiply-adds of the instantiate form per example."""
    return t * m * n


def gram_cost(t: int, m: int, n: int) -> int:
    """Multiply-adds of the Gram form per example."""
    return t * t * (m + n)


def choose_method(t: int, m: int, n: int) -> str:
    """Cheapest exact form for T tokens and an m x n weight: 'outer' (T == 1), 'instantiate' or 'gram' (ties go to
    instantiate)."""
    if t == 1:
        return "outer"
    return "instantiate" if instantiate_cost(t, m, n) <= gram_cost(t, m, n) else "gram"
