"""Where a scoring run keeps its work: one Parquet file per chunk, written atomically, and a manifest holding the
run's fingerprint, so that a rerun of the same command resumes at the first missing chunk and a changed input or
setting is refused instead of mixed in.

Layout under `out_dir`: manifest.json, chunks/chunk-<k>.parquet, then scores.parquet (all rows, input order) and
summary.json once every chunk is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastsel.experiments.data.records import quiet_datasets
from fastsel.utils import fsync_path, write_json_safe

MANIFEST = "manifest.json"
SCORES = "scores.parquet"


class ChangedInputError(ValueError):
    """The output folder holds a run over another input or other settings."""


class ChunkStore:
    """Chunk files of one scoring run under `out_dir`, tied to its fingerprint."""

    def __init__(self, out_dir: str | os.PathLike[str], fingerprint: str, meta: Mapping[str, Any]) -> None:
        self.root = Path(out_dir)
        self.fingerprint = fingerprint
        self.meta = dict(meta)

    @property
    def chunks(self) -> Path:
        return self.root / "chunks"

    def open(self, *, write_manifest: bool = True) -> None:
        """Check the manifest against this run's fingerprint (ChangedInputError naming the file), or write it."""
        manifest = self.root / MANIFEST
        if manifest.is_file():
            found = json.loads(manifest.read_text()).get("fingerprint")
            if found != self.fingerprint:
                raise ChangedInputError(
                    f"{manifest} belongs to a scoring run over another input or other settings (fingerprint "
                    f"{str(found)[:12]}…, this run {self.fingerprint[:12]}… over {self.meta.get('source')}): it is "
                    "not mixed in; score into a new "
                    f"--out folder or delete {self.root}")
            return
        if write_manifest:
            self.chunks.mkdir(parents=True, exist_ok=True)
            write_json_safe(manifest, {"fingerprint": self.fingerprint, **self.meta})

    def path(self, k: int) -> Path:
        return self.chunks / f"chunk-{k:05d}.parquet"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def write(self, k: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Chunk k's rows, atomically: a killed run leaves the chunk absent, never half written."""
        import datasets

        _write_parquet(datasets.Dataset.from_list(list(rows)), self.path(k))

    def merge(self, n_chunks: int) -> Any:
        """Every chunk's rows in input order (`index`) as one datasets.Dataset, also written to scores.parquet."""
        import datasets

        rows = [row for k in range(n_chunks)
                for row in datasets.Dataset.from_parquet(str(self.path(k)), keep_in_memory=True).to_list()]
        merged = datasets.Dataset.from_list(sorted(rows, key=lambda row: row["index"]))
        _write_parquet(merged, self.root / SCORES)
        return merged

    def read_merged(self) -> Any:
        """scores.parquet as written by `merge`."""
        import datasets

        return datasets.Dataset.from_parquet(str(self.root / SCORES), keep_in_memory=True)


def _write_parquet(table: Any, path: Path) -> None:
    """A datasets.Dataset to `path` through a temporary file and `os.replace` (a kill leaves no partial file);
    datasets' per-file progress bar stays off (the scoring bar is the one that counts)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with quiet_datasets():
        table.to_parquet(str(tmp))
    os.replace(tmp, path)
    fsync_path(path.parent)


__all__ = ["MANIFEST", "SCORES", "ChangedInputError", "ChunkStore"]
