"""Batches: validation of a causal-LM batch (padded or packed) and assembly of tokenized rows into one.

A batch follows the Hugging Face causal-LM convention: `input_ids` and `labels` [R, N], labels -100 where a token
is not supervised, shifted inside (position t predicts label t+1) as transformers does. Two layouts:

- padded: `attention_mask` [B, T]; one example per row; padded positions (mask 0) are never supervised, and neither
  is a label whose preceding position is padding (left padding == right padding == no padding);
- packed (padding-free): `position_ids` [R, N] restarting at 0 at every sequence start (DataCollatorWithFlattening,
  TRL `padding_free=True` / BFD packing), or `cu_seq_lens_q` / `seq_idx`; `attention_mask` absent, all ones, or 0
  only on trailing padding. Every sequence is one example; the label at a sequence's first token is never a target
  (it would be predicted from the previous sequence). `fastsel.engine.segments` says which tokens form which example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastsel.engine.segments import (
    PackedBatchError,
    Segments,
    Span,
    positions_of,
    spans_from_cu_seqlens,
    spans_from_positions,
    spans_from_seq_idx,
)

IGNORE_INDEX = -100
REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")
PACKING_KEYS = ("position_ids", "cu_seq_lens_q", "seq_idx")  # any of them: the rows may be packed
_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "seq_idx")


def check_batch(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The batch's [R, N] integer tensors (and cu_seq_lens_q) after checking their type, shape and dtype (not
    moved, not converted): what every entry point runs before it reads a shape. Padded batches need input_ids,
    attention_mask and labels; packed ones input_ids, labels and one of position_ids / cu_seq_lens_q / seq_idx."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict with keys {REQUIRED_KEYS}, got {type(batch).__name__}")
    packing = any(batch.get(k) is not None for k in PACKING_KEYS)
    required = ("input_ids", "labels") if packing else REQUIRED_KEYS
    missing = [k for k in required if k not in batch]
    if missing:
        raise KeyError(f"batch is missing required key(s) {missing}; expected {list(REQUIRED_KEYS)} (padded) or "
                       f"input_ids, labels and one of {list(PACKING_KEYS)} (packed)")
    out: dict[str, Tensor] = {}
    for key in (*_TOKEN_KEYS, "cu_seq_lens_q"):
        value = batch.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if key != "cu_seq_lens_q" and value.dim() != 2:
            raise ValueError(f"batch[{key!r}] must have shape [B, T], got {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"batch[{key!r}] must hold integers, got {value.dtype}")
        out[key] = value
    shapes = {k: tuple(v.shape) for k, v in out.items() if k != "cu_seq_lens_q"}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{', '.join(shapes)} must have the same shape, got {shapes}")
    if out["input_ids"].shape[0] == 0 or out["input_ids"].shape[1] == 0:
        raise ValueError(f"empty batch: shape {shapes['input_ids']}")
    return out


def _check_token_range(values: Tensor, vocab_size: int, what: str, segments: Segments,
                       allowed: int | None = None) -> None:
    """Raise ValueError naming the first example (packed: its sequence, row and tokens) and position whose id is
    outside [0, vocab_size) (or `allowed`)."""
    bad = (values < 0) | (values >= vocab_size)
    if allowed is not None:
        bad &= values != allowed
    if bool(bad.any()):
        where = bad.nonzero()
        r, t = (int(v) for v in where[0])
        if segments.packed:
            index = int(segments.example_of_token[r, t])
            owner = segments.describe(index) if index >= 0 else f"the padding of row {r}"
            place = f"in {owner} at row {r}, position {t}"
        else:
            place = f"of example {r} at position {t}"
        extra = f" or {allowed}" if allowed is not None else ""
        raise ValueError(f"{what} {int(values[r, t])} {place} is outside the model's vocabulary "
                         f"[0, {vocab_size}){extra} ({where.shape[0]} such position(s) in the batch)")


def _packed_spans(tensors: dict[str, Tensor], mask: Tensor) -> list[Span] | None:
    """The sequences of a batch with packing metadata (CPU), or None when every row holds one sequence.

    Every given kind of boundary (position_ids, cu_seq_lens_q, seq_idx) must agree with the others.
    """
    rows, width = mask.shape
    lengths = mask.sum(dim=1)
    right_padded = bool((mask.bool() == (torch.arange(width)[None, :] < lengths[:, None])).all())
    if not right_padded:  # a padded batch (left or gappy padding): one example per row, positions from the mask
        pos = tensors.get("position_ids")
        restarts = pos is not None and any(bool((p[m.bool()][1:] == 0).any()) for p, m in zip(pos.cpu(), mask,
                                                                                            strict=True))
        if restarts or "cu_seq_lens_q" in tensors or "seq_idx" in tensors:
            raise PackedBatchError("a packed batch may be padded only at the end of its rows (attention_mask 0 on "
                                   "trailing tokens): packed rows with left or inner padding are not supported")
        return None
    found: dict[str, list[Span]] = {}
    if "position_ids" in tensors:
        found["position_ids"] = spans_from_positions(tensors["position_ids"].cpu(), lengths.tolist())
    if "cu_seq_lens_q" in tensors:
        found["cu_seq_lens_q"] = spans_from_cu_seqlens(tensors["cu_seq_lens_q"].cpu(), rows, width)
    if "seq_idx" in tensors:
        found["seq_idx"] = spans_from_seq_idx(tensors["seq_idx"].cpu(), lengths.tolist())
    (first, spans), *others = found.items()
    for name, other in others:
        if other != spans:
            starts = sorted({(r, s) for r, s, _ in spans} ^ {(r, s) for r, s, _ in other})[:3]
            raise PackedBatchError(f"{first} and {name} disagree on the sequence boundaries (first (row, token) "
                                   f"where they differ: {starts})")
    covered = [0] * rows
    for r, s, e in spans:
        covered[r] += e - s
    if covered != lengths.tolist():
        raise PackedBatchError(f"the sequence boundaries cover {covered} tokens per row but the rows hold "
                               f"{lengths.tolist()} attended tokens")
    per_row = [0] * rows
    for r, _, _ in spans:
        per_row[r] += 1
    return None if max(per_row) <= 1 else spans


def find_sequences(batch: Mapping[str, Any]) -> list[Span] | None:
    """The sequences of a packed batch as (row, start, end) spans in order of appearance, or None for a batch with
    one example per row (padded). Raises PackedBatchError on malformed or inconsistent boundaries."""
    tensors = check_batch(batch)
    if not any(k in tensors for k in PACKING_KEYS):
        return None
    mask = tensors.get("attention_mask")
    return _packed_spans(tensors, (torch.ones_like(tensors["input_ids"]) if mask is None else mask).long().cpu())


def prepare_batch(batch: Mapping[str, Any], device: torch.device | None = None, *,
                  vocab_size: int | None = None) -> dict[str, Any]:
    """Check a batch; return input_ids, attention_mask, labels (never-target positions masked), position_ids and
    `segments` (the examples as token segments) on `device`.

    A label counts only where its own position and the position before it are attended: labels are shifted
    inside (position t predicts label t+1), so a label whose preceding position is padding (an example's first
    real token under left padding) would be predicted from a pad. Masking it makes every padded example equal
    to the same example unpadded, whatever the padding side. Padded: position_ids count only attended tokens, for
    the same reason. Packed: the given position_ids (or ones counted from cu_seq_lens_q / seq_idx); the label at
    every sequence's first token is masked (it would be predicted from the previous sequence). With `vocab_size`
    (the model's, `model_io.vocab_size`), token ids and labels other than -100 must lie in [0, vocab_size): a
    ValueError names the example (packed: the sequence, row and tokens) and position (torch would raise a bare
    IndexError on the CPU and a device-side assert on CUDA). A prepared batch is returned as it is (its token
    ids checked against `vocab_size` when given).
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict with keys {REQUIRED_KEYS}, got {type(batch).__name__}")
    if isinstance(batch.get("segments"), Segments) and (device is None or batch["input_ids"].device == device):
        if vocab_size is not None:
            _check_vocab(batch, vocab_size)
        return dict(batch)
    tensors = check_batch(batch)
    input_ids = tensors["input_ids"]
    mask = tensors.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must contain only 0 and 1")
    spans = None
    if any(k in tensors for k in PACKING_KEYS):
        spans = _packed_spans(tensors, mask.cpu())
    labels = tensors["labels"].long().masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)  # predicted from a pad
    if spans is None:
        supervised = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        empty = (supervised == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"example(s) {empty} have no supervised token (every label after the shift is -100, padding, or "
                "follows padding): their loss is undefined"
            )
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
        segments = Segments.one_per_row(mask if device is None else mask.to(device))
    else:
        rows, width = input_ids.shape
        starts = torch.zeros((rows, width), dtype=torch.bool)
        for r, s, _ in spans:
            starts[r, s] = True
        labels = labels.masked_fill(starts.to(labels.device), IGNORE_INDEX)
        segments = Segments.from_spans(spans, rows, width, device or input_ids.device)
        host = labels.cpu()
        empty = [i for i, (r, s, e) in enumerate(spans) if not bool((host[r, s + 1:e] != IGNORE_INDEX).any())]
        if empty:
            where = ", ".join(segments.describe(i) for i in empty[:5])
            raise ValueError(f"{len(empty)} sequence(s) of the packed batch have no supervised token (every label "
                             f"after the sequence's first token is -100): {where}; their loss is undefined")
        position_ids = tensors.get("position_ids")
        if position_ids is None:
            position_ids = positions_of(spans, rows, width)
        position_ids = position_ids.long()
    out = {"input_ids": input_ids.long(), "attention_mask": mask, "labels": labels, "position_ids": position_ids}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    out["segments"] = segments
    if vocab_size is not None:
        _check_vocab(out, vocab_size)
    return out


def _check_vocab(prepared: Mapping[str, Any], vocab_size: int) -> None:
    """Token ids (pads too: every id is embedded) and labels other than -100 of a prepared batch in the vocabulary."""
    _check_token_range(prepared["input_ids"], vocab_size, "token id", prepared["segments"])
    _check_token_range(prepared["labels"], vocab_size, "label", prepared["segments"], allowed=IGNORE_INDEX)


def take_examples(prepared: Mapping[str, Any], indices: Tensor) -> dict[str, Tensor]:
    """A batch of the chosen examples of a prepared batch: their rows (padded), or their sequences packed back to
    back into one row (packed)."""
    segments: Segments = prepared["segments"]
    if not segments.packed:
        return {k: prepared[k][indices.to(prepared[k].device)] for k in REQUIRED_KEYS}
    chosen = [segments.spans[i] for i in indices.tolist()]
    return {k: torch.cat([prepared[k][r, s:e] for r, s, e in chosen])[None]
            for k in ("input_ids", "labels", "position_ids")}


def packed_examples(prepared: Mapping[str, Any]) -> dict[str, Tensor]:
    """All examples of a prepared padded batch, their attended tokens back to back in one padding-free row
    (input_ids, labels, position_ids [1, N]): the same examples in the same order, without the padding."""
    mask = prepared["attention_mask"].bool()
    ids, labels = prepared["input_ids"][mask][None], prepared["labels"][mask][None]
    lengths = mask.sum(dim=1)
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    positions = torch.arange(ids.shape[1], device=ids.device) - starts
    return {"input_ids": ids, "labels": labels, "position_ids": positions[None]}


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


def pack(features: Sequence[Mapping[str, Any]], pad_token_id: int, *,
         max_tokens: int | None = None) -> dict[str, Any]:
    """Pack tokenized rows back to back: input_ids, labels, position_ids (restarting at 0 per row) [R, N] and ids.

    Rows keep their order; a packed row takes rows while they fit in `max_tokens` (None: all in one packed row; a
    longer row gets a packed row of its own). Packed rows shorter than the longest are right-padded, with an
    attention_mask marking the padding (present only then). Example i of the result is features[i].
    """
    if not features:
        raise ValueError("cannot pack an empty list of features")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens!r}")
    groups: list[list[Mapping[str, Any]]] = [[]]
    used = 0
    for f in features:
        n = len(f["input_ids"])
        if groups[-1] and max_tokens is not None and used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(f)
        used += n
    rows = [sum(len(f["input_ids"]) for f in g) for g in groups]
    width = max(rows)
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    for r, group in enumerate(groups):
        t = 0
        for f in group:
            n = len(f["input_ids"])
            ids[r, t:t + n] = torch.as_tensor(_as_list(f["input_ids"]), dtype=torch.long)
            labels[r, t:t + n] = torch.as_tensor(_as_list(f.get("labels", f["input_ids"])), dtype=torch.long)
            positions[r, t:t + n] = torch.arange(n)
            t += n
    out: dict[str, Any] = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if min(rows) < width:
        out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(rows)[:, None]).long()
    out["ids"] = [f.get("id") for f in features]
    return out
