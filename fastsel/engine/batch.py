"""Batches: validation of a causal-LM batch and padding of tokenized rows into one.

A batch follows the Hugging Face causal-LM convention: `input_ids`, `attention_mask` and `labels` of shape [B, T],
labels -100 where a token is not supervised, shifted inside (position t predicts label t+1) as transformers does.
Padded positions (attention_mask == 0) are never supervised, whatever their label says, and neither is a label
whose preceding position is padding (left padding == right padding == no padding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")


def check_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The batch's input_ids, attention_mask and labels after checking their type, shape and dtype (not moved,
    not converted): what every entry point runs before it reads a shape."""
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
        out[key] = value
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"input_ids, attention_mask and labels must have the same shape, got {shapes}")
    if out["input_ids"].shape[0] == 0 or out["input_ids"].shape[1] == 0:
        raise ValueError(f"empty batch: shape {shapes['input_ids']}")
    return out


def _check_token_range(values: Tensor, vocab_size: int, what: str, allowed: int | None = None) -> None:
    """Raise ValueError naming the first (example, position) whose id is outside [0, vocab_size) (or `allowed`)."""
    bad = (values < 0) | (values >= vocab_size)
    if allowed is not None:
        bad &= values != allowed
    if bool(bad.any()):
        where = bad.nonzero()
        i, t = (int(v) for v in where[0])
        extra = f" or {allowed}" if allowed is not None else ""
        raise ValueError(f"{what} {int(values[i, t])} of example {i} at position {t} is outside the model's "
                         f"vocabulary [0, {vocab_size}){extra} ({where.shape[0]} such position(s) in the batch)")


def prepare_batch(batch: Mapping[str, Tensor], device: torch.device | None = None, *,
                  vocab_size: int | None = None) -> dict[str, Tensor]:
    """Check a batch and return input_ids, attention_mask, labels (pads masked) and position_ids on `device`.

    A label counts only where its own position and the position before it are attended: labels are shifted
    inside (position t predicts label t+1), so a label whose preceding position is padding (an example's first
    real token under left padding) would be predicted from a pad. Masking it makes every padded example equal
    to the same example unpadded, whatever the padding side. position_ids count only attended tokens, for the
    same reason. With `vocab_size` (the model's, `model_io.vocab_size`), token ids and labels other than -100
    must lie in [0, vocab_size): a ValueError names the example and position (torch would raise a bare
    IndexError on the CPU and a device-side assert on CUDA).
    """
    out = {k: v.to(device) if device is not None else v for k, v in check_batch(batch).items()}
    mask = out["attention_mask"].long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must contain only 0 and 1")
    out["attention_mask"] = mask
    out["input_ids"] = out["input_ids"].long()
    labels = out["labels"].long().masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)  # predicted from a pad
    out["labels"] = labels
    if vocab_size is not None:
        _check_token_range(out["input_ids"], vocab_size, "token id")  # pads too: every id is embedded
        _check_token_range(labels, vocab_size, "label", allowed=IGNORE_INDEX)
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    empty = (supervised == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"example(s) {empty} have no supervised token (every label after the shift is -100, padding, or "
            "follows padding): their loss is undefined"
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
