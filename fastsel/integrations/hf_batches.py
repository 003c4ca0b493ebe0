"""Trainer batches -> fastsel batches: a missing attention mask, padded rows, packed (padding-free) rows.

What a Hugging Face / TRL data collator hands to `training_step` becomes fastsel's causal-LM batch
(`fastsel.engine.batch`), with the example ids mapped to its rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastsel.engine.batch import IGNORE_INDEX

# Batch keys that carry model inputs fastsel does not pass to the model: the result would silently differ.
_UNSUPPORTED_PREFIXES = ("pixel_", "image_", "video_", "audio_", "input_features", "inputs_embeds",
                         "mm_token_type_ids", "past_key_values")


class PackedBatchError(ValueError):
    """A packed (padding-free) batch whose sequence boundaries cannot be recovered."""



def _row_segments(inputs: Mapping[str, Any], row: int, attended: Tensor) -> list[Tensor]:
    """Token positions of each sequence in row `row` (attended tokens only), from the packing metadata."""
    positions = attended.nonzero().flatten()
    if positions.numel() == 0:
        return []
    if isinstance(inputs.get("position_ids"), Tensor):
        pos = inputs["position_ids"]
        if pos.dim() != 2 or pos.shape != inputs["input_ids"].shape:
            raise PackedBatchError(f"position_ids must have the shape of input_ids [B, T], got {tuple(pos.shape)}")
        values = pos[row][positions]
        starts = torch.ones_like(values, dtype=torch.bool)
        starts[1:] = values[1:] != values[:-1] + 1
    elif isinstance(inputs.get("seq_idx"), Tensor):
        values = inputs["seq_idx"][row][positions]
        starts = torch.ones_like(values, dtype=torch.bool)
        starts[1:] = values[1:] != values[:-1]
    elif inputs.get("cu_seq_lens_q") is not None:
        if inputs["input_ids"].shape[0] != 1 or not bool(attended.all()):
            raise PackedBatchError("cu_seq_lens_q without position_ids is only understood for a single flattened "
                                   "row without attention_mask padding")
        cu = torch.as_tensor(inputs["cu_seq_lens_q"]).flatten().long().to(positions.device)
        starts = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
        starts[cu[:-1][cu[:-1] < positions.numel()]] = True
        starts[0] = True
    else:
        return [positions]
    bounds = starts.nonzero().flatten().tolist() + [positions.numel()]
    return [positions[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def to_fastsel_batch(inputs: Mapping[str, Any], ids: Sequence[Any] | None = None
                     ) -> tuple[dict[str, Tensor], list[Any] | None, dict[str, Any]]:
    """Turn a Trainer batch into fastsel's padded causal-LM batch: (batch, ids per example, info).

    A missing attention_mask is all ones. A packed row (position_ids restarting, seq_idx or cu_seq_lens_q) becomes
    one right-padded row per sequence; sequences without any supervised token (padding of a packed row) are left
    out and counted in info['unsupervised_segments']. info['packed'] says whether unpacking happened; `ids` are
    mapped to the sequences when their count matches (else None, with info['note']).
    """
    bad = sorted(k for k in inputs if any(k.startswith(p) for p in _UNSUPPORTED_PREFIXES))
    if bad:
        raise NotImplementedError(f"batch key(s) {bad} are model inputs fastsel does not pass to the model (it runs "
                                  "text-only causal LMs on input_ids/attention_mask): selection would be wrong")
    for key in ("input_ids", "labels"):
        if not isinstance(inputs.get(key), Tensor):
            hint = (" Use a collator that builds causal-LM labels, e.g. DataCollatorForLanguageModeling(mlm=False)"
                    if key == "labels" else "")
            raise KeyError(f"the batch has no tensor {key!r} (keys: {sorted(inputs)}).{hint}")
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"input_ids and labels must both be [B, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(labels.shape)}")
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.long)
    elif not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a [B, T] tensor of 0/1 like input_ids, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__} (custom 4-D "
                         "attention masks are not supported)")
    info: dict[str, Any] = {"packed": False, "unsupervised_segments": 0, "note": ""}
    rows = [_row_segments(inputs, r, mask[r] != 0) for r in range(input_ids.shape[0])]
    if all(len(s) <= 1 for s in rows):
        _check_positions(inputs, rows)
        return {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels}, \
            (list(ids) if ids is not None else None), info

    info["packed"] = True
    segments: list[tuple[int, Tensor]] = [(r, seg) for r, segs in enumerate(rows) for seg in segs]
    _check_positions(inputs, rows)
    supervised = [bool((labels[r][seg][1:] != IGNORE_INDEX).any()) for r, seg in segments]
    kept = [s for s, ok in zip(segments, supervised, strict=True) if ok]
    info["unsupervised_segments"] = len(segments) - len(kept)
    if not kept:
        raise ValueError("packed batch: no sequence has a supervised token (every label is -100)")
    width = max(int(seg.numel()) for _, seg in kept)
    out_ids = torch.zeros(len(kept), width, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros(len(kept), width, dtype=torch.long, device=input_ids.device)
    out_labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for i, (r, seg) in enumerate(kept):
        n = int(seg.numel())
        out_ids[i, :n] = input_ids[r][seg]
        out_mask[i, :n] = 1
        out_labels[i, :n] = labels[r][seg]
    mapped: list[Any] | None = None
    if ids is not None:
        if len(ids) == len(kept):
            mapped = list(ids)
        elif len(ids) == len(segments):
            mapped = [i for i, ok in zip(ids, supervised, strict=True) if ok]
        else:
            info["note"] = (f"{len(ids)} ids for {len(kept)} packed sequences (rows were packed before "
                            "collation): ids not recorded")
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}, mapped, info


def _check_positions(inputs: Mapping[str, Any], rows: list[list[Tensor]]) -> None:
    """fastsel numbers each example's positions 0, 1, ...: refuse given position_ids that start elsewhere."""
    pos = inputs.get("position_ids")
    if not isinstance(pos, Tensor):
        return
    for r, segs in enumerate(rows):
        for seg in segs:
            if int(pos[r][seg[0]]) != 0:
                raise ValueError(f"position_ids of a sequence in row {r} start at {int(pos[r][seg[0]])}, not 0; "
                                 "fastsel numbers each sequence's attended tokens from 0: drop position_ids from "
                                 "the batch or number them from 0 (DataCollatorWithFlattening: position_ids_start=0)")
