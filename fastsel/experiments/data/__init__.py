"""Task data, harmful-prompt sets and chat-template tokenization for fastsel's continual safety experiments.

Registry: ``load_task(name, source=None, split="train")`` for name in `TASK_NAMES`
(dolly, gsm8k, medmcqa, squad_v2, alpaca, format_mix); see `fastsel.experiments.data.tasks`. Safety sets: `load_harmful_probes`,
`load_benign_lookalikes`, `load_advbench`, `load_harmbench`, `load_safety_refusals`, `load_helpful`.
Training features: `tokenize_example`, `tokenize_examples`, `collate`. Reference batches of the safety-aware
strategies: `refusal_anchor_batch`, `compliance_anchor_batch` (`fastsel.experiments.data.anchors`).

Importing this package is cheap: the submodules (and datasets / transformers / torch) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

TASK_NAMES = ("dolly", "gsm8k", "medmcqa", "squad_v2", "alpaca", "format_mix")

_LAZY = {
    "Example": "fastsel.experiments.data.examples",
    "ExampleList": "fastsel.experiments.data.examples",
    "split_of": "fastsel.experiments.data.examples",
    "select_split": "fastsel.experiments.data.examples",
    "TEST_FRACTION": "fastsel.experiments.data.examples",
    "DataError": "fastsel.experiments.data.records",
    "read_rows": "fastsel.experiments.data.records",
    "load_task": "fastsel.experiments.data.tasks",
    "check_row": "fastsel.experiments.data.tasks",
    "TASKS": "fastsel.experiments.data.tasks",
    "FILES_DIR": "fastsel.experiments.data.tasks",
    "DOLLY_CATEGORIES": "fastsel.experiments.data.tasks",
    "NO_ANSWER": "fastsel.experiments.data.tasks",
    "HarmfulPrompt": "fastsel.experiments.data.harmful",
    "PROBE_CATEGORIES": "fastsel.experiments.data.harmful",
    "load_advbench": "fastsel.experiments.data.harmful",
    "load_harmbench": "fastsel.experiments.data.harmful",
    "load_prompt_file": "fastsel.experiments.data.harmful",
    "load_harmful_probes": "fastsel.experiments.data.harmful",
    "load_benign_lookalikes": "fastsel.experiments.data.harmful",
    "load_safety_refusals": "fastsel.experiments.data.harmful",
    "load_helpful": "fastsel.experiments.data.harmful",
    "tokenize_example": "fastsel.experiments.data.tokenize",
    "tokenize_examples": "fastsel.experiments.data.tokenize",
    "tokenize_with_status": "fastsel.experiments.data.tokenize",
    "collate": "fastsel.engine.batch",
    "pad_token_id_of": "fastsel.experiments.data.tokenize",
    "render_prompt": "fastsel.experiments.data.tokenize",
    "FALLBACK_CHAT_TEMPLATE": "fastsel.experiments.data.tokenize",
    "toy_tokenizer": "fastsel.experiments.data.toy",
    "refusal_anchors": "fastsel.experiments.data.anchors",
    "compliance_anchors": "fastsel.experiments.data.anchors",
    "anchor_batch": "fastsel.experiments.data.anchors",
    "refusal_anchor_batch": "fastsel.experiments.data.anchors",
    "compliance_anchor_batch": "fastsel.experiments.data.anchors",
    "COMPLIANCE_PREFIXES": "fastsel.experiments.data.anchors",
}

__all__ = ["TASK_NAMES", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsel.experiments.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
