"""Reference strategies in training: selective_backward (single == two pass == subset), train with references
recomputed every N steps (== a hand-written loop; exact resume), bad options refused before anything runs."""

from __future__ import annotations

import pytest
import torch
from test_loop import make_rows, trainable
from test_selective import assert_close_lists, grads_of, reference_grads, zero
from tiny import assert_same, lora, make_batch, make_packed, snapshot, tiny_model

import fastsel
from fastsel.engine.batch import pack
from fastsel.training.loop import train
from fastsel.utils import eval_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def anchors(seed: int = 20) -> list[dict[str, torch.Tensor]]:
    return [make_batch([6, 8, 5], seed=seed), make_batch([7, 4], seed=seed + 1)]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("strategy", ["gradshield", "harmful_similarity"])
def test_selective_backward_single_two_pass_and_subset(strategy: str, layout: str) -> None:
    """Single pass == two pass == a plain backward of the selected examples, with the selection of `select` on
    the padded batch. Packed: the same sequences padding-free (2 rows, one right-padded), one example per
    sequence: the same dots (scores) per sequence, so the same selection."""
    model = lora(tiny_model("qwen2"), r=4)
    normalize = strategy == "harmful_similarity"
    refs = [fastsel.reference_gradient(b, model, normalize=normalize) for b in anchors()]
    ref = refs if normalize else refs[0]
    lengths = [5, 9, 7, 6, 8, 4, 10, 5]
    padded = make_batch(lengths, side="left")
    batch = make_packed([lengths[:5], lengths[5:]]) if layout == "packed" else padded
    sel1 = fastsel.selective_backward(batch, model, strategy=strategy, ratio=0.25, single_pass=True, reference=ref)
    g1 = grads_of(model)
    zero(model)
    sel2 = fastsel.selective_backward(batch, model, strategy=strategy, ratio=0.25, single_pass=False, reference=ref)
    g2 = grads_of(model)
    zero(model)
    sel3 = fastsel.select(padded, model, strategy=strategy, ratio=0.25, reference=ref)
    assert sel1.indices.tolist() == sel2.indices.tolist() == sel3.indices.tolist()
    assert float((sel1.scores - sel3.scores).abs().max() / sel3.scores.abs().max()) <= 1e-5  # rel to max |score|
    assert sel1.num_selected > 0 and sel1.single_pass is True
    expected = reference_grads(padded, model, sel1.indices.tolist())
    assert_close_lists(g1, expected)
    assert_close_lists(g2, expected)


def hand_written(model: torch.nn.Module, rows: list[dict], *, steps: int, every: int, batch_size: int,
                 lr: float, seed: int) -> dict[str, torch.Tensor]:
    """The loop train runs for gradshield with reference_batches: reference recomputed (eval mode) at steps
    0, every, 2*every, ...; selective_backward with it on the micro-batch packed padding-free (train's default
    where the model can take packed rows: the dots per sequence); AdamW."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    reference = None
    for step in range(steps):
        if step % every == 0:
            with eval_mode(model):
                reference = fastsel.reference_gradient(anchors()[0], model)
        chosen = order[step * batch_size:(step + 1) * batch_size]
        batch = pack([rows[i] for i in chosen], 0)
        fastsel.selective_backward(batch, model, strategy="gradshield", reference=reference)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return trainable(model)


def test_train_with_recomputed_reference_equals_hand_written_loop(tmp_path) -> None:
    rows = make_rows(18, seed=4)
    opts = dict(strategy="gradshield", batch_size=6, lr=5e-2, seed=2, reference_batches=[anchors()[0]],
                reference_every=2, progress=False)
    model = lora(tiny_model())
    result = train(model, rows, max_steps=3, out_dir=str(tmp_path / "run"), **opts)
    assert result.packed
    expected = hand_written(lora(tiny_model()), rows, steps=3, every=2, batch_size=6, lr=5e-2, seed=2)
    for name, value in trainable(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7)
    assert [r["reference_step"] for r in result.history] == [0, 0, 2]
    assert all("score_mean" in r and r["kept"] + len(r["dropped_ids"]) == 6 for r in result.history)


def test_resume_continues_with_the_checkpointed_reference(tmp_path) -> None:
    rows = make_rows(24, seed=4)
    opts = dict(strategy="gradshield", batch_size=6, lr=5e-2, seed=2, reference_batches=[anchors()[0]],
                reference_every=2, progress=False, save_every=1)
    whole = lora(tiny_model())
    train(whole, rows, max_steps=4, out_dir=str(tmp_path / "whole"), **opts)
    model = lora(tiny_model())
    train(model, rows, max_steps=3, out_dir=str(tmp_path / "cut"), **opts)
    assert (tmp_path / "cut" / "checkpoints" / "step-00000003" / "extra.safetensors").exists()
    with pytest.warns(UserWarning, match="max_steps"):
        resumed = train(model, rows, max_steps=4, out_dir=str(tmp_path / "cut"), resume=True, **opts)
    assert resumed.history[-1]["reference_step"] == 2  # not recomputed from the step-3 weights
    for name, value in trainable(whole).items():
        torch.testing.assert_close(trainable(model)[name], value, rtol=1e-6, atol=1e-8)


def test_reference_options_are_refused_before_anything_runs() -> None:
    rows = make_rows(8)
    model = lora(tiny_model())
    before = snapshot(model)
    ref = fastsel.reference_gradient(anchors()[0], model)
    cases = [
        (dict(strategy="gradshield"), ValueError, "needs reference= or reference_batches"),
        (dict(strategy="moderate", reference=ref), ValueError, "used only by the strategies"),
        (dict(strategy="gradshield", reference=ref, reference_batches=[anchors()[0]]), ValueError, "not both"),
        (dict(strategy="gradshield", reference=ref, reference_every=2), ValueError, "reference_batches"),
        (dict(strategy="gradshield", reference_batches=anchors()), ValueError, "takes 1 reference"),
        (dict(strategy="gradshield", reference_batches=[[]]), ValueError, r"reference_batches\[0\]"),
        (dict(strategy="gradshield", reference=ref, gradshield_budget=float("inf")), ValueError, "budget"),
        (dict(strategy="gradshield", reference={k: v for k, v in list(ref.items())[1:]}), KeyError,
         "no gradient for"),
    ]
    for options, exc, match in cases:
        with pytest.raises(exc, match=match):
            train(model, rows, batch_size=4, progress=False, **options)
        assert_same(before, model)
    with pytest.raises(ValueError, match="needs reference="):
        fastsel.selective_backward(make_batch([5, 6]), model, strategy="harmful_similarity")
    assert_same(before, model)
