"""The rows `train` takes, checked before anything runs, and the seeded order it takes them in.

A row is {"input_ids": [int], "labels": [int] (-100 = unsupervised), "id": optional} (what
`fastsel.experiments.data.tokenize_examples` makes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastsel.engine.batch import IGNORE_INDEX
from fastsel.training.options import is_int


def _as_int_list(value: Any) -> list[int] | None:
    """The token list of a row field, or None if it is not a 1-D sequence of ints."""
    if isinstance(value, Tensor):
        value = value.tolist() if value.dim() == 1 and not value.dtype.is_floating_point else None
    elif isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim == 1 and np.issubdtype(value.dtype, np.integer) else None
    if not isinstance(value, (list, tuple)) or not all(is_int(v) for v in value):
        return None
    return [int(v) for v in value]


def check_dataset(dataset: Sequence[Mapping[str, Any]], vocab_size: int | None = None) -> list[Any]:
    """Validate every row before training; return the row ids ("id" field, else the row index).

    A row needs `input_ids` and `labels`: equal-length lists of ints, labels -100 where unsupervised, and at
    least one supervised token after the causal shift (labels[1:]), otherwise its loss is undefined.
    """
    if isinstance(dataset, (str, bytes, Mapping)) or not hasattr(dataset, "__len__") \
            or not hasattr(dataset, "__getitem__"):
        raise TypeError("dataset must be a sequence of rows (list or datasets.Dataset), got "
                        f"{type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    ids = []
    for index in range(len(dataset)):
        row = dataset[index]
        if not isinstance(row, Mapping):
            raise TypeError(f"dataset row {index} must be a dict, got {type(row).__name__}")
        row_id = row.get("id", index)
        where = f"dataset row {index}" + (f" (id {row_id!r})" if "id" in row else "")
        for key in ("input_ids", "labels"):
            if key not in row:
                raise ValueError(f"{where} has no {key!r} field")
        input_ids, labels = _as_int_list(row["input_ids"]), _as_int_list(row["labels"])
        if input_ids is None:
            raise TypeError(f"{where}: input_ids must be a list of ints, got {_describe(row['input_ids'])}")
        if labels is None:
            raise TypeError(f"{where}: labels must be a list of ints, got {_describe(row['labels'])}")
        if not input_ids:
            raise ValueError(f"{where}: input_ids is empty")
        if len(labels) != len(input_ids):
            raise ValueError(f"{where}: labels has length {len(labels)} but input_ids has {len(input_ids)}")
        if vocab_size is not None:
            bad = [t for t in input_ids if not 0 <= t < vocab_size]
            bad += [t for t in labels if t != IGNORE_INDEX and not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{where}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
        elif any(t < 0 for t in input_ids) or any(t < 0 and t != IGNORE_INDEX for t in labels):
            raise ValueError(f"{where}: negative token id (only labels may be {IGNORE_INDEX})")
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise ValueError(f"{where} has no supervised token (every label after the first is "
                             f"{IGNORE_INDEX}): its loss is undefined; drop the row or supervise a token")
        ids.append(row_id if isinstance(row_id, (str, int)) and not isinstance(row_id, bool)
                   else int(row_id) if is_int(row_id) else str(row_id))  # JSON-able for the log
    return ids


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__


class DataOrder:
    """Micro-batches of row indices: a fresh seeded permutation per epoch, consumed in `batch_size` chunks.

    The state (epoch, position, generator state at the start of the epoch) restores the exact stream.
    """

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool) -> None:
        self.size, self.batch_size = size, batch_size
        self.per_epoch = size // batch_size if drop_last else math.ceil(size / batch_size)
        if self.per_epoch == 0:
            raise ValueError(f"the dataset has {size} rows, fewer than batch_size={batch_size} with "
                             "drop_last=True: no batch to train on")
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()
        self.perm = torch.randperm(self.size, generator=self.generator)

    def next(self) -> tuple[int, list[int]]:
        """(epoch, row indices) of the next micro-batch."""
        if self.position == self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
        start = self.position * self.batch_size
        self.position += 1
        return self.epoch, self.perm[start:start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def generator_state(self) -> Tensor:
        return self._epoch_state

    def load_state(self, epoch: int, position: int, generator_state: Tensor) -> None:
        self.generator.set_state(generator_state)
        self._start_epoch()
        self.epoch, self.position = epoch, position
