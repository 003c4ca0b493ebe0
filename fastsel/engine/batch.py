"""Batches: validation of a causal-LM batch and padding of tokenized rows into one.

A batch follows the Hugging Face causal-LM convention: `input_ids`, `attention_mask` and `labels` of shape [B, T],
labels -100 where a token is not supervised, shifted inside (position t predicts label t+1) as transformers does.
Padded positions (attention_mask == 0) are never supervised, whatever their label says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")


def prepare_batch(batch: Mapping[str, Tensor], device: torch.device | None = None) -> dict[str, Tensor]:
    """Check a batch and return input_ids, attention_mask, labels (pads masked) and position_ids on `device`.

    position_ids count only attended tokens, so a left-padded row sees the same positions as the same example
    without padding.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict with keys {REQUIRED_KEYS}, got {type(batch).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing required key(s) {missing}; expected {list(REQUIRED_KEYS)}")
    out: dict[str, Tensor] = {}
    for key in REQUIRED_KEYS:
        value = batch[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"batch[{key!r}] must have shape [B, T], got {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"batch[{key!r}] must hold integers, got {value.dtype}")
        out[key] = value.to(device) if device is not None else value
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"input_ids, attention_mask and labels must have the same shape, got {shapes}")
    if out["input_ids"].shape[0] == 0 or out["input_ids"].shape[1] == 0:
        raise ValueError(f"empty batch: shape {shapes['input_ids']}")
    mask = out["attention_mask"].long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must contain only 0 and 1")
    out["attention_mask"] = mask
    out["labels"] = out["labels"].long().masked_fill(mask == 0, IGNORE_INDEX)
    out["input_ids"] = out["input_ids"].long()
    supervised = (out["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    empty = (supervised == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"example(s) {empty} have no supervised token (every label after the shift is -100 or padding): "
            "their loss is undefined"
        )
    out["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return out


def _as_list(values: Any) -> list[int]:
    """Token ids as a list, from a list, a tensor or a numpy array (rows of an HF Dataset with a torch format)."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int, *,
            padding_side: str = "right") -> dict[str, Any]:
    """Pad tokenized rows into a batch: input_ids, attention_mask, labels (LongTensor [B, T]) and their ids.

    A row is {"input_ids": [...], "labels": [...] (default: input_ids), "id": optional}.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("cannot collate an empty list of features")
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, sl] = torch.as_tensor(_as_list(f["input_ids"]), dtype=torch.long)
        mask[i, sl] = 1
        labels[i, sl] = torch.as_tensor(_as_list(f.get("labels", f["input_ids"])), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "ids": [f.get("id") for f in features]}
