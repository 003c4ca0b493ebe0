"""Reference batches of the safety-aware strategies, from the shipped safety data and the model's chat template.

- Refusal anchors (`refusal_anchor_batch`): harmful request -> polite refusal, from `safety_refusals.jsonl`. Their
  mean loss is GradShield's safety proxy S (lower = the model refuses more readily), and they are He et al.'s
  safe anchors. The anchors are the file's *last* rows: the alignment stage trains on its first rows.
- Harmful-compliance anchors (`compliance_anchor_batch`): the same harmful requests answered by a compliant
  opening ("Sure, here is how to do that. Step 1:"), no harmful content: the direction in which fine-tuning
  makes a model comply (He et al.'s harmful anchors). Openings: the shipped `compliance_prefixes.jsonl` (written
  for fastsel) by default, or your own file: rows with `prompt` and `response`, or AdvBench's `goal` and `target`.

The probes used to measure ASR (`harmful_probes.jsonl`) are never anchors, so the ASR stays held out. That is also
why the probes' per-request compliance `target`s (the teacher-forced refusal margin's) do not serve as anchor
openings: they are written for the probe requests, and using them would put the held-out probes into selection.
The anchors keep their own generic openings (`compliance_prefixes.jsonl`), joined to refusal-file requests.
"""

from __future__ import annotations

import os
from typing import Any

from fastsel.engine.batch import collate
from fastsel.experiments.data.examples import Example, ExampleList
from fastsel.experiments.data.harmful import load_safety_refusals
from fastsel.experiments.data.records import get_str, read_rows
from fastsel.experiments.data.tasks import FILES_DIR
from fastsel.experiments.data.tokenize import pad_token_id_of, tokenize_examples

COMPLIANCE_PREFIXES = os.path.join(FILES_DIR, "compliance_prefixes.jsonl")


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of anchors must be an integer >= 1, got {n!r}")


def refusal_anchors(n: int = 16, path: str | os.PathLike[str] | None = None) -> ExampleList:
    """The last `n` harmful request -> refusal pairs of `path` (default: the shipped safety_refusals.jsonl)."""
    _check_count(n)
    rows = load_safety_refusals(path)
    return ExampleList(list(rows)[-n:], source=rows.source)


def compliance_anchors(n: int = 16, path: str | os.PathLike[str] | None = None, *,
                       refusals: str | os.PathLike[str] | None = None) -> ExampleList:
    """`n` harmful request -> compliant opening pairs.

    `path` None: the requests of `refusal_anchors(n, refusals)`, each with a shipped compliant opening (cycled).
    Otherwise a file (JSON/JSONL/CSV/Parquet) of rows with `prompt` and `response`, or AdvBench's `goal` and
    `target`; its first `n` rows are used.
    """
    _check_count(n)
    if path is None:
        prefixes = [get_str(r, "prefix") for r in read_rows(COMPLIANCE_PREFIXES)]
        requests = refusal_anchors(n, refusals)
        items = [Example(f"compliance:{ex.id}", "compliance", ex.prompt, prefixes[i % len(prefixes)], ex.category)
                 for i, ex in enumerate(requests)]
        return ExampleList(items, source=f"{requests.source} + {COMPLIANCE_PREFIXES}")
    rows = read_rows(path)[:n]
    items = []
    for row in rows:
        advbench = "goal" in row.fields
        prompt = get_str(row, "goal" if advbench else "prompt")
        response = get_str(row, "target" if advbench else "response")
        items.append(Example(f"compliance:{row.key}", "compliance", prompt, response, "compliance"))
    return ExampleList(items, source=os.fspath(path))


def anchor_batch(examples: list[Example], tokenizer: Any, max_length: int = 128) -> dict[str, Any]:
    """Chat-template tokenized examples (loss on the response only) padded into one batch dict."""
    if not examples:
        raise ValueError("no anchor examples")
    rows = tokenize_examples(examples, tokenizer, max_length)
    batch = collate(rows, pad_token_id_of(tokenizer))
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def refusal_anchor_batch(tokenizer: Any, n: int = 16, *, max_length: int = 128,
                         path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """One batch of `n` refusal anchors (harmful request + refusal) with the tokenizer's chat template."""
    return anchor_batch(refusal_anchors(n, path), tokenizer, max_length)


def compliance_anchor_batch(tokenizer: Any, n: int = 16, *, max_length: int = 128,
                            path: str | os.PathLike[str] | None = None,
                            refusals: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """One batch of `n` harmful-compliance anchors (harmful request + compliant opening)."""
    return anchor_batch(compliance_anchors(n, path, refusals=refusals), tokenizer, max_length)


__all__ = ["COMPLIANCE_PREFIXES", "anchor_batch", "compliance_anchor_batch", "compliance_anchors",
           "refusal_anchor_batch", "refusal_anchors"]
