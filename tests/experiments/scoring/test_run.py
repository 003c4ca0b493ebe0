"""score_dataset: every score equals the naive one-example-at-a-time backward, across passes and chunks; a run
killed mid-way resumes to the same file; a changed input is refused; two torchrun ranks give one process's output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from needs import need_module

need_module("datasets")
from scoring_case import SETTINGS, rows, tiny_scorer, write_jsonl  # noqa: E402
from torchrun import run_two_processes  # noqa: E402

from fastsel.engine.batch import collate  # noqa: E402
from fastsel.engine.norms import norm_pass  # noqa: E402
from fastsel.experiments.scoring import ScoreInput, anchor_references, load_input, score_dataset  # noqa: E402
from fastsel.experiments.scoring.run import make_plan  # noqa: E402
from fastsel.experiments.scoring.store import ChangedInputError  # noqa: E402

HERE = Path(__file__).resolve().parent
COLUMNS = dict(prompt_column="question", response_column="answer", id_column="uid")


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("references", [False, True])
def test_scores_equal_the_naive_loop_across_passes_and_chunks(tmp_path: Path, references: bool) -> None:
    model, tok = tiny_scorer()
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    refs = anchor_references(model, tok, anchors=4, max_length=64) if references else None
    table = score_dataset(model, tok, data, out_dir=tmp_path / "out", references=refs, settings=SETTINGS,
                          progress=False, **COLUMNS)
    plan = make_plan(load_input(ScoreInput(data, **COLUMNS)), tok, SETTINGS)
    assert len(plan.passes) > 2 and len(plan.chunks) > 2 and table["index"] == list(range(11))
    assert table["id"] == [r["uid"] for r in rows()]
    feats = sorted(zip(plan.index, plan.features, strict=True))
    naive = [norm_pass(collate([f], 0), model, backend="naive", reference=list(refs.values()) if refs else None)
             for _, f in feats]
    assert rel(torch.tensor(table["grad_norm"]), torch.cat([n.norms for n in naive]).double()) <= 1e-5
    assert rel(torch.tensor(table["loss"]), torch.cat([n.losses for n in naive]).double()) <= 1e-5
    assert table["response_tokens"] == [sum(t != -100 for t in f["labels"]) for _, f in feats]
    if references:
        dots = torch.cat([n.dots for n in naive]).double()
        for k, name in enumerate(refs):
            assert rel(torch.tensor(table[f"dot_{name}"]), dots[:, k]) <= 1e-5, name
        assert table["gradshield_score"] == [-d for d in table["dot_safety"]]
        assert set(table.column_names) >= {"harmful_similarity_score", "cosine_harm_unit"}


def test_in_memory_equals_the_stored_run(tmp_path: Path) -> None:
    """No out_dir: the same table, from memory."""
    model, tok = tiny_scorer()
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    stored = score_dataset(model, tok, data, out_dir=tmp_path / "out", settings=SETTINGS, progress=False, **COLUMNS)
    memory = score_dataset(model, tok, data, settings=SETTINGS, progress=False, **COLUMNS)
    assert memory["grad_norm"] == stored["grad_norm"] and memory["id"] == stored["id"]


KILLED_RUN = """
import os, signal, sys
sys.path[:0] = [{here!r}, {tests!r}]
from scoring_case import SETTINGS, tiny_scorer
from fastsel.experiments.scoring import score_dataset
from fastsel.experiments.scoring.store import ChunkStore
write = ChunkStore.write
def write_then_die(self, k, chunk_rows):
    write(self, k, chunk_rows)
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)
ChunkStore.write = write_then_die
model, tok = tiny_scorer()
score_dataset(model, tok, {data!r}, out_dir={out!r}, settings=SETTINGS, progress=False,
              prompt_column="question", response_column="answer", id_column="uid")
"""


def test_a_killed_run_resumes_to_the_uninterrupted_output(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    out = tmp_path / "killed"
    code = KILLED_RUN.format(here=str(HERE), tests=str(HERE.parents[1]), data=str(data), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "chunks").glob("chunk-*.parquet")) == ["chunk-00000.parquet",
                                                                              "chunk-00001.parquet"]
    assert not (out / "scores.parquet").exists()
    model, tok = tiny_scorer()
    resumed = score_dataset(model, tok, data, out_dir=out, settings=SETTINGS, progress=False, **COLUMNS)
    whole = score_dataset(model, tok, data, out_dir=tmp_path / "whole", settings=SETTINGS, progress=False, **COLUMNS)
    assert resumed.to_list() == whole.to_list()  # same rows, same order, same numbers: no duplicates, no gaps


def test_a_changed_input_is_refused_naming_the_file(tmp_path: Path) -> None:
    model, tok = tiny_scorer()
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    score_dataset(model, tok, data, out_dir=tmp_path / "out", settings=SETTINGS, progress=False, **COLUMNS)
    write_jsonl(data, rows()[:-1] + [{"uid": "ex10", "question": "changed", "answer": "No."}])
    with pytest.raises(ChangedInputError, match=r"manifest\.json .*data\.jsonl"):
        score_dataset(model, tok, data, out_dir=tmp_path / "out", settings=SETTINGS, progress=False, **COLUMNS)


def test_two_ranks_give_the_one_process_output(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    run_two_processes(HERE / "score_worker.py", [str(tmp_path / "ranks"), str(data)], timeout_s=240,
                      what="scoring")
    model, tok = tiny_scorer()
    import datasets

    merged = datasets.Dataset.from_parquet(str(tmp_path / "ranks" / "scores.parquet"))
    one = score_dataset(model, tok, data, settings=SETTINGS, progress=False, **COLUMNS)
    assert merged["id"] == one["id"] and merged["index"] == one["index"]
    assert rel(torch.tensor(merged["grad_norm"]), torch.tensor(one["grad_norm"])) <= 1e-6
