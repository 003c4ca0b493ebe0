"""Layer types (`fastsel.engine.sites`): the registry, and full fine-tuning of a GPT-2 (transformers' Conv1D
weights and biases) with naive-equal norms and dots, padded and packed."""

from __future__ import annotations

import pytest
import torch
from tiny import make_batch, make_packed

import fastsel
from fastsel.engine.sites import role_of, supported_types
from fastsel.engine.targets import find_targets


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer random GPT-2 trained in full on its Conv1D layers (embeddings and layer norms frozen)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
    model.config._attn_implementation = "eager"
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias",
                                        "c_fc.weight", "c_fc.bias")))
    return model


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def test_registry_knows_the_layer_types() -> None:
    assert {"Linear", "Embedding", "Conv1D"} <= set(supported_types())
    model = tiny_gpt2()
    attn = model.transformer.h[0].attn.c_attn
    assert role_of(attn, "weight").role == "weight" and role_of(attn, "bias").role == "bias"
    assert role_of(model.transformer.ln_f, "weight") is None  # a LayerNorm: no site
    with pytest.raises(NotImplementedError, match="supports .*Conv1D"):
        find_targets(model.requires_grad_(True))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gpt2_full_finetuning_norms_and_dots_equal_the_naive_oracle(layout: str) -> None:
    model = tiny_gpt2()
    batch = make_batch([6, 9, 4], side="left") if layout == "padded" else make_packed([[5, 7], [6, 4]])
    targets = find_targets(model)
    assert {t.shape for t in targets} >= {(32, 96), (96,), (32, 128), (128, 32)}  # Conv1D weights are [in, out]
    g = torch.Generator().manual_seed(1)
    refs = [{t.name: torch.randn(t.shape, generator=g) for t in targets} for _ in range(2)]
    got = fastsel.norm_pass(batch, model, backend="torch", reference=refs, layout="given")
    naive = fastsel.norm_pass(batch, model, backend="naive", reference=refs)
    assert rel(got.norms, naive.norms) <= 1e-5
    assert rel(got.dots, naive.dots) <= 1e-5


def test_gpt2_per_example_gradients_are_each_example_alone_in_the_parameter_layout() -> None:
    """keep_grads: each row's Conv1D weight and bias gradients, [in, out] as the parameter, equal one backward of
    that example alone (a transposed factor order would fail here even where the norms agree)."""
    from fastsel.engine.batch import prepare_batch
    from fastsel.engine.losses import per_example_losses
    from fastsel.engine.model_io import forward_logits

    model, batch = tiny_gpt2(), make_batch([6, 9, 4], side="right")
    kept = fastsel.norm_pass(batch, model, backend="torch", keep_grads=True, layout="given")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(3):
        keep = batch["attention_mask"][i].bool()
        single = prepare_batch({k: v[i][keep][None] for k, v in batch.items()})
        loss = per_example_losses(forward_logits(model, single), single["labels"])[0]
        for (name, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            assert kept.per_example_grads[name][i].shape == p.shape
            assert rel(kept.per_example_grads[name][i], g) <= 1e-5, name
