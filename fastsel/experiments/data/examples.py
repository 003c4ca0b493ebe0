"""The normalized example every task loader returns, and the deterministic train/test split rule."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Fraction of rows the hash split puts in "test" (shipped mini files, and hub datasets without a test split).
TEST_FRACTION = 0.25
SPLITS = ("train", "test", "all")


@dataclass
class Example:
    """One instruction example.

    id: stable dataset id, ``<task>:<dataset id or 0-based row index>``; task: task name; prompt: the user message;
    response: the reference answer (the training target); category: Dolly category, or the task name;
    meta: evaluation data (gold answer, options, answerable flag, ...).
    """

    id: str
    task: str
    prompt: str
    response: str
    category: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExampleList(list):
    """A list of examples (or prompts) that also records where it came from and what an explicit rule skipped.

    `skipped` maps a rule name to how many rows it removed; nothing is dropped without being counted here.
    """

    def __init__(self, items: Iterable[Any] = (), *, source: str = "", skipped: dict[str, int] | None = None):
        super().__init__(items)
        self.source = source
        self.skipped: dict[str, int] = dict(skipped or {})

    def report(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in self.skipped.items() if v) or "none"
        return f"{len(self)} rows from {self.source} (skipped: {skipped})"


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from sha256 of `key` (independent of Python's hash seed and of row order)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(example_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """The split rule: an id goes to "test" iff sha256(id) / 2**64 < test_fraction, else to "train".

    Deterministic and per id, so adding or reordering rows never moves another row across the split.
    """
    return "test" if hash_fraction(example_id) < test_fraction else "train"


def select_split(items: list[Any], split: str, test_fraction: float = TEST_FRACTION) -> list[Any]:
    """Items (with an `.id`) whose `split_of` is `split`; "all" keeps everything."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(items)
    return [x for x in items if split_of(x.id, test_fraction) == split]
