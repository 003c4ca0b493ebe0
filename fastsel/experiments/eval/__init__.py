"""Evaluation for fastsel's continual safety experiments.

Safety: `attack_success_rate`, `over_refusal_rate`, judges `RefusalJudge` / `ThreeWayJudge` (refusal /
compliance / degenerate) / `LlamaGuardJudge` (`parse_llama_guard`), `safety_landscape`; teacher-forced
`refusal_margin` (and KL to the aligned model, `continuation_scores`). Statistics: `bootstrap_ci`,
`paired_difference_ci` (seeds x prompts). Tasks: `evaluate_task` (GSM8K, MedMCQA, SQuAD v2, Dolly, Alpaca)
and the metrics in `fastsel.experiments.eval.metrics`. Continual: `continual_metrics` (avg, BWT, FM, max drop). Drift:
`kl_to_reference`. Optional: `run_lm_eval` (lm-evaluation-harness).

Importing this package is cheap: submodules (and torch / transformers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "generate_responses": "fastsel.experiments.eval.generate",
    "generate_from_chats": "fastsel.experiments.eval.generate",
    "Judge": "fastsel.experiments.eval.judges",
    "Verdict": "fastsel.experiments.eval.judges",
    "RefusalJudge": "fastsel.experiments.eval.judges",
    "ThreeWayJudge": "fastsel.experiments.eval.judges",
    "degenerate_reason": "fastsel.experiments.eval.judges",
    "LlamaGuardJudge": "fastsel.experiments.eval.judges",
    "parse_llama_guard": "fastsel.experiments.eval.judges",
    "REFUSAL_PHRASES": "fastsel.experiments.eval.judges",
    "LLAMA_GUARD3_CATEGORIES": "fastsel.experiments.eval.judges",
    "attack_success_rate": "fastsel.experiments.eval.safety",
    "judge_responses": "fastsel.experiments.eval.safety",
    "over_refusal_rate": "fastsel.experiments.eval.safety",
    "evaluate_task": "fastsel.experiments.eval.task_eval",
    "evaluate_task_detailed": "fastsel.experiments.eval.task_eval",
    "heldout_losses": "fastsel.experiments.eval.task_eval",
    "DEFAULT_MAX_NEW_TOKENS": "fastsel.experiments.eval.task_eval",
    "score_predictions": "fastsel.experiments.eval.metrics",
    "extract_number": "fastsel.experiments.eval.metrics",
    "parse_option_letter": "fastsel.experiments.eval.metrics",
    "squad_exact": "fastsel.experiments.eval.metrics",
    "squad_f1": "fastsel.experiments.eval.metrics",
    "rouge_l": "fastsel.experiments.eval.metrics",
    "token_f1": "fastsel.experiments.eval.metrics",
    "continual_metrics": "fastsel.experiments.eval.forgetting",
    "average_performance": "fastsel.experiments.eval.forgetting",
    "backward_transfer": "fastsel.experiments.eval.forgetting",
    "forgetting_measure": "fastsel.experiments.eval.forgetting",
    "max_stage_drop": "fastsel.experiments.eval.forgetting",
    "kl_to_reference": "fastsel.experiments.eval.kl",
    "refusal_margin": "fastsel.experiments.eval.teacher_forced",
    "continuation_scores": "fastsel.experiments.eval.teacher_forced",
    "compliance_prefix": "fastsel.experiments.eval.teacher_forced",
    "DEFAULT_REFUSAL": "fastsel.experiments.eval.teacher_forced",
    "bootstrap_ci": "fastsel.experiments.eval.bootstrap",
    "paired_difference_ci": "fastsel.experiments.eval.bootstrap",
    "prompt_batches": "fastsel.experiments.eval.kl",
    "run_lm_eval": "fastsel.experiments.eval.lm_eval_bridge",
    "safety_landscape": "fastsel.experiments.eval.landscape",
    "perturbed_weights": "fastsel.experiments.eval.landscape",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsel.experiments.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
