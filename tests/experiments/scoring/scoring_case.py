"""The scoring tests' shared case: a tiny LoRA Llama, the byte-level toy tokenizer and a JSONL file of examples of
varied lengths (a terse half and a long half), built the same way in the tests and in the torchrun worker."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastsel.experiments.scoring import ScoreSettings

SETTINGS = ScoreSettings(max_length=96, token_budget=120, chunk_size=3)  # several passes and chunks


def tiny_scorer(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    from fastsel.experiments.data import toy_tokenizer
    from fastsel.integrations.models import add_lora, tiny_random_model

    model = add_lora(tiny_random_model(seed=seed), r=4, seed=seed)
    with torch.no_grad():  # lora_B away from 0: gradients on both factors
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, toy_tokenizer()


def rows(count: int = 11) -> list[dict[str, str]]:
    return [{"uid": f"ex{i:02d}", "question": f"Question {i}: " + "why " * (i % 5),
             "answer": ("Yes." if i % 2 else "Because " + "it holds " * (2 + i % 4) + "in every case.")}
            for i in range(count)]


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path
