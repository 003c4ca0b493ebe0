"""The README's and docs' usage snippets run as written, on a tiny LoRA Llama standing in for the user's model and
data, and the README's TRL block on the embedded SmolLM2 itself.

Each runs verbatim after a prelude that defines the names the page leaves to the reader (`batch`, `dataset`, ...).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from needs import need_embedded_model, need_module
from tiny import lora, make_batch, make_packed, tiny_model

import fastsel

ROOT = Path(__file__).resolve().parents[1]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def block_containing(marker: str) -> str:
    """The one python block containing `marker` on the first page (README.md, then docs/) that has any."""
    for page in PAGES:
        found = [b for b in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M) if marker in b]
        if found:
            assert len(found) == 1, f"expected one python block in {page.name} containing {marker!r}, found {len(found)}"
            return found[0]
    raise AssertionError(f"no python block in README.md or docs/ contains {marker!r}")


@pytest.fixture()
def namespace() -> dict:
    model = lora(tiny_model())
    packed = make_packed([[5, 3], [4, 4]])  # equal row totals: the README block passes no attention_mask
    return {
        "torch": torch, "fastsel": fastsel,
        "model": model,
        "batch": make_batch([6, 4, 5, 7, 3]),
        "optimizer": torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        "ids": packed["input_ids"], "labels": packed["labels"], "pos": packed["position_ids"],
        "rows": [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}],
        "pad_token_id": 0,
        "refusal_batch": make_batch([5, 6], seed=7),
        "R_harm": None,  # set by the snippet's prelude below
    }


def run(code: str, ns: dict) -> dict:
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own code, on purpose
    return ns


def test_use_block(namespace: dict) -> None:
    ns = run(block_containing("fastsel.select(batch, model"), namespace)
    assert ns["norms"].shape == (5,) and ns["sel"].indices.numel() == 1  # floor(0.2 * 5) = 1


def test_packed_block(namespace: dict) -> None:
    ns = run(block_containing("from fastsel.engine.batch import pack"), namespace)
    assert ns["norms"].shape == (4,)  # four sequences in two packed rows
    assert ns["batch"]["input_ids"].shape == (1, 7)  # the two rows, back to back


def test_alignment_block(namespace: dict) -> None:
    namespace["R_harm"] = fastsel.reference_gradient(make_batch([4, 5], seed=9), namespace["model"])
    ns = run(block_containing("fastsel.reference_gradient(refusal_batch, model)"), namespace)
    assert ns["dots"].shape == (5,) and ns["m"].dots.shape == (5, 2) and ns["m"].cosines.shape == (5, 2)
    assert torch.allclose(ns["m"].dots[:, 1], ns["dots"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trl_block_on_the_embedded_model(tmp_path: Path) -> None:
    """The README's TRL quick start, verbatim, on `load_model("smollm2")`: it trains one selective step."""
    datasets = need_module("datasets")
    need_module("trl")
    need_embedded_model()
    rows = [("What is 2 + 3?", "2 + 3 = 5."), ("Name a primary colour.", "Red is a primary colour."),
            ("Say hello in French.", "Bonjour!"), ("What is the capital of Italy?", "The capital of Italy is Rome.")]
    dataset = datasets.Dataset.from_list([
        {"id": f"ex{i}", "prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(rows)])
    ns = run(block_containing("fastsel.hf.make_selective(trl.SFTTrainer)"),
             {"dataset": dataset, "out_dir": str(tmp_path / "out")})
    (record,) = ns["trainer"].fastsel_log
    assert len(record["kept_ids"]) == 1 and sorted(record["kept_ids"] + record["dropped_ids"]) == sorted(dataset["id"])
    assert (tmp_path / "out" / "fastsel_selection.jsonl").is_file()


@pytest.mark.slow
def test_scoring_block_on_the_embedded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/scoring.md's API block, verbatim, on a three-row `my.jsonl` in the working folder."""
    need_module("datasets")
    need_embedded_model()
    import json

    monkeypatch.chdir(tmp_path)
    rows = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "Name a colour.", "answer": "Blue."},
            {"question": "Say hi.", "answer": "Hello there, nice to meet you!"}]
    (tmp_path / "my.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ns = run(block_containing("score_dataset(model, tokenizer, \"my.jsonl\""), {})
    table = ns["table"]
    assert len(table) == 3 and table["id"] == ["0", "1", "2"]
    assert {"grad_norm", "gradshield_score", "harmful_similarity_score", "dot_safety"} <= set(table.column_names)
    assert (tmp_path / "runs" / "score" / "scores.parquet").is_file()
