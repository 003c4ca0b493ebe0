"""Batched greedy generation with the chat template (left padding), for ASR and task evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastsel.engine.model_io import model_device
from fastsel.experiments.data.tokenize import messages_for, pad_token_id_of, render_chat
from fastsel.utils import eval_mode


def eos_ids_of(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model's generation_config eos (chat models often have
    an end-of-turn token, e.g. <|im_end|> or <|eot_id|>, besides the plain eos)."""
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


@torch.no_grad()
def generate_from_chats(model: nn.Module, tokenizer: Any, chats: Sequence[list[dict[str, str]]], *,
                        max_new_tokens: int = 128, batch_size: int = 8, add_generation_prompt: bool = True,
                        **generate_kwargs: Any) -> list[str]:
    """Greedy continuations of rendered chats (decoded, special tokens skipped, stripped), in input order.

    Inputs are sorted by length so each left-padded batch holds similar lengths; extra `generate_kwargs` are
    passed to `model.generate`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    texts = [render_chat(tokenizer, list(c), add_generation_prompt=add_generation_prompt) for c in chats]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = pad_token_id_of(tokenizer)
    eos = eos_ids_of(tokenizer, model)
    device = model_device(model)
    outputs: list[str] = [""] * len(texts)
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if eos:
        kwargs["eos_token_id"] = eos
    kwargs.update(generate_kwargs)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - n:] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out[:, width:].cpu()
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))  # stop at the first eos
                outputs[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    return outputs


def generate_responses(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
                       batch_size: int = 8, system_prompt: str | None = None, **generate_kwargs: Any) -> list[str]:
    """Greedy chat responses to user `prompts` (one user turn each, the tokenizer's chat template)."""
    chats = [messages_for(p, system_prompt=system_prompt) for p in prompts]
    return generate_from_chats(model, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               **generate_kwargs)
