"""Task evaluation: generate greedy answers to held-out examples and score them (`fastsel.experiments.eval.metrics`),
and the teacher-forced loss of their reference answers (`heldout_losses`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastsel.engine.batch import collate, prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits, model_device
from fastsel.experiments.eval.generate import generate_responses
from fastsel.experiments.eval.metrics import PRIMARY_METRIC, score_predictions
from fastsel.utils import eval_mode

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


@torch.no_grad()
def heldout_losses(model: nn.Module, rows: Sequence[dict[str, Any]], *, pad_token_id: int, batch_size: int = 8
                   ) -> list[float]:
    """Per row: the mean token negative log-likelihood of its reference answer (teacher-forced, the training
    loss's definition), in nats; rows as `tokenize_examples` gives them. A low-noise "is the task learned"
    signal beside the greedy-generation score: it sees both answer formats of a row set, not only the mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[float] = []
    device = model_device(model)
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            feats = [{k: r[k] for k in ("input_ids", "labels")} for r in rows[start:start + batch_size]]
            batch = prepare_batch(collate(feats, pad_token_id), device)
            out += per_example_losses(forward_logits(model, batch), batch["labels"]).tolist()
    return out
