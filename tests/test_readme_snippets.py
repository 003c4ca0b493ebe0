"""The README's usage snippets run as written, on a tiny LoRA Llama standing in for the user's model and data.

Only the snippets that need no hub model, GPU or Trainer arguments run here (the Use, packed and gradient-alignment
blocks); each runs verbatim after a prelude that defines the names the README leaves to the reader.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny import lora, make_batch, make_packed, tiny_model

import fastsel

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def block_containing(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}, found {len(found)}"
    return found[0]


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
