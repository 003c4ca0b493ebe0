"""Harmful-prompt sets for measuring attack success, benign look-alikes for over-refusal, and the refusal /
helpful training data of the short safety-alignment stage.

* AdvBench (Zou et al. 2023) ``harmful_behaviors.csv``: columns ``goal,target``.
* HarmBench (Mazeika et al. 2024) behaviors CSV: ``Behavior, FunctionalCategory, SemanticCategory,
  ContextString, BehaviorID`` (``Tags`` optional). A contextual behavior's prompt is
  ``ContextString + "\\n\\n---\\n\\n" + Behavior``, as HarmBench formats it.
* Shipped files (written for fastsel, not copied): ``harmful_probes.jsonl`` (id, category, prompt, target: a
  compliance prefix in AdvBench's style, "Sure, here is how to ...", for the teacher-forced refusal margin),
  ``benign_lookalikes.jsonl`` (id, category, prompt), ``safety_refusals.jsonl`` and ``helpful.jsonl``
  (Alpaca schema: instruction, input, output, plus category). The refusal prompts are disjoint from the probes,
  so the probe ASR is measured on held-out requests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from fastsel.experiments.data.examples import ExampleList
from fastsel.experiments.data.records import Row, get_str, read_rows
from fastsel.experiments.data.tasks import FILES_DIR, TASKS, alpaca_row, normalize_rows

PROBE_CATEGORIES = ("weapons", "cybercrime", "fraud", "harassment", "self_harm", "drugs", "misinformation",
                    "privacy")


@dataclass
class HarmfulPrompt:
    """One prompt of an ASR set: stable id, category (for the per-category breakdown), text, extra fields."""

    id: str
    category: str
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


def _unique(items: list[HarmfulPrompt], rows: list[Row]) -> None:
    seen: dict[str, int] = {}
    for item, row in zip(items, rows, strict=True):
        if item.id in seen:
            raise row.error(f"duplicate id {item.id!r} (first seen at row {seen[item.id]})")
        seen[item.id] = row.index


def load_advbench(path: str | os.PathLike[str]) -> ExampleList:
    """AdvBench harmful behaviors (``goal,target`` CSV, or the same columns in JSON/JSONL/Parquet)."""
    rows = read_rows(path)
    items = [HarmfulPrompt(f"advbench:{r.index}", "advbench", get_str(r, "goal"),
                           {"target": get_str(r, "target", required=False)}) for r in rows]
    return ExampleList(items, source=os.fspath(path))


def load_harmbench(path: str | os.PathLike[str], functional_categories: Sequence[str] | None = None) -> ExampleList:
    """HarmBench behaviors; `functional_categories` (e.g. ("standard",)) keeps only those, counting the rest
    in `.skipped["functional_category"]`."""
    rows = read_rows(path)
    items: list[HarmfulPrompt] = []
    kept_rows: list[Row] = []
    skipped = 0
    for r in rows:
        behavior = get_str(r, "Behavior")
        functional = get_str(r, "FunctionalCategory")
        semantic = get_str(r, "SemanticCategory")
        behavior_id = get_str(r, "BehaviorID")
        context = get_str(r, "ContextString", required=False)
        if functional_categories is not None and functional not in functional_categories:
            skipped += 1
            continue
        prompt = f"{context}\n\n---\n\n{behavior}" if context.strip() else behavior
        items.append(HarmfulPrompt(f"harmbench:{behavior_id}", semantic, prompt,
                                   {"functional_category": functional, "behavior": behavior}))
        kept_rows.append(r)
    _unique(items, kept_rows)
    return ExampleList(items, source=os.fspath(path), skipped={"functional_category": skipped})


def load_prompt_file(path: str | os.PathLike[str]) -> ExampleList:
    """A prompt set in our schema: rows with id, category, prompt and an optional target (the AdvBench-style
    compliance prefix of the teacher-forced refusal margin, kept in meta["target"]); JSON/JSONL/CSV/Parquet."""
    rows = read_rows(path)
    items = [HarmfulPrompt(get_str(r, "id"), get_str(r, "category"), get_str(r, "prompt"),
                           {"target": t} if (t := get_str(r, "target", required=False)) else {}) for r in rows]
    _unique(items, rows)
    return ExampleList(items, source=os.fspath(path))


def load_harmful_probes() -> ExampleList:
    """The shipped harmful probe requests (>= 100, 8 categories: `PROBE_CATEGORIES`)."""
    return load_prompt_file(os.path.join(FILES_DIR, "harmful_probes.jsonl"))


def load_benign_lookalikes() -> ExampleList:
    """The shipped benign requests that look harmful on the surface (over-refusal measurement)."""
    return load_prompt_file(os.path.join(FILES_DIR, "benign_lookalikes.jsonl"))


def load_safety_refusals(path: str | os.PathLike[str] | None = None) -> ExampleList:
    """Harmful request -> polite refusal training pairs (task "safety"), Alpaca schema."""
    return _alpaca_like(path or os.path.join(FILES_DIR, "safety_refusals.jsonl"), "safety")


def load_helpful(path: str | os.PathLike[str] | None = None) -> ExampleList:
    """Benign instruction -> helpful answer training pairs (task "helpful"), Alpaca schema."""
    return _alpaca_like(path or os.path.join(FILES_DIR, "helpful.jsonl"), "helpful")


def _alpaca_like(path: str | os.PathLike[str], task: str) -> ExampleList:
    spec = replace(TASKS["alpaca"], name=task, normalize=partial(alpaca_row, task=task))
    return normalize_rows(spec, read_rows(path), os.fspath(path))
