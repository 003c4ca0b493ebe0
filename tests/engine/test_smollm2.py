"""Integration: the embedded SmolLM2-135M-Instruct with LoRA r=16, ten real-looking instruction samples."""

from __future__ import annotations

import pytest
import torch
from needs import need_embedded_model

import fastsel

need_embedded_model()


@pytest.fixture(scope="module")
def smollm2():
    from fastsel.integrations.models import add_lora, load_model

    model, tokenizer = load_model()
    model = add_lora(model, r=16)
    with torch.no_grad():  # LoRA B starts at zero; give it values so both factors carry gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model, tokenizer


@pytest.fixture(scope="module")
def samples(smollm2):
    """The ten samples as a padded batch, and their naive one-sample-at-a-time norms (each sample alone, no
    padding: the oracle of the padded and of the packed layout, computed once)."""
    from fastsel.experiments.demo import demo_batch

    model, tokenizer = smollm2
    batch, rows = demo_batch(tokenizer, 10, 128)
    assert len(rows) == 10 and batch["input_ids"].shape[0] == 10
    return batch, fastsel.grad_norms(batch, model, backend="naive")


def test_grad_norms_equal_naive_on_smollm2(smollm2, samples) -> None:
    model, _ = smollm2
    batch, expected = samples
    got = fastsel.grad_norms(batch, model, backend="torch")
    assert float(((got - expected).abs() / expected).max()) <= 1e-4


def test_smollm2_config_is_the_embedded_architecture(smollm2) -> None:
    """The random-weight stand-in (GPU benchmarks without the GGUF file) has exactly the embedded model's shapes."""
    from fastsel.integrations.models import random_model, smollm2_config

    model, _ = smollm2
    embedded = model.get_base_model()
    config = smollm2_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(embedded.config, key), key
    assert abs(config.rms_norm_eps - embedded.config.rms_norm_eps) < 1e-9
    twin = random_model(config, seed=0)
    got = {n: tuple(p.shape) for n, p in twin.named_parameters()}
    expected = {n.replace(".base_layer", ""): tuple(p.shape) for n, p in embedded.named_parameters()
                if "lora_" not in n}
    assert got == expected


def test_packed_grad_norms_equal_naive_on_smollm2(smollm2, samples) -> None:
    """The same ten samples packed padding-free (rows of at most 512 tokens): per-sequence norms == the naive
    one-sample-at-a-time oracle (the samples alone: the same for both layouts), and the packing probe passes for
    SmolLM2 (Llama, sdpa)."""
    from fastsel.engine.batch import pack
    from fastsel.engine.model_io import supports_packing

    model, _ = smollm2
    batch, expected = samples
    keep = batch["attention_mask"].bool()
    features = [{"input_ids": batch["input_ids"][i][keep[i]].tolist(), "labels": batch["labels"][i][keep[i]].tolist()}
                for i in range(10)]
    packed = pack(features, 0, max_tokens=512)
    assert packed["input_ids"].shape[0] >= 2 and packed["input_ids"].numel() < batch["input_ids"].numel()
    assert supports_packing(model, packed["input_ids"])
    got = fastsel.grad_norms(packed, model, backend="torch")
    assert got.shape == (10,)
    assert float(((got - expected).abs() / expected).max()) <= 1e-4


def test_grad_dots_with_a_refusal_reference_equal_naive_on_smollm2(smollm2) -> None:
    """Acceptance: SmolLM2 + LoRA, R = the gradient of the refusal anchors' mean loss (the shipped refusal data
    with the chat template): the one-pass dots equal the naive per-example loop's (<= 1e-4 of max |dot|)."""
    from fastsel.experiments.data import refusal_anchor_batch
    from fastsel.experiments.demo import demo_batch
    from fastsel.utils import eval_mode

    model, tokenizer = smollm2
    batch, _ = demo_batch(tokenizer, 4, 64)
    with eval_mode(model):
        reference = fastsel.reference_gradient(refusal_anchor_batch(tokenizer, 4, max_length=64), model)
        got = fastsel.grad_dots(batch, model, reference, backend="torch")
        expected = fastsel.grad_dots(batch, model, reference, backend="naive")
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4
    assert bool((expected != 0).all())
