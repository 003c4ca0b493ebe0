"""Evaluation for fastsel's continual safety experiments.

Safety: `attack_success_rate`, `over_refusal_rate`, judges `RefusalJudge` / `LlamaGuardJudge`
(`parse_llama_guard`), `safety_landscape`. Tasks: `evaluate_task` (GSM8K, MedMCQA, SQuAD v2, Dolly, Alpaca)
and the metrics in `fastsel.eval.metrics`. Continual: `continual_metrics` (avg, BWT, FM, max drop). Drift:
`kl_to_reference`. Optional: `run_lm_eval` (lm-evaluation-harness).

Importing this package is cheap: submodules (and torch / transformers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "generate_responses": "fastsel.eval.generate",
    "generate_from_chats": "fastsel.eval.generate",
    "Judge": "fastsel.eval.judges",
    "Verdict": "fastsel.eval.judges",
    "RefusalJudge": "fastsel.eval.judges",
    "LlamaGuardJudge": "fastsel.eval.judges",
    "parse_llama_guard": "fastsel.eval.judges",
    "REFUSAL_PHRASES": "fastsel.eval.judges",
    "LLAMA_GUARD3_CATEGORIES": "fastsel.eval.judges",
    "attack_success_rate": "fastsel.eval.safety",
    "judge_responses": "fastsel.eval.safety",
    "over_refusal_rate": "fastsel.eval.safety",
    "evaluate_task": "fastsel.eval.tasks",
    "evaluate_task_detailed": "fastsel.eval.tasks",
    "DEFAULT_MAX_NEW_TOKENS": "fastsel.eval.tasks",
    "score_predictions": "fastsel.eval.metrics",
    "extract_number": "fastsel.eval.metrics",
    "parse_option_letter": "fastsel.eval.metrics",
    "squad_exact": "fastsel.eval.metrics",
    "squad_f1": "fastsel.eval.metrics",
    "rouge_l": "fastsel.eval.metrics",
    "token_f1": "fastsel.eval.metrics",
    "continual_metrics": "fastsel.eval.continual",
    "average_performance": "fastsel.eval.continual",
    "backward_transfer": "fastsel.eval.continual",
    "forgetting_measure": "fastsel.eval.continual",
    "max_stage_drop": "fastsel.eval.continual",
    "kl_to_reference": "fastsel.eval.kl",
    "prompt_batches": "fastsel.eval.kl",
    "run_lm_eval": "fastsel.eval.lm_eval_bridge",
    "safety_landscape": "fastsel.eval.landscape",
    "perturbed_weights": "fastsel.eval.landscape",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsel.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
