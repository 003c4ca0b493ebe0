"""Before anything is timed, every method's per-example norms are checked equal: a disagreement fails the run."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


class BenchMismatch(RuntimeError):
    """Two methods disagree on the per-example gradient norms: the run fails before reporting any time."""


def max_rel_diff(a: Tensor, b: Tensor) -> tuple[float, int]:
    """max_i |a_i - b_i| / |b_i| and its index."""
    rel = (a.float().cpu() - b.float().cpu()).abs() / b.float().cpu().abs().clamp_min(1e-30)
    i = int(rel.argmax())
    return float(rel[i]), i


def check_agreement(norms: Mapping[str, Tensor], rows: Mapping[str, list[int]], tol: float) -> dict[str, float]:
    """Compare every pair of methods on their common rows; raise BenchMismatch naming the odd one(s) out.

    `rows[name]` lists the examples `norms[name]` covers (all, or the first rows for the partial naive oracle).
    A method is named when it disagrees with most of the others; with no majority, every disagreeing method is.
    Returns each method's largest relative difference to any other.
    """
    names = list(norms)
    worst = {name: 0.0 for name in names}
    bad: dict[str, list[tuple[str, float, int]]] = {name: [] for name in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(rows[a]) & set(rows[b]))
            if not common:
                continue
            va = norms[a][[rows[a].index(r) for r in common]]
            vb = norms[b][[rows[b].index(r) for r in common]]
            rel, j = max_rel_diff(va, vb)
            worst[a], worst[b] = max(worst[a], rel), max(worst[b], rel)
            if rel > tol:
                bad[a].append((b, rel, common[j]))
                bad[b].append((a, rel, common[j]))
    if any(bad.values()):
        majority = [n for n in names if len(bad[n]) > (len(names) - 1) / 2]
        named = majority or [n for n in names if bad[n]]
        detail = "; ".join(f"method {n!r} disagrees with " + ", ".join(
            f"{o!r} (max relative difference {rel:.3e} at example {ex})" for o, rel, ex in bad[n]) for n in named)
        raise BenchMismatch(f"{detail}; tolerance {tol:g}")
    return worst
