"""Option checks shared by every entry point that trains with selection (`selective_backward`, `train`,
`fastsel.hf.SelectionConfig`): one copy, one wording of each error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastsel.engine.norms import BACKENDS
from fastsel.selection.rules import check_options

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
