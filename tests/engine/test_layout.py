"""Layout 'auto': on a CPU a padded batch runs as one packed row (per-sequence attention), with the same
per-example results as the padded pass and the naive oracle."""

from __future__ import annotations

import pytest
import torch
from tiny import lora, make_batch, reused_module_case, tiny_model

import fastsel
from fastsel.engine.batch import packed_examples, prepare_batch
from fastsel.engine.model_io import in_layout

pytestmark = pytest.mark.auto_layout


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_examples_keep_every_example(side: str) -> None:
    padded = prepare_batch(make_batch([6, 9, 4], side=side, prompt=2))
    packed = prepare_batch(packed_examples(padded))
    assert packed["segments"].packed and packed["segments"].lengths == [6, 9, 4]
    mask = padded["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][mask])
    supervised = (padded["labels"][:, 1:] != -100).sum(dim=1)
    assert packed["segments"].sum((packed["labels"] != -100).float()[..., None])[:, 0].tolist() == \
        supervised.float().tolist()


@pytest.mark.parametrize("side", ["left", "right"])
def test_auto_runs_a_padded_batch_packed_with_the_same_results(side: str) -> None:
    model = lora(tiny_model(), r=4)
    model.base_model.model.config._attn_implementation = "sdpa"
    batch = make_batch([6, 9, 4, 7], side=side)
    rows: list[tuple[int, ...]] = []
    hook = model.base_model.model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: rows.append(tuple(a[0].shape)) if torch.is_grad_enabled() else None)
    auto = fastsel.norm_pass(batch, model, backend="torch", keep_grads=True)
    hook.remove()
    assert rows == [(1, 26)]  # one padding-free row of the 26 real tokens
    given = fastsel.norm_pass(batch, model, backend="torch", keep_grads=True, layout="given")
    naive = fastsel.norm_pass(batch, model, backend="naive")
    torch.testing.assert_close(auto.norms, naive.norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(auto.norms, given.norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(auto.losses, given.losses, rtol=1e-5, atol=0)
    for name, g in given.per_example_grads.items():
        torch.testing.assert_close(auto.per_example_grads[name], g, rtol=1e-4, atol=1e-7)


def test_selective_backward_default_equals_the_padded_step() -> None:
    model = lora(tiny_model(), r=4)
    batch = make_batch([6, 9, 4, 7, 5, 8, 3, 6], side="left")
    sel = fastsel.selective_backward(batch, model, ratio=0.25, backend="torch", single_pass=True)
    auto_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    padded = fastsel.norm_pass(batch, model, backend="torch", keep_grads=True, layout="given")
    expected = fastsel.select_indices(padded.losses, padded.norms, ratio=0.25)
    assert sel.indices.tolist() == expected.indices.tolist()
    for name, g in auto_grads.items():
        mean = padded.per_example_grads[name][expected.indices].mean(dim=0)
        torch.testing.assert_close(g, mean, rtol=1e-4, atol=1e-7)


def test_a_model_without_position_ids_stays_padded_and_unknown_layouts_are_refused() -> None:
    model, batch = reused_module_case()
    prepared = prepare_batch(batch)
    assert in_layout(model, prepared) is prepared
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        in_layout(model, prepared, "rows")
