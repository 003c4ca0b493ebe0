"""Small helpers every layer may use (the bottom layer: imports nothing of fastsel).

- atomic writes: a reader (or a crash) sees the old file or the new one, never a torn one;
- `module_mode` / `eval_mode`: a model in train or eval mode for a block, its previous mode restored after;
- `format_bytes`: a byte count for messages and tables;
- `json_safe` / `write_json_safe` / `read_json`: results files without NaN (JSON has none);
- `mean_or_none`: the mean of the measured values (None and NaN left out), None when there is none.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from torch import nn


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or directory's data to disk (a directory: so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    """Write `path` with `writer(file)`, then flush and fsync it."""
    with open(path, mode) as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Write `path` through a fsynced temporary file in the same folder and `os.replace` (then fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write_synced(tmp, writer, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write` of a text."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dump_kwargs: Any) -> None:
    """`atomic_write` of `json.dump(obj)` (indent=1 unless given)."""
    dump_kwargs.setdefault("indent", 1)
    atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs))


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None, recursively through dicts, lists and tuples (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json_safe(path: str | os.PathLike[str], data: Any) -> None:
    """`atomic_write_json` of `json_safe(data)`; other non-JSON values are written as their str."""
    atomic_write_json(path, json_safe(data), default=str)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path) as f:
        return json.load(f)


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are numbers (None and NaN left out); None when none is."""
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(kept) / len(kept)) if kept else None


def atomic_write_file(path: str | os.PathLike[str], save: Callable[[str], None]) -> None:
    """`atomic_write` for savers that take a file name (e.g. safetensors' `save_file(tensors, name)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        save(str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_replace_dir(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(tmp_dir)`, fsync its files, then swap it in as `path` (the old one removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        if path.exists():
            trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`model.train(training)` inside the block; the previous train/eval mode is restored after, also on error."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """`model.eval()` inside the block (no dropout); the previous mode restored after."""
    return module_mode(model, False)


def format_bytes(size: float) -> str:
    """A byte count for people: 0 B, 912 B, 3.5 KiB, 12 MiB, 1.5 GiB (3 significant digits)."""
    size = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
