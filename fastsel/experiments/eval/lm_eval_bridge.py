"""Optional bridge to EleutherAI's lm-evaluation-harness for standard benchmarks on an in-memory model."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch import nn

INSTALL_HINT = "run_lm_eval needs lm-evaluation-harness: pip install lm-eval"


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: Sequence[str] | str, *, batch_size: int | str = 8,
                num_fewshot: int | None = None, limit: int | float | None = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate `model` on lm-eval `tasks` (e.g. ["mmlu", "gsm8k"]); returns simple_evaluate's results dict.

    The model is wrapped as ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)`` (a PEFT
    model works as is); extra kwargs go to ``lm_eval.simple_evaluate``. Raises ImportError with the install
    command when lm-eval is not installed.
    """
    try:
        lm_eval = importlib.import_module("lm_eval")
        huggingface = importlib.import_module("lm_eval.models.huggingface")
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    return lm_eval.simple_evaluate(model=lm, tasks=task_list, num_fewshot=num_fewshot, limit=limit, **kwargs)
