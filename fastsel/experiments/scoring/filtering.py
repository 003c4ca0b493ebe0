"""`fastsel filter` (and `fastsel score --filter`): a whole-dataset filter over a scoring run's scores, writing the
kept rows in the input's own schema (ready for SFTTrainer) and the kept / dropped ids with the thresholds."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from fastsel.experiments.scoring.inputs import LoadedInput, ScoreInput, load_input, write_filtered
from fastsel.experiments.scoring.store import MANIFEST, ChunkStore
from fastsel.selection.dataset_filters import RULES, SCORE_COLUMNS, check_rule, filter_dataset
from fastsel.utils import read_json, write_json_safe


def apply_filter(table: Any, loaded: LoadedInput, rule: str, out_dir: str | os.PathLike[str], *,
                 ratio: float = 0.2, budget: float = 0.0, loss_band: float | None = 1.0) -> dict[str, Any]:
    """Filter the scored rows (input order) and write `filtered.<ext>` and `filter.json` to `out_dir`."""
    check_rule(rule)
    if [loaded.examples[i].id for i in table["index"]] != list(table["id"]):
        raise ValueError("the input's ids differ from the scored ones: the input changed since it was scored; "
                         "score it again")
    column = SCORE_COLUMNS.get(rule)
    if column is not None and column not in table.column_names:
        raise ValueError(f"filter {rule!r} needs the {column!r} column: score with references (--references "
                         f"anchors); this run has {', '.join(table.column_names)}")
    chosen = filter_dataset(rule, losses=torch.tensor(table["loss"]), norms=torch.tensor(table["grad_norm"]),
                            scores=torch.tensor(table[column]) if column else None, ratio=ratio, budget=budget,
                            loss_band=loss_band)
    kept_rows = [int(table["index"][i]) for i in chosen.kept.tolist()]
    kept = set(kept_rows)
    out = Path(out_dir)
    path = write_filtered(loaded, kept_rows, str(out / "filtered"))
    ids = list(table["id"])
    record = {**chosen.summary(), "written": path,
              "kept_ids": [ids[i] for i in chosen.kept.tolist()],
              "dropped_ids": [ids[i] for i in range(len(ids)) if int(table["index"][i]) not in kept]}
    write_json_safe(out / "filter.json", record)
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="the --out folder of a finished `fastsel score` run")
    add_filter_options(parser, required=True)


def add_filter_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--rule", required=required, choices=RULES, help="the whole-dataset filter")
    parser.add_argument("--ratio", type=float, default=0.2, help="moderate / harmful_similarity: share kept")
    parser.add_argument("--budget", type=float, default=0.0, help="gradshield: the kept set's summed score bound")
    parser.add_argument("--loss-band", type=float, default=1.0, help="moderate: the loss band in std (<0: none)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.scores)
    manifest = read_json(root / MANIFEST) if (root / MANIFEST).is_file() else None
    if manifest is None or not (root / "scores.parquet").is_file():
        raise FileNotFoundError(f"{root} holds no finished scoring run (manifest.json and scores.parquet)")
    spec = ScoreInput(**manifest["input"])
    table = ChunkStore(root, manifest["fingerprint"], manifest).read_merged()
    record = apply_filter(table, load_input(spec), args.rule, root, ratio=args.ratio, budget=args.budget,
                          loss_band=None if args.loss_band < 0 else args.loss_band)
    print(f"{args.rule}: kept {record['kept']} of {record['total']} -> {record['written']}")
    return 0


__all__ = ["add_arguments", "add_filter_options", "apply_filter", "run"]
