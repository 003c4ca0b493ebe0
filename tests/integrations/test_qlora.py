"""QLoRA: a 4-bit (bitsandbytes nf4) base with LoRA on top - exact norms and exact selective steps on the CPU."""

from __future__ import annotations

import pytest
import torch
from needs import need_module
from tiny import VOCAB, lora, make_batch

import fastsel
from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits
from fastsel.integrations.models import llama_config, load_causal_lm, random_model

need_module("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory) -> torch.nn.Module:
    """A 2-layer random Llama saved and reloaded with an nf4 base (widths: multiples of the 64-value block)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    config = llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=VOCAB,
                          max_position_embeddings=128)
    random_model(config, seed=0).save_pretrained(path)
    base = load_causal_lm(str(path), quantization="nf4")
    base.config._attn_implementation = "eager"
    return lora(base, r=4)


def test_base_is_4bit_and_only_lora_trains(qlora_model) -> None:
    import bitsandbytes as bnb

    layer = qlora_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.dtype == torch.uint8
    assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in qlora_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_qlora_norms_equal_the_naive_loop(qlora_model) -> None:
    batch = make_batch([5, 9, 7, 6, 8, 4], side="left", seed=2)
    fast, per_layer = fastsel.grad_norms(batch, qlora_model, backend="torch", per_layer=True)
    naive, naive_layer = fastsel.grad_norms(batch, qlora_model, backend="naive", per_layer=True)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-7)
    for name, values in naive_layer.items():
        torch.testing.assert_close(per_layer[name], values, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in qlora_model.parameters())


@pytest.mark.parametrize(("strategy", "single_pass"), [("moderate", True), ("moderate", False), ("high", "auto"),
                                                       ("random", "auto"), ("full", "auto")])
def test_qlora_selective_backward_equals_plain_backward_of_the_selected_rows(qlora_model, strategy: str,
                                                                           single_pass: bool | str) -> None:
    batch = make_batch([5, 9, 7, 6, 8, 4, 10, 5], seed=3)
    params = [p for p in qlora_model.parameters() if p.requires_grad]
    selection = fastsel.selective_backward(batch, qlora_model, strategy=strategy, ratio=0.3, seed=1,
                                           single_pass=single_pass, backend="torch")
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    rows = selection.indices.tolist()
    prepared = prepare_batch({k: v[rows] for k, v in batch.items()})
    loss = per_example_losses(forward_logits(qlora_model, prepared), prepared["labels"]).mean()
    expected = torch.autograd.grad(loss, params)
    for g, e in zip(got, expected, strict=True):
        assert float((g - e).norm() / e.norm().clamp_min(1e-30)) <= 1e-5
