"""What `fastsel score` reads: a shipped task, a local JSON/JSONL/CSV/Parquet file, a hub dataset or a
`datasets.Dataset`, as (id, prompt, response, system prompt) examples, and how a filtered copy is written back in
the input's own schema.

Columns: a chat `messages` column (optional system turn, one user turn, the final assistant turn: the response),
or a prompt and a response column, named by the user or found among the usual pairs (`COLUMN_PAIRS`). Every
problem is reported before any model work, naming the column, the columns present, or the row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastsel.experiments.data.examples import Example
from fastsel.experiments.data.records import DataError, detect_format, read_rows
from fastsel.experiments.data.tasks import TASKS, is_hub_id, load_task

COLUMN_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "response"),
                ("instruction", "output"), ("question", "answer"))


@dataclass(frozen=True)
class ScoreInput:
    """Where the examples come from and which columns hold them (None: found as the module docstring says)."""

    source: Any  # a shipped task name, a local file, a hub id ("owner/name"), or a datasets.Dataset
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None
    split: str = "train"

    def describe(self) -> str:
        if isinstance(self.source, (str, os.PathLike)):
            return os.fspath(self.source)
        return f"{type(self.source).__name__}(fingerprint={getattr(self.source, '_fingerprint', '?')})"


@dataclass
class LoadedInput:
    """The examples in input order, the input's raw rows (for writing a filtered copy) and its format."""

    examples: list[Example]
    systems: list[str | None]
    rows: list[Mapping[str, Any]]
    fmt: str  # json, jsonl, csv, parquet, task, dataset
    columns: dict[str, str | None] = field(default_factory=dict)


def load_input(spec: ScoreInput) -> LoadedInput:
    """Read and check the input: a named error for a missing column, an empty dataset or a malformed row."""
    source = spec.source
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) in TASKS:
        examples = list(load_task(os.fspath(source), split=spec.split))
        rows = [e.to_dict() for e in examples]
        loaded = LoadedInput(examples, [None] * len(examples), rows, "task", {"prompt": "prompt", "response": "response"})
    else:
        rows, fmt, where = _raw_rows(spec)
        loaded = _from_rows(rows, fmt, where, spec)
    if not loaded.examples:
        raise ValueError(f"{spec.describe()}: the dataset is empty (split {spec.split!r})")
    return loaded


def _raw_rows(spec: ScoreInput) -> tuple[list[Mapping[str, Any]], str, str]:
    source = spec.source
    if not isinstance(source, (str, os.PathLike)):  # a datasets.Dataset (or any sequence of row mappings)
        return [dict(r) for r in source], "dataset", spec.describe()
    path = os.fspath(source)
    if is_hub_id(path):
        import datasets

        return [dict(r) for r in datasets.load_dataset(path, split=spec.split)], "dataset", path
    return [dict(r.fields) for r in read_rows(path)], detect_format(path), path


def _from_rows(rows: list[Mapping[str, Any]], fmt: str, where: str, spec: ScoreInput) -> LoadedInput:
    if not rows:
        raise ValueError(f"{where}: the dataset is empty (split {spec.split!r})")
    present = sorted({k for r in rows[:1] for k in r})
    columns = _columns(spec, present, where)
    examples, systems = [], []
    for i, row in enumerate(rows):
        missing = [c for c in columns.values() if c is not None and c not in row]
        if missing:
            raise DataError(f"{where}: row {i} has no column {missing[0]!r} (columns: {', '.join(sorted(row))})")
        ex_id = str(row[columns["id"]]) if columns["id"] else str(i)
        if columns["messages"]:
            system, prompt, response = _split_messages(row[columns["messages"]], where, i)
        else:
            system, prompt, response = None, _text(row, columns["prompt"], where, i), \
                _text(row, columns["response"], where, i)
        examples.append(Example(ex_id, "score", prompt, response, "score"))
        systems.append(system)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise DataError(f"{where}: id {dup!r} of column {columns['id']!r} occurs more than once; ids must be unique")
    return LoadedInput(examples, systems, rows, fmt, columns)


def _columns(spec: ScoreInput, present: Sequence[str], where: str) -> dict[str, str | None]:
    listed = ", ".join(present) or "none"
    for name, what in ((spec.id_column, "id"), (spec.messages_column, "messages"), (spec.prompt_column, "prompt"),
                       (spec.response_column, "response")):
        if name is not None and name not in present:
            raise DataError(f"{where}: no {what} column {name!r} (columns: {listed})")
    if spec.messages_column or (spec.prompt_column is None and spec.response_column is None
                                and "messages" in present):
        return {"id": spec.id_column, "messages": spec.messages_column or "messages", "prompt": None,
                "response": None}
    if spec.prompt_column and spec.response_column:
        return {"id": spec.id_column, "messages": None, "prompt": spec.prompt_column,
                "response": spec.response_column}
    for prompt, response in COLUMN_PAIRS:
        if prompt in present and response in present and spec.prompt_column in (None, prompt) \
                and spec.response_column in (None, response):
            return {"id": spec.id_column, "messages": None, "prompt": prompt, "response": response}
    raise DataError(f"{where}: no prompt/response columns found (columns: {listed}); name them with "
                    "--prompt-column/--response-column or --messages-column")


def _text(row: Mapping[str, Any], column: str | None, where: str, i: int) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: row {i}: column {column!r} must be text, got {type(value).__name__}")
    return value


def _split_messages(messages: Any, where: str, i: int) -> tuple[str | None, str, str]:
    """(system, user, assistant) of a one-turn chat; anything else is an error naming the row."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise DataError(f"{where}: row {i}: messages must be [system?, user, assistant] (one turn, the assistant's "
                        f"answer last), got roles {roles}")
    system = messages[0]["content"] if roles[0] == "system" else None
    return system, messages[-2]["content"], messages[-1]["content"]


def fingerprint(loaded: LoadedInput, features: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """sha256 over the tokenized examples (data, tokenizer and template at once) and the scoring settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in features:
        h.update(json.dumps([f["id"], f["input_ids"], f["labels"]]).encode())
    return h.hexdigest()


def write_filtered(loaded: LoadedInput, kept: Sequence[int], path_stem: str) -> str:
    """The kept rows in the input's own schema and format (a task's rows as normalized examples in JSONL, a
    `datasets.Dataset` as Parquet); returns the written path."""
    rows = [loaded.rows[i] for i in kept]
    ext = {"task": "jsonl", "dataset": "parquet"}.get(loaded.fmt, loaded.fmt)
    path = f"{path_stem}.{ext}"
    tmp = path + ".tmp"
    if ext == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif ext == "json":
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    else:
        import datasets

        table = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
        if ext == "csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp)
    os.replace(tmp, path)
    return path


__all__ = ["COLUMN_PAIRS", "LoadedInput", "ScoreInput", "fingerprint", "load_input", "write_filtered"]
