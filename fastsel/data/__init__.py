"""Task data, harmful-prompt sets and chat-template tokenization for fastsel's continual safety experiments.

Registry: ``load_task(name, source=None, split="train")`` for name in `TASK_NAMES`
(dolly, gsm8k, medmcqa, squad_v2, alpaca); see `fastsel.data.tasks`. Safety sets: `load_harmful_probes`,
`load_benign_lookalikes`, `load_advbench`, `load_harmbench`, `load_safety_refusals`, `load_helpful`.
Training features: `tokenize_example`, `tokenize_examples`, `collate`.

Importing this package is cheap: the submodules (and datasets / transformers / torch) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

TASK_NAMES = ("dolly", "gsm8k", "medmcqa", "squad_v2", "alpaca")

_LAZY = {
    "Example": "fastsel.data.examples",
    "ExampleList": "fastsel.data.examples",
    "split_of": "fastsel.data.examples",
    "select_split": "fastsel.data.examples",
    "TEST_FRACTION": "fastsel.data.examples",
    "DataError": "fastsel.data.records",
    "read_rows": "fastsel.data.records",
    "load_task": "fastsel.data.tasks",
    "check_row": "fastsel.data.tasks",
    "TASKS": "fastsel.data.tasks",
    "FILES_DIR": "fastsel.data.tasks",
    "DOLLY_CATEGORIES": "fastsel.data.tasks",
    "NO_ANSWER": "fastsel.data.tasks",
    "HarmfulPrompt": "fastsel.data.harmful",
    "PROBE_CATEGORIES": "fastsel.data.harmful",
    "load_advbench": "fastsel.data.harmful",
    "load_harmbench": "fastsel.data.harmful",
    "load_prompt_file": "fastsel.data.harmful",
    "load_harmful_probes": "fastsel.data.harmful",
    "load_benign_lookalikes": "fastsel.data.harmful",
    "load_safety_refusals": "fastsel.data.harmful",
    "load_helpful": "fastsel.data.harmful",
    "tokenize_example": "fastsel.data.tokenize",
    "tokenize_examples": "fastsel.data.tokenize",
    "tokenize_with_status": "fastsel.data.tokenize",
    "collate": "fastsel.data.tokenize",
    "pad_token_id_of": "fastsel.data.tokenize",
    "render_prompt": "fastsel.data.tokenize",
    "FALLBACK_CHAT_TEMPLATE": "fastsel.data.tokenize",
    "toy_tokenizer": "fastsel.data.toy",
}

__all__ = ["TASK_NAMES", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsel.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
