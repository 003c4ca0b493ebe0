"""Reading raw rows from local files (JSON, JSONL, CSV, Parquet) and checking their fields.

Every row comes back with its 0-based data-row index, so a malformed row can be reported as
``<file>: row <i>`` (for JSON Lines also the 1-based line number). The same index is the row part of the stable ids
of datasets without their own id column (``dolly:<i>``), so the row in an error message is the row in the id.

CSV and Parquet go through `datasets` (its csv and parquet builders, in memory, every CSV cell read as a string).
JSON and JSON Lines are parsed here with the standard library: the `datasets` json builder needs one Arrow schema
for all rows and reports neither the line of a malformed row nor which row broke the schema, and those are the
errors a user needs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

FORMATS = ("json", "jsonl", "csv", "parquet")


class DataError(ValueError):
    """A malformed data row or file; the message names the file and the row."""


@dataclass(frozen=True)
class Row:
    """One raw row: its fields, 0-based index among the data rows, and where it came from."""

    index: int
    fields: Mapping[str, Any]
    source: str
    line: int | None = None
    scope: str = ""  # prefix of the row part of ids, e.g. "test:" for a hub split whose rows are numbered per split

    @property
    def key(self) -> str:
        """The row's id part for datasets without an own id column: scope + 0-based index."""
        return f"{self.scope}{self.index}"

    @property
    def where(self) -> str:
        loc = f"{self.source}: row {self.index}"
        return f"{loc} (line {self.line})" if self.line is not None else loc

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")


def detect_format(path: str) -> str:
    """File format from the extension: .json, .jsonl/.ndjson, .csv, .parquet/.pq."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    fmt = {"ndjson": "jsonl", "pq": "parquet"}.get(ext, ext)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown file type {ext!r}; expected one of .json, .jsonl, .csv, .parquet")
    return fmt


def read_rows(path: str | os.PathLike[str], fmt: str | None = None) -> list[Row]:
    """All rows of a local JSON (a list of objects, or {"data": [...]}), JSONL, CSV or Parquet file.

    CSV cells are strings (an empty cell is ""); the per-dataset readers coerce numbers and decode JSON-encoded
    nested fields. Raises DataError naming the file (and line/row) for unreadable content.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    fmt = fmt or detect_format(path)
    if fmt == "jsonl":
        return list(_read_jsonl(path))
    if fmt == "json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON: {e}") from e
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a JSON data file must hold a list of row objects (or {{'data': [...]}})")
        return [_checked(Row(i, r, path)) for i, r in enumerate(data)]
    if fmt in ("csv", "parquet"):
        return [Row(i, r, path) for i, r in enumerate(_read_with_datasets(path, fmt))]
    raise DataError(f"{path}: unsupported format {fmt!r}")


def _read_with_datasets(path: str, fmt: str) -> Any:
    """A local CSV or Parquet file as a `datasets.Dataset` (kept in memory; CSV cells as strings, empty = "")."""
    import datasets

    options: dict[str, Any] = {"keep_in_memory": True}
    if fmt == "csv":  # every column a string, empty cells "" (no type guessing, no NaN)
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        options.update(features=datasets.Features({name: datasets.Value("string") for name in header}),
                       keep_default_na=False, na_filter=False)
    reader = datasets.Dataset.from_csv if fmt == "csv" else datasets.Dataset.from_parquet
    try:
        with quiet_datasets():
            return reader(path, **options)
    except Exception as e:  # noqa: BLE001 - pandas / pyarrow parse errors name the line; keep their message
        raise DataError(f"{path}: unreadable {fmt.upper()} file: {_first_line(e)}") from e


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets' per-file progress bars off inside the block (restored after): a file read or written in passing."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    """The innermost cause's message (datasets wraps the parser's error, which names the line)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _read_jsonl(path: str) -> Iterator[Row]:
    index = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {index} (line {line_no}): invalid JSON: {e}") from e
            yield _checked(Row(index, obj, path, line_no))
            index += 1


def _checked(row: Row) -> Row:
    if not isinstance(row.fields, Mapping):
        raise row.error(f"expected a JSON object, got {type(row.fields).__name__}")
    return row


def rows_from_records(records: Iterable[Mapping[str, Any]], source: str, scope: str = "") -> list[Row]:
    """Rows from in-memory records (a `datasets.Dataset` split, a list of dicts)."""
    return [_checked(Row(i, r, source, scope=scope)) for i, r in enumerate(records)]


# ---- field access -------------------------------------------------------------------------------------------


def get_str(row: Row, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """A string field; a missing/None optional field is ""; wrong types and (unless allowed) blanks raise."""
    if key not in row.fields or row.fields[key] is None:
        if required:
            raise row.error(f"missing required field {key!r}")
        return ""
    value = row.fields[key]
    if not isinstance(value, str):
        raise row.error(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise row.error(f"field {key!r} is empty")
    return value


def get_int(row: Row, key: str) -> int:
    """An integer field; digit strings are accepted (CSV cells, string-typed columns)."""
    if key not in row.fields or row.fields[key] is None:
        raise row.error(f"missing required field {key!r}")
    value = row.fields[key]
    if isinstance(value, bool):
        raise row.error(f"field {key!r} must be an integer, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise row.error(f"field {key!r} must be an integer, got {value!r}")


def get_json_field(row: Row, key: str) -> Any:
    """A nested field; in a CSV (or a string-typed column) it is accepted as a JSON-encoded string."""
    if key not in row.fields or row.fields[key] is None:
        raise row.error(f"missing required field {key!r}")
    value = row.fields[key]
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise row.error(f"field {key!r} is a string but not valid JSON: {e}") from e
    return value
