"""Examples as token segments: which tokens of a batch belong to which example.

A batch is R rows of N tokens. Every example is one *segment*, a contiguous run of tokens [start, end) of one row:

- padded batch (`attention_mask`): one example per row, its attended tokens (`per_row`: example i is row i);
- packed (padding-free) batch: a row holds several sequences back to back, each one example, marked by
  `position_ids` restarting at 0 at every sequence start (DataCollatorWithFlattening, TRL `padding_free`), or by
  `cu_seq_lens_q` (offsets over the row-major flattened tokens) or `seq_idx` ([R, N] sequence index per token).
  Trailing tokens with attention_mask 0 are padding and belong to no example.

Examples are numbered row-major in order of appearance. `Segments` is the one object the engine passes around
(`prepare_batch` puts it under `batch["segments"]`):

- `spans`: (row, start, end) of each example as host ints: reading them needs no device sync;
- `ranges`: the same as an int32 [S, 3] tensor on the batch's device: what the Triton kernels take;
- `example_of_token`: long [R, N] on the device, every token's example index (-1: padding);
- `sum(values)`: any per-token quantity [R, N, *] reduced to per-example sums [S, *] in fp32 (token losses and
  counts, the bias gradient sum_t delta_t, a gradient dot sum_t delta_t^T R x_t ...): the one reduction every
  per-example measurement of the engine goes through on packed batches;
- `views(t)`: example i's tokens t[row, start:end] of an [R, N, *] tensor, for per-example loops;
- `packed`: the model must see the rows without an attention mask (transformers then builds the block-diagonal
  causal mask from the restarting position_ids).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

Span = tuple[int, int, int]  # (row, start, end)


class PackedBatchError(ValueError):
    """A packed (padding-free) batch whose sequence boundaries are missing, inconsistent or malformed."""


class Segments:
    """The examples of a batch as token segments of its [R, N] rows (see the module docstring)."""

    def __init__(self, *, num_rows: int, width: int, device: torch.device, packed: bool,
                 spans: list[Span] | None = None, mask: Tensor | None = None) -> None:
        if (spans is None) == (mask is None):
            raise ValueError("internal error: Segments needs either spans (packed) or a mask (one example per row)")
        self.num_rows, self.width, self.device, self.packed = num_rows, width, device, packed
        self.per_row = mask is not None
        self._mask = mask
        if spans is not None:
            self.__dict__["spans"] = list(spans)

    @classmethod
    def one_per_row(cls, attention_mask: Tensor) -> Segments:
        """A padded batch: example i is row i, its attended tokens."""
        return cls(num_rows=attention_mask.shape[0], width=attention_mask.shape[1], device=attention_mask.device,
                   packed=False, mask=attention_mask)

    @classmethod
    def from_spans(cls, spans: list[Span], num_rows: int, width: int, device: torch.device) -> Segments:
        """A packed batch: one example per (row, start, end) span, spans in row-major order."""
        return cls(num_rows=num_rows, width=width, device=device, packed=True, spans=spans)

    def __len__(self) -> int:
        return self.num_rows if self.per_row else len(self.spans)

    @property
    def num_examples(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        kind = "packed" if self.packed else "one per row"
        return f"Segments({len(self)} examples, {kind}, rows {self.num_rows} x {self.width})"

    @cached_property
    def spans(self) -> list[Span]:
        """(row, first attended token, last + 1) per example (one per row: read from the mask, a host sync)."""
        return [(r, int(s), int(e)) for r, (s, e) in enumerate(self._row_bounds().cpu().tolist())]

    @cached_property
    def lengths(self) -> list[int]:
        return [e - s for _, s, e in self.spans]

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def _row_bounds(self) -> Tensor:
        """[R, 2] [first, last + 1) attended position of each row, on the device (no sync)."""
        mask = self._mask.bool()
        positions = torch.arange(self.width, device=mask.device)
        start = torch.where(mask, positions, self.width).min(dim=1).values
        end = torch.where(mask, positions + 1, 0).max(dim=1).values
        return torch.stack([start, end], dim=1)

    @cached_property
    def ranges(self) -> Tensor:
        """int32 [S, 3] (row, start, end) on the device: the segments the Triton kernels reduce over."""
        if self.per_row:
            rows = torch.arange(self.num_rows, device=self.device)
            return torch.cat([rows[:, None], self._row_bounds()], dim=1).to(torch.int32).contiguous()
        return torch.tensor(self.spans, dtype=torch.int32).reshape(-1, 3).to(self.device)

    @cached_property
    def example_of_token(self) -> Tensor:
        """long [R, N]: the example index of every token, -1 for padding."""
        if self.per_row:
            rows = torch.arange(self.num_rows, device=self.device)[:, None]
            return torch.where(self._mask.bool(), rows, -1)
        index = torch.full((self.num_rows, self.width), -1, dtype=torch.long)
        for i, (r, s, e) in enumerate(self.spans):
            index[r, s:e] = i
        return index.to(self.device)

    @cached_property
    def _sum_index(self) -> Tensor:
        flat = self.example_of_token.reshape(-1)
        return torch.where(flat >= 0, flat, len(self))  # padding goes to a dropped bucket: no sync

    def sum(self, values: Tensor) -> Tensor:
        """Per-example sums [S, *] (fp32) of a per-token quantity `values` [R, N, *]; padding tokens are left out."""
        if tuple(values.shape[:2]) != (self.num_rows, self.width):
            raise ValueError(f"expected per-token values [R, N, ...] = [{self.num_rows}, {self.width}, ...], got "
                             f"{tuple(values.shape)}")
        rest = tuple(values.shape[2:])
        out = torch.zeros((len(self) + 1, *rest), dtype=torch.float32, device=values.device)
        out.index_add_(0, self._sum_index.to(values.device), values.reshape(-1, *rest).float())
        return out[:-1]

    def subset(self, indices: Tensor) -> Segments:
        """The examples `indices` (ascending) alone, over the same rows: every other token counts as padding. The
        loss-band split of the norm pass (`RowSplit`) gives each half of a packed batch's examples its own."""
        if not self.packed:
            raise ValueError("internal error: Segments.subset is for packed batches (padded ones split by row)")
        spans = self.spans
        return Segments.from_spans([spans[i] for i in indices.tolist()], self.num_rows, self.width, self.device)

    def views(self, t: Tensor) -> list[Tensor]:
        """Example i's tokens of an [R, N, *] tensor: t[row, start:end] (views, no copy)."""
        return [t[r, s:e] for r, s, e in self.spans]

    def describe(self, i: int) -> str:
        """Where example i lies: 'sequence 3 (row 0, tokens 17-29)'."""
        r, s, e = self.spans[i]
        return f"sequence {i} (row {r}, tokens {s}-{e - 1})" if self.packed else f"example {i}"


# ----------------------------------------------------------------------------------------------- finding the spans


def _runs(starts: Tensor, row: int, length: int) -> list[Span]:
    """Spans of one row from a bool [length] tensor marking sequence starts (True at token 0)."""
    bounds = starts.nonzero().flatten().tolist() + [length]
    return [(row, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def spans_from_positions(position_ids: Tensor, lengths: list[int]) -> list[Span]:
    """Sequences of each row's first `lengths[r]` tokens from position_ids that count 0, 1, 2, ... per sequence.

    Raises PackedBatchError naming the row and token where a row does not start at 0 or positions jump.
    """
    spans: list[Span] = []
    for r, n in enumerate(lengths):
        if n == 0:
            continue
        pos = position_ids[r, :n]
        if int(pos[0]) != 0:
            raise PackedBatchError(
                f"position_ids of row {r} start at {int(pos[0])}, not 0: in a packed (padding-free) batch each "
                "sequence's position_ids count 0, 1, 2, ... (DataCollatorWithFlattening: position_ids_start=0)")
        ok = (pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)
        if not bool(ok.all()):
            t = int((~ok).nonzero()[0]) + 1
            raise PackedBatchError(
                f"position_ids of row {r} jump from {int(pos[t - 1])} to {int(pos[t])} at token {t}: a packed "
                "row's position_ids must count up by 1 within a sequence and restart at 0 at the next one")
        spans += _runs(pos == 0, r, n)
    return spans


def spans_from_cu_seqlens(cu_seqlens: Tensor, num_rows: int, width: int) -> list[Span]:
    """Sequences from cumulative lengths over the row-major flattened [R * N] tokens (flash-attention varlen).

    A sequence may not cross a row boundary; tokens after the last offset of a row are padding.
    """
    cu = cu_seqlens.flatten().long().tolist()
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu[:-1], cu[1:], strict=True)) \
            or cu[-1] > num_rows * width:
        raise PackedBatchError(f"cu_seq_lens_q must rise strictly from 0 to at most R*N = {num_rows * width}, "
                               f"got {cu}")
    spans = []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        row = a // width
        if (b - 1) // width != row:
            raise PackedBatchError(f"cu_seq_lens_q puts a sequence across rows {row} and {(b - 1) // width} "
                                   f"(tokens {a}-{b - 1} of the flattened batch): a sequence must lie in one row")
        spans.append((row, a - row * width, b - row * width))
    return spans


def spans_from_seq_idx(seq_idx: Tensor, lengths: list[int]) -> list[Span]:
    """Sequences from a per-token sequence index [R, N] (a new sequence where the index changes)."""
    spans: list[Span] = []
    for r, n in enumerate(lengths):
        if n == 0:
            continue
        idx = seq_idx[r, :n]
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = idx[1:] != idx[:-1]
        spans += _runs(starts, r, n)
    return spans


def positions_of(spans: list[Span], num_rows: int, width: int) -> Tensor:
    """position_ids [R, N] (CPU) counting 0, 1, ... within every span; 0 on padding."""
    pos = torch.zeros((num_rows, width), dtype=torch.long)
    for r, s, e in spans:
        pos[r, s:e] = torch.arange(e - s)
    return pos
