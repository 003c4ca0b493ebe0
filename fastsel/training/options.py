"""The selection options of a training step, declared once (`SelectionOptions`: `TrainConfig` and
`fastsel.hf.SelectionConfig` extend it, `selective_backward` takes the same names as keywords), and their checks:
one copy, one wording of each error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastsel.engine.norms import BACKENDS
from fastsel.engine.references import References
from fastsel.selection import strategies
from fastsel.selection.rules import check_budget, check_options, check_reference_option
from fastsel.selection.strategies import DEFAULT

SINGLE_PASS_CHOICES = ("auto", True, False)


def is_int(value: Any) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_number(name: str, value: Any, *, low: float, inclusive: bool, integer: bool = False,
                  optional: bool = False) -> None:
    """Raise ValueError unless `value` is a finite number (an int if `integer`) above `low` (or None if optional)."""
    if value is None and optional:
        return
    ok_type = is_int(value) if integer else (is_int(value) or isinstance(value, float))
    ok = ok_type and math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {'>=' if inclusive else '>'} {low}"
                         f"{' or None' if optional else ''}, got {value!r}")


def check_step_options(*, ratio: float, strategy: str, loss_band: float | None, single_pass: Any = "auto",
                       backend: str = "auto", memory_budget_bytes: Any = 0, scale: Any = 1.0,
                       seed: Any = None) -> None:
    """Reject bad options of a selective training step, naming the option."""
    check_options(ratio, strategy, loss_band)
    if not any(single_pass is choice or (single_pass == choice and isinstance(single_pass, str))
               for choice in SINGLE_PASS_CHOICES):
        raise ValueError(f"single_pass must be 'auto', True or False, got {single_pass!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if memory_budget_bytes is not None:
        check_number("memory_budget_bytes", memory_budget_bytes, low=0, inclusive=True, integer=True)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed must be an int or None, got {seed!r}")


def check_reference_options(strategy: str, reference: Any = None, reference_batches: Any = None,
                            reference_every: Any = 0, gradshield_budget: Any = 0.0) -> None:
    """Reject bad reference options of a training entry point (before anything runs), naming the option."""
    if reference is not None and reference_batches is not None:
        raise ValueError("pass reference= (fixed gradients) or reference_batches= (recomputed), not both")
    given = reference if reference is not None else reference_batches
    what = "reference_batches" if reference_batches is not None else \
        "reference" if reference is not None else "reference= or reference_batches"
    check_reference_option(strategy, given, what)
    check_budget(gradshield_budget)
    check_number("reference_every", reference_every, low=0, inclusive=True, integer=True)
    if reference_every and reference_batches is None:
        raise ValueError("reference_every > 0 recomputes the reference from reference_batches=, which is not set")
    if reference_batches is not None:
        if isinstance(reference_batches, Mapping) or not isinstance(reference_batches, Sequence):
            raise ValueError("reference_batches must be a list with one entry per reference (a batch dict or a "
                             f"list of batch dicts), got {type(reference_batches).__name__}")
        for i, entry in enumerate(reference_batches):
            parts = [entry] if isinstance(entry, Mapping) else entry
            if not isinstance(parts, Sequence) or not parts or not all(isinstance(p, Mapping) for p in parts):
                raise ValueError(f"reference_batches[{i}] must be a batch dict or a non-empty list of batch dicts")
    if given is not None:
        lo, hi = strategies.strategy(strategy).references
        count = _count(given)
        if not lo <= count <= hi:
            raise ValueError(f"strategy {strategy!r} takes {lo if lo == hi else f'{lo} or {hi}'} reference(s), "
                             f"got {count}")


def _count(reference: Any) -> int:
    return 1 if isinstance(reference, (Mapping, References)) else len(reference)


@dataclass
class SelectionOptions:
    """How each candidate batch is selected and its gradient formed (see `fastsel.selective_backward`): checked
    when built. `TrainConfig` (the minimal loop) and `fastsel.hf.SelectionConfig` (the Trainer) extend it."""

    ratio: float = 0.2  # fraction kept per candidate batch: k = max(1, floor(ratio * B))
    strategy: str = DEFAULT  # a name of fastsel.selection.strategies.STRATEGIES (full: no selection)
    loss_band: float | None = 1.0  # candidates: |L_i - mean L| <= loss_band * std L (None: all)
    single_pass: bool | str = "auto"  # selective_backward's single-pass option
    backend: str = "auto"  # norm backend: auto | torch | triton | naive
    memory_budget_bytes: int | None = None  # per-example gradients of the single pass (None: adaptive)
    reference: Any = None  # gradshield / harmful_similarity: fixed reference gradient dict(s)
    reference_batches: list[Any] | None = None  # ... or batches per reference, recomputed every reference_every
    reference_every: int = 0  # optimizer steps between recomputations (0: computed once, at the start)
    gradshield_budget: float = 0.0  # gradshield: largest kept set with summed first-order safety change <= this

    def __post_init__(self) -> None:
        check_step_options(ratio=self.ratio, strategy=self.strategy, loss_band=self.loss_band,
                           single_pass=self.single_pass, backend=self.backend,
                           memory_budget_bytes=self.memory_budget_bytes)
        check_reference_options(self.strategy, self.reference, self.reference_batches, self.reference_every,
                                self.gradshield_budget)

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `selective_backward` these options set (the reference comes per step)."""
        return {"ratio": self.ratio, "strategy": self.strategy, "loss_band": self.loss_band,
                "single_pass": self.single_pass, "backend": self.backend,
                "memory_budget_bytes": self.memory_budget_bytes, "gradshield_budget": self.gradshield_budget}
