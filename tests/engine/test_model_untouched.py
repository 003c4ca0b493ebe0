"""Bad input gets a clear error naming the problem, and the model is exactly as found afterwards."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_same, lora, make_batch, snapshot, tiny_model

import fastsel


@pytest.fixture
def model() -> torch.nn.Module:
    m = lora(tiny_model())
    m.train()
    # a pre-existing .grad (mid gradient accumulation) must survive untouched
    next(p for p in m.parameters() if p.requires_grad).grad = torch.ones_like(
        next(p for p in m.parameters() if p.requires_grad))
    return m


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_success_leaves_model_as_found(model, backend: str) -> None:
    before = snapshot(model)
    fastsel.grad_norms(make_batch([5, 7]), model, backend=backend)
    fastsel.select(make_batch([5, 7, 6, 4, 8]), model, backend=backend)
    assert_same(before, model)


def _bad_batches() -> list[tuple[str, dict, type, str]]:
    good = make_batch([5, 7])
    no_sup = make_batch([5, 7])
    no_sup["labels"][1] = -100
    return [
        ("missing key", {k: v for k, v in good.items() if k != "labels"}, KeyError, "labels"),
        ("shape mismatch", {**good, "attention_mask": good["attention_mask"][:, :-1]}, ValueError, "same shape"),
        ("float ids", {**good, "input_ids": good["input_ids"].float()}, TypeError, "integers"),
        ("not a tensor", {**good, "labels": good["labels"].tolist()}, TypeError, "torch.Tensor"),
        ("no supervised token", no_sup, ValueError, r"example\(s\) \[1\] have no supervised token"),
    ]


@pytest.mark.parametrize("case", _bad_batches(), ids=lambda c: c[0])
def test_bad_batch_errors(model, case) -> None:
    _, batch, exc, msg = case
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        fastsel.grad_norms(batch, model, backend="torch")
    assert_same(before, model)


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"ratio": 0.0}, "ratio must be"),
        ({"ratio": 1.5}, "ratio must be"),
        ({"strategy": "median"}, "unknown strategy"),
        ({"backend": "cuda"}, "unknown backend"),
        ({"loss_band": -1.0}, "loss_band"),
    ],
)
def test_bad_options(model, kwargs, msg) -> None:
    before = snapshot(model)
    with pytest.raises(ValueError, match=msg):
        fastsel.select(make_batch([5, 7]), model, **kwargs)
    assert_same(before, model)


def test_no_trainable_parameters() -> None:
    m = tiny_model()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastsel.grad_norms(make_batch([5]), m)


def test_unsupported_trainable_module_named(model) -> None:
    name = "base_model.model.model.layers.0.input_layernorm.weight"
    dict(model.named_parameters())[name].requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="layers.0.input_layernorm.weight"):
        fastsel.grad_norms(make_batch([5, 7]), model)
    assert_same(before, model)


def test_dora_refused() -> None:
    m = lora(tiny_model(), use_dora=True)
    with pytest.raises(NotImplementedError, match="LoRA variant"):
        fastsel.grad_norms(make_batch([5, 7]), m)


def test_non_finite_loss_names_examples(model) -> None:
    before = snapshot(model)
    lm_head = model.base_model.model.lm_head
    hook = lm_head.register_forward_hook(lambda mod, a, out: out.index_fill(0, torch.tensor([1]), float("nan")))
    try:
        with pytest.raises(ValueError, match=r"non-finite loss for example\(s\) \[1\]"):
            fastsel.grad_norms(make_batch([5, 7, 6]), model, backend="torch")
    finally:
        hook.remove()
    assert_same(before, model)


def test_non_finite_norm_names_examples(model) -> None:
    """An inf output-gradient for example 2 only: the error names it and the model is left untouched."""
    before = snapshot(model)
    target = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"]

    def poison(mod, args, out):
        out.register_hook(lambda g: g.index_fill(0, torch.tensor([2]), float("inf")))

    hook = target.register_forward_hook(poison)
    try:
        with pytest.raises(ValueError, match=r"non-finite gradient norm for example\(s\) \[2\]"):
            fastsel.grad_norms(make_batch([5, 7, 6]), model, backend="torch")
    finally:
        hook.remove()
    # the poison hook itself added nothing lasting; fastsel's hooks are gone
    assert_same(before, model)


def test_exception_mid_backward_removes_hooks(model) -> None:
    before = snapshot(model)
    target = model.base_model.model.model.layers[1].mlp.up_proj.lora_A["default"]

    def boom(mod, args, out):
        def raise_(g):
            raise RuntimeError("boom in backward")

        out.register_hook(raise_)

    hook = target.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            fastsel.grad_norms(make_batch([5, 7]), model, backend="torch")
    finally:
        hook.remove()
    assert_same(before, model)
