"""Drift of a fine-tuned PEFT model from its reference (the same model with the adapters disabled)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.batch import collate
from fastsel.engine.losses import supervised_positions, token_kl
from fastsel.engine.model_io import forward_logits, model_device
from fastsel.experiments.data.tokenize import encode, pad_token_id_of, render_prompt
from fastsel.utils import eval_mode


def prompt_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int = 8, *, max_length: int | None = None,
                   system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Right-padded batches of chat-rendered prompts (with the generation prompt), for `kl_to_reference`.

    max_length keeps the last `max_length` tokens of a longer prompt."""
    pad = pad_token_id_of(tokenizer)
    feats = []
    for p in prompts:
        ids = encode(tokenizer, render_prompt(tokenizer, p, system_prompt))
        feats.append({"input_ids": ids[-max_length:] if max_length else ids})
    return [_no_labels(collate(feats[i:i + batch_size], pad)) for i in range(0, len(feats), batch_size)]


def _no_labels(batch: dict[str, Any]) -> dict[str, Any]:
    batch.pop("labels", None)
    batch.pop("ids", None)
    return batch


def _positions(batch: Mapping[str, Tensor]) -> Tensor:
    """[B, T] bool: positions whose next-token distribution is compared.

    With labels: position t where labels[t+1] is supervised (the positions the training loss uses); without:
    every attended position (on prompts, the last one predicts the first response token)."""
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    return mask if labels is None else supervised_positions(labels) & mask


@torch.no_grad()
def kl_to_reference(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> float:
    """Mean per-token KL(P_finetuned || P_reference) in nats, where the reference is `model` inside
    `model.disable_adapter()` (a PEFT model), over the positions `_positions` selects in each batch.

    batches: dicts with input_ids and attention_mask [B, T] (right or left padded; position ids follow the
    mask), optionally labels (then only the supervised next-token positions count), e.g. from
    `prompt_batches` or `fastsel.experiments.data.collate`. Dropout is off during the measurement.
    """
    if not callable(getattr(model, "disable_adapter", None)):
        raise TypeError("kl_to_reference needs a PEFT model: the reference is taken with model.disable_adapter()")
    device = model_device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device).long()
            inputs = {"input_ids": ids, "attention_mask": mask,
                      "position_ids": (mask.cumsum(dim=1) - 1).clamp_min(0)}
            sel = _positions({k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)})
            if not sel.any():
                continue
            logits_ft = forward_logits(model, inputs)[sel]
            with model.disable_adapter():
                logits_ref = forward_logits(model, inputs)[sel]
            kl = token_kl(logits_ft, logits_ref)
            total += float(kl.sum())
            count += int(sel.sum())
    if count == 0:
        raise ValueError("no token positions to compare (empty batches or no supervised labels)")
    return total / count
