"""Task evaluation: generate greedy answers to held-out examples and score them (`fastsel.experiments.eval.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from fastsel.experiments.eval.generate import generate_responses
from fastsel.experiments.eval.metrics import PRIMARY_METRIC, score_predictions

#: Generation budget per task when `max_new_tokens` is not given (GSM8K needs room for its worked solution).
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "medmcqa": 32, "squad_v2": 32, "dolly": 128, "alpaca": 128,
                          "format_mix": 48}


def evaluate_task_detailed(model: nn.Module, tokenizer: Any, task_name: str, examples: Sequence[Any],
                           max_new_tokens: int | None = None, *, batch_size: int = 8,
                           system_prompt: str | None = None) -> dict[str, Any]:
    """Generate for every example's prompt and score: `score_predictions`' dict (score, metrics, per_example)."""
    if task_name not in PRIMARY_METRIC:
        raise ValueError(f"no evaluation for task {task_name!r}; known: {', '.join(sorted(PRIMARY_METRIC))}")
    if not examples:
        raise ValueError(f"no examples to evaluate task {task_name!r} on")
    budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task_name]
    predictions = generate_responses(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=budget,
                                     batch_size=batch_size, system_prompt=system_prompt)
    return {**score_predictions(task_name, examples, predictions), "task": task_name, "max_new_tokens": budget}


def evaluate_task(model: nn.Module, tokenizer: Any, task_name: str, examples: Sequence[Any],
                  max_new_tokens: int | None = None, *, batch_size: int = 8, system_prompt: str | None = None) -> float:
    """Score in [0, 100] of `model` on `examples` of `task_name` (GSM8K exact match, MedMCQA accuracy, SQuAD v2
    F1, Dolly/Alpaca ROUGE-L), from greedy generations of at most `max_new_tokens` tokens."""
    return float(evaluate_task_detailed(model, tokenizer, task_name, examples, max_new_tokens,
                                        batch_size=batch_size, system_prompt=system_prompt)["score"])
