"""selective_backward: single-pass == two-pass == a separate forward+backward on the selected subset."""

from __future__ import annotations

import pytest
import torch
from needs import need_kernels
from tiny import lora, make_batch, make_packed, tiny_model

import fastsel
from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits

STRATEGIES = ["moderate", "low", "high", "random", "full"]


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def reference_grads(batch, model, rows: list[int]) -> list[torch.Tensor]:
    """Gradient of the mean per-example loss of `rows`, from a forward+backward of those rows alone."""
    sub = {k: v[rows] for k, v in batch.items()}
    prepared = prepare_batch(sub)
    loss = per_example_losses(forward_logits(model, prepared), prepared["labels"]).mean()
    return list(torch.autograd.grad(loss, [p for _, p in trainable(model)]))


def grads_of(model):
    return [p.grad.clone() for _, p in trainable(model)]


def zero(model):
    for _, p in trainable(model):
        p.grad = None


def assert_close_lists(a, b, rtol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_pass_equals_two_pass_and_subset(strategy: str) -> None:
    model = lora(tiny_model("qwen2"), r=4)
    batch = make_batch([5, 9, 7, 6, 8, 4, 10, 5, 6, 7], side="left")
    sel1 = fastsel.selective_backward(batch, model, strategy=strategy, ratio=0.3, single_pass=True, seed=1)
    g1 = grads_of(model)
    zero(model)
    sel2 = fastsel.selective_backward(batch, model, strategy=strategy, ratio=0.3, single_pass=False, seed=1)
    g2 = grads_of(model)
    zero(model)
    assert sel1.indices.tolist() == sel2.indices.tolist()
    expected = reference_grads(batch, model, sel1.indices.tolist())
    assert_close_lists(g1, expected)
    assert_close_lists(g2, expected)
    if strategy in ("moderate", "low", "high"):
        assert sel1.single_pass is True and sel2.single_pass is False


@pytest.mark.parametrize("strategy", ["moderate", "full"])
def test_packed_single_and_two_pass_equal_the_selected_sequences_alone(strategy: str) -> None:
    """A packed batch (2 rows, one right-padded): the same selection as the padded batch of the same sequences,
    and both steps == a plain backward of the selected sequences."""
    model = lora(tiny_model("qwen2"), r=4)
    lengths = [5, 9, 7, 6, 8, 4, 10, 5, 6, 7]
    packed = make_packed([lengths[:6], lengths[6:]])
    padded = make_batch(lengths)  # the same sequences (same generator draws), one per row
    sel1 = fastsel.selective_backward(packed, model, strategy=strategy, ratio=0.3, single_pass=True)
    g1 = grads_of(model)
    zero(model)
    sel2 = fastsel.selective_backward(packed, model, strategy=strategy, ratio=0.3, single_pass=False)
    g2 = grads_of(model)
    zero(model)
    sel3 = fastsel.selective_backward(padded, model, strategy=strategy, ratio=0.3)
    zero(model)
    assert sel1.indices.tolist() == sel2.indices.tolist() == sel3.indices.tolist()
    assert sel1.losses.shape == (10,)
    expected = reference_grads(padded, model, sel1.indices.tolist())
    assert_close_lists(g1, expected)
    assert_close_lists(g2, expected)


def test_gradient_accumulation_adds_scaled_gradients() -> None:
    model = lora(tiny_model(), r=2)
    b1 = make_batch([5, 9, 7, 6, 8], side="right", seed=3)
    b2 = make_batch([6, 4, 10, 7, 5], side="left", seed=4)
    s1 = fastsel.selective_backward(b1, model, ratio=0.4, scale=0.5, single_pass=True)
    s2 = fastsel.selective_backward(b2, model, ratio=0.4, scale=0.5, single_pass=True)
    got = grads_of(model)
    zero(model)
    r1 = reference_grads(b1, model, s1.indices.tolist())
    r2 = reference_grads(b2, model, s2.indices.tolist())
    assert_close_lists(got, [0.5 * (a + b) for a, b in zip(r1, r2, strict=True)])


def test_auto_falls_back_to_two_pass_over_budget() -> None:
    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 9, 7, 6, 8])
    sel = fastsel.selective_backward(batch, model, ratio=0.4, memory_budget_bytes=10)
    assert sel.single_pass is False
    got = grads_of(model)
    zero(model)
    assert_close_lists(got, reference_grads(batch, model, sel.indices.tolist()))
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        fastsel.selective_backward(batch, model, single_pass=True, memory_budget_bytes=10)


def test_selection_matches_select() -> None:
    model = lora(tiny_model())
    batch = make_batch([5, 9, 7, 6, 8, 4, 10, 5, 6, 7])
    sel = fastsel.select(batch, model, ratio=0.2, backend="torch")
    step = fastsel.selective_backward(batch, model, ratio=0.2, backend="torch")
    assert sel.indices.tolist() == step.indices.tolist()


def test_single_pass_with_triton_kernels_writing_per_example_grads() -> None:
    need_kernels()
    model = lora(tiny_model(), r=2, targets=["q_proj", "up_proj"])
    batch = make_batch([5, 9, 7, 6, 8], side="left")
    sel = fastsel.selective_backward(batch, model, ratio=0.4, single_pass=True, backend="triton")
    got = grads_of(model)
    zero(model)
    assert_close_lists(got, reference_grads(batch, model, sel.indices.tolist()))


def test_deferred_sync_single_process_and_the_unreduced_step_guard() -> None:
    """sync=False changes nothing in one process except the bookkeeping: an optimizer step before the window's
    sync=True call raises (the misuse DDP would turn into rank-divergent gradients); zero_grad drops the window."""
    from fastsel.training.selective import UnreducedGradientError, has_deferred_gradients

    model = lora(tiny_model(), r=2)
    batches = [make_batch([5, 9, 7, 6, 8], seed=s) for s in (5, 6, 7)]
    optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=0.1)
    for b in batches:
        fastsel.selective_backward(b, model, ratio=0.4, scale=1 / 3)
    expected = grads_of(model)
    zero(model)
    for i, b in enumerate(batches):
        fastsel.selective_backward(b, model, ratio=0.4, scale=1 / 3, sync=i == len(batches) - 1)
        assert has_deferred_gradients(model) is (i < len(batches) - 1)
        if i == 0:
            before = grads_of(model)
            with pytest.raises(UnreducedGradientError, match="sync=True"):
                optimizer.step()
            assert_close_lists(grads_of(model), before, rtol=0)  # nothing stepped, nothing changed
    assert_close_lists(grads_of(model), expected, rtol=0)
    optimizer.step()  # the window ended with sync=True: allowed
    fastsel.selective_backward(batches[0], model, ratio=0.4, sync=False)
    optimizer.zero_grad(set_to_none=True)  # an abandoned window
    assert not has_deferred_gradients(model)
    optimizer.step()
    with pytest.raises(TypeError, match="sync must be a bool"):
        fastsel.selective_backward(batches[0], model, sync=None)
    fastsel.selective_backward(batches[0], model, ratio=0.4)  # sync=True forgets the stale entries
    assert not fastsel.training.window.armed()  # the optimizer hook is gone once nothing is deferred


def _poison_token(model, batch, example: int) -> None:
    """Make the loss of `example` (only) NaN: its first token's embedding row becomes NaN."""
    token = int(batch["input_ids"][example, 0])
    assert not (batch["input_ids"][[i for i in range(len(batch["input_ids"])) if i != example]] == token).any()
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_loss_is_refused_before_grad_is_written(strategy: str) -> None:
    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 9, 7, 6, 8], seed=11)
    _poison_token(model, batch, 3)
    with pytest.raises(ValueError, match=r"non-finite loss for example\(s\) \[3\]"):
        fastsel.selective_backward(batch, model, strategy=strategy, ratio=0.4, seed=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "1", None, True, torch.tensor(1.0)])
def test_scale_must_be_a_finite_number(scale) -> None:
    model = lora(tiny_model(), r=2)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastsel.selective_backward(make_batch([5, 9]), model, scale=scale)
    assert all(p.grad is None for p in model.parameters())


def test_memory_budget_message_gives_the_real_size() -> None:
    """single_pass=True over budget names the real size of the per-example gradients (not '0 MiB')."""
    import re

    from fastsel.utils import format_bytes

    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 9, 7])
    per_row = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    with pytest.raises(ValueError, match=r"budget 0 B") as info:
        fastsel.selective_backward(batch, model, single_pass=True, memory_budget_bytes=0)
    rows, size = re.search(r"(\d+) of 3 row\(s\) in the loss band: ([\d.]+ \w+) of per-example gradients",
                           str(info.value)).groups()
    assert size == format_bytes(int(rows) * per_row) and size.endswith("KiB")


def _plain_backward(batch, model) -> None:
    prepared = prepare_batch(batch)
    per_example_losses(forward_logits(model, prepared), prepared["labels"]).mean().backward()


@pytest.mark.parametrize("zeroing", ["optimizer", "model"])
def test_zero_grad_without_set_to_none_ends_the_window(zeroing: str) -> None:
    """After selective_backward(sync=False): zeroing the gradients in place drops the deferred share, as setting
    them to None does, so a plain backward + step is allowed and steps exactly the plain gradient."""
    from fastsel.training.selective import has_deferred_gradients

    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 9, 7, 6, 8], seed=5)
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    _plain_backward(batch, model)
    expected = grads_of(model)
    zero(model)
    fastsel.selective_backward(batch, model, ratio=0.4, sync=False)
    assert has_deferred_gradients(model)
    (optimizer if zeroing == "optimizer" else model).zero_grad(set_to_none=False)
    _plain_backward(batch, model)
    assert_close_lists(grads_of(model), expected, rtol=0)
    before = [p.detach().clone() for p in params]
    optimizer.step()  # used to raise UnreducedGradientError
    for p, b, g in zip(params, before, expected, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    assert not has_deferred_gradients(model) and not fastsel.training.window.armed()
    # zeroing in place and stepping at once (no backward in between) is allowed too
    fastsel.selective_backward(batch, model, ratio=0.4, sync=False)
    optimizer.zero_grad(set_to_none=False)
    optimizer.step()
    assert not fastsel.training.window.armed()


@pytest.mark.parametrize("between", ["plain_backward", "clip", "grad_norms", "nothing"])
def test_the_guard_still_refuses_an_unreduced_step(between: str) -> None:
    """What does not discard the deferred share keeps the window open: a plain backward onto it, clipping in place,
    a norm measurement (whose backward sets .grad aside)."""
    from fastsel.training.selective import UnreducedGradientError

    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 9, 7, 6, 8], seed=5)
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    fastsel.selective_backward(batch, model, ratio=0.4, sync=False)
    if between == "plain_backward":
        _plain_backward(batch, model)
    elif between == "clip":
        torch.nn.utils.clip_grad_norm_(params, 1e-3)
    elif between == "grad_norms":
        fastsel.grad_norms(batch, model, backend="torch")
    with pytest.raises(UnreducedGradientError):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    assert not fastsel.training.window.armed()
