"""Trainer batches -> fastsel batches: a missing attention mask, padded rows, packed (padding-free) rows.

What a Hugging Face / TRL data collator hands to `training_step` becomes fastsel's causal-LM batch
(`fastsel.engine.batch`), with the example ids mapped to its examples. Packed rows (DataCollatorWithFlattening,
TRL `padding_free=True` or BFD packing: `position_ids` restarting per sequence, or `cu_seq_lens_q` / `seq_idx`)
stay packed: fastsel's engine runs them natively, one example per sequence. Only sequences without any supervised
token (the padding TRL adds with `pad_to_multiple_of`, or a prompt without completion) are taken out, since their
loss is undefined; the rows are rebuilt without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastsel.engine.batch import IGNORE_INDEX, find_sequences
from fastsel.engine.segments import PackedBatchError, Span, positions_of

__all__ = ["PackedBatchError", "to_fastsel_batch"]

# Batch keys that carry model inputs fastsel does not pass to the model: the result would silently differ.
_UNSUPPORTED_PREFIXES = ("pixel_", "image_", "video_", "audio_", "input_features", "inputs_embeds",
                         "mm_token_type_ids", "past_key_values")
_PACKING_KEYS = ("position_ids", "cu_seq_lens_q", "seq_idx")


def _check_inputs(inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    """input_ids, labels and the attention mask (or None) of a Trainer batch, refusing what fastsel cannot run."""
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
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a [B, T] tensor of 0/1 like input_ids, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__} (custom 4-D "
                         "attention masks are not supported)")
    return input_ids, labels, mask


def _repack(input_ids: Tensor, labels: Tensor, positions: Tensor, spans: list[Span]) -> dict[str, Tensor]:
    """Rows holding only `spans` (back to back, in order); rows left empty are dropped, shorter rows right-padded
    with an attention_mask marking the padding."""
    rows: dict[int, list[Span]] = {}
    for span in spans:
        rows.setdefault(span[0], []).append(span)
    lengths = [sum(e - s for _, s, e in row) for row in rows.values()]
    width = max(lengths)
    out = {"input_ids": input_ids.new_zeros((len(rows), width)),
           "labels": labels.new_full((len(rows), width), IGNORE_INDEX),
           "position_ids": positions.new_zeros((len(rows), width))}
    for i, row in enumerate(rows.values()):
        for key, source in (("input_ids", input_ids), ("labels", labels), ("position_ids", positions)):
            out[key][i, :lengths[i]] = torch.cat([source[r, s:e] for r, s, e in row])
    if min(lengths) < width:
        out["attention_mask"] = (torch.arange(width, device=input_ids.device)[None, :]
                                 < torch.tensor(lengths, device=input_ids.device)[:, None]).long()
    return out


def to_fastsel_batch(inputs: Mapping[str, Any], ids: Sequence[Any] | None = None
                     ) -> tuple[dict[str, Tensor], list[Any] | None, dict[str, Any]]:
    """Turn a Trainer batch into a fastsel batch: (batch, ids per example, info).

    Padded: input_ids, attention_mask (all ones when missing), labels, one example per row. Packed rows stay
    packed (input_ids, labels, position_ids [R, N]; the boundaries from position_ids, cu_seq_lens_q or seq_idx,
    which must agree): one example per sequence. Sequences without any supervised token are left out and counted
    in info['unsupervised_segments']. info['packed'] says whether the batch is packed; `ids` are mapped to the
    examples when their count matches the sequences (else None, with info['note']).
    """
    input_ids, labels, mask = _check_inputs(inputs)
    info: dict[str, Any] = {"packed": False, "unsupervised_segments": 0, "note": ""}
    given = {k: inputs[k] for k in _PACKING_KEYS if isinstance(inputs.get(k), Tensor)}
    spans = find_sequences({"input_ids": input_ids, "labels": labels, "attention_mask": mask, **given})
    if spans is None:
        batch = {"input_ids": input_ids, "labels": labels,
                 "attention_mask": torch.ones_like(input_ids) if mask is None else mask.long()}
        return batch, (list(ids) if ids is not None else None), info

    info["packed"] = True
    host = labels.cpu()
    supervised = [bool((host[r, s + 1:e] != IGNORE_INDEX).any()) for r, s, e in spans]
    kept = [span for span, ok in zip(spans, supervised, strict=True) if ok]
    info["unsupervised_segments"] = len(spans) - len(kept)
    if not kept:
        raise ValueError("packed batch: no sequence has a supervised token (every label is -100)")
    positions = given.get("position_ids")
    if positions is None:
        positions = positions_of(spans, *input_ids.shape).to(input_ids.device)
    if len(kept) == len(spans) and (mask is None or bool(mask.all())):
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    else:
        batch = _repack(input_ids, labels, positions, kept)
    mapped: list[Any] | None = None
    if ids is not None:
        last = max(i for i, ok in enumerate(supervised) if ok) + 1  # trailing unsupervised ones: padding
        if len(ids) == len(kept):
            mapped = list(ids)
        elif len(ids) in (len(spans), last):  # one id per sequence (or per sequence before the padding)
            mapped = [i for i, ok in zip(ids, supervised[:len(ids)], strict=True) if ok]
        else:
            info["note"] = (f"{len(ids)} ids for {len(kept)} packed sequences (rows were packed before "
                            "collation): ids not recorded")
    return batch, mapped, info
