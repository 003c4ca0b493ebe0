"""fastsel.training.loop: the loop for every strategy, its log, its update against a hand-written loop, bad input."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from needs import need_module
from tiny import VOCAB, lora, tiny_model
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fastsel
from fastsel.engine.batch import collate, pack, prepare_batch, take_examples
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits
from fastsel.training.loop import TrainConfig, _checkpointing_on, train
from fastsel.training.regularizers import ewc_penalty, kl_to_reference_loss

STRATEGIES = ["moderate", "low", "high", "random", "full"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_rows(n: int, seed: int = 0, with_ids: bool = True) -> list[dict]:
    """Rows of random length 4..11; the first two tokens are an unsupervised prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        row = {"input_ids": ids, "labels": [-100, -100] + ids[2:]}
        if with_ids:
            row["id"] = f"ex{i}"
        rows.append(row)
    return rows


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def epoch_order(n: int, seed: int, epochs: int) -> list[int]:
    """The row order train uses: one randperm per epoch from a generator seeded once."""
    g = torch.Generator().manual_seed(seed)
    return [i for _ in range(epochs) for i in torch.randperm(n, generator=g).tolist()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loop_logs_ids_and_saves(strategy: str, tmp_path) -> None:
    rows = make_rows(24)
    model = lora(tiny_model())
    before = trainable(model)
    result = train(model, rows, strategy=strategy, batch_size=8, ratio=0.25, lr=1e-2, out_dir=str(tmp_path),
                   progress=False, seed=3)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == result.history and [r["step"] for r in lines] == [1, 2, 3]
    order = epoch_order(24, seed=3, epochs=1)
    for record in lines:
        step = record["step"]
        candidates = {rows[i]["id"] for i in order[(step - 1) * 8:step * 8]}
        kept, dropped = record["kept_ids"], record["dropped_ids"]
        assert set(kept) | set(dropped) == candidates and not set(kept) & set(dropped)
        assert record["batch_size"] == 8 and record["kept"] == len(kept)
        assert record["kept"] <= record["candidates"] <= 8  # the loss band's rows (strategy 'full': all)
        assert record["kept_fraction"] == len(kept) / 8
        if strategy == "full":
            assert len(kept) == 8
        else:
            assert 1 <= len(kept) <= 2  # k = floor(0.25 * 8); fewer if the loss band holds fewer candidates
        if strategy in ("moderate", "low", "high"):
            assert record["norm_min"] <= record["norm_median"] <= record["norm_max"]
        else:
            assert record["norm_median"] is None
        assert record["lr"] == pytest.approx(1e-2) and record["epoch"] == 0 and not record["skipped"]
        expected = "single pass: " if strategy in ("moderate", "low", "high") else "one pass over the kept rows"
        assert [r[:len(expected)] for r in record["pass_reasons"]] == [expected]  # which step ran, and why
    after = trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    assert result.checkpoint_path == tmp_path / "checkpoints" / "step-00000003"
    assert (result.checkpoint_path / "manifest.json").is_file()


def manual_reference(model, rows, *, strategy, batch_size, ratio, grad_accum, steps, lr, seed,
                     kl_coef=0.0, ewc=None, packing=False):
    """What train should do, written out plainly: same order, same selection seeds, AdamW, constant lr; each
    micro-batch packed into one padding-free row (`packing`) or right-padded."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = epoch_order(len(rows), seed, epochs=steps * grad_accum * batch_size // len(rows) + 1)
    kept_ids = []
    for step in range(steps):
        for m in range(grad_accum):
            micro = step * grad_accum + m
            chosen = order[micro * batch_size:(micro + 1) * batch_size]
            features = [rows[i] for i in chosen]
            batch = pack(features, 0) if packing else collate(features, 0)
            seed_m = (seed * 1_000_003 + micro) % 2**62
            if kl_coef or ewc:
                sel = fastsel.select(batch, model, ratio=ratio, strategy=strategy, seed=seed_m) \
                    if strategy != "full" else None
                keep = sel.indices if sel is not None else torch.arange(len(chosen))
                sub = prepare_batch(take_examples(prepare_batch(batch), keep))
                logits = forward_logits(model, sub)
                loss = per_example_losses(logits, sub["labels"], sub["segments"]).mean()
                loss = loss + kl_coef * kl_to_reference_loss(model, sub, logits=logits)
                if ewc:
                    loss = loss + ewc[0] * ewc_penalty(model, ewc[1], ewc[2])
                (loss / grad_accum).backward()
            else:
                sel = fastsel.selective_backward(batch, model, ratio=ratio, strategy=strategy, seed=seed_m,
                                                 scale=1 / grad_accum)
                keep = sel.indices
            kept_ids.append(sorted(rows[chosen[i]]["id"] for i in keep.tolist()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return trainable(model), kept_ids


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("strategy", ["moderate", "random"])
def test_update_equals_hand_written_loop(strategy: str, packing: bool) -> None:
    rows = make_rows(20, seed=5)
    opts = dict(strategy=strategy, batch_size=5, ratio=0.4, grad_accum=2, lr=5e-3, seed=11, packing=packing)
    model = lora(tiny_model("qwen2"))
    result = train(model, rows, max_steps=2, progress=False, **opts)
    assert result.packed is packing
    expected, kept = manual_reference(lora(tiny_model("qwen2")), rows, steps=2, **opts)
    got = trainable(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    per_step = [sorted(kept[0] + kept[1]), sorted(kept[2] + kept[3])]  # two micro-batches per step
    assert [sorted(r["kept_ids"]) for r in result.history] == per_step


def test_regularized_update_equals_hand_written_loop() -> None:
    rows = make_rows(12, seed=6)
    model = lora(tiny_model())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    fisher = {n: torch.rand(shapes[n], generator=g) for n in names[:4]}
    anchor = {n: torch.randn(shapes[n], generator=g) * 0.1 for n in names[:4]}
    opts = dict(batch_size=6, ratio=0.5, grad_accum=1, lr=5e-3, seed=2)
    for strategy in ("moderate", "full"):
        model = lora(tiny_model())
        train(model, rows, max_steps=2, progress=False, strategy=strategy, kl_coef=0.7, ewc_coef=3.0,
              ewc_fisher=fisher, ewc_anchor=anchor, **opts)
        expected, _ = manual_reference(lora(tiny_model()), rows, steps=2, strategy=strategy, kl_coef=0.7,
                                       ewc=(3.0, fisher, anchor), packing=True, **opts)  # packing: the default
        got = trainable(model)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_clipping_caps_the_update_norm() -> None:
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        result = train(lora(tiny_model()), make_rows(16), batch_size=8, ratio=0.5, max_grad_norm=1e-3,
                       progress=False)
    finally:
        handle.remove()
    assert len(seen) == 2
    assert all(r["grad_norm"] > 1e-3 for r in result.history)  # the pre-clipping norm is logged
    assert all(n <= 1e-3 * (1 + 1e-5) for n in seen)


def test_step_with_nothing_kept_is_logged_and_skipped(tmp_path) -> None:
    model = lora(tiny_model())
    before = trainable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(model, make_rows(16), batch_size=8, ratio=0.25, loss_band=0.0, out_dir=tmp_path,
                       progress=False)
    assert [r["skipped"] for r in result.history] == [True, True]
    assert all(r["kept"] == 0 and len(r["dropped_ids"]) == 8 for r in result.history)
    assert result.final_loss is None
    after = trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_epochs_scheduler_accumulation_and_datasets_input(tmp_path) -> None:
    datasets = need_module("datasets")
    rows = make_rows(10, with_ids=False)
    ds = datasets.Dataset.from_list(rows)
    cfg = TrainConfig(batch_size=4, ratio=0.5, epochs=3, grad_accum=2, lr=1e-3, lr_scheduler="linear",
                      warmup_steps=1, progress=False)
    result = train(lora(tiny_model()), ds, config=cfg, out_dir=str(tmp_path))
    # micro-batches of 4, 4, 2 rows per epoch, 9 in all, 2 per step: 5 steps, the last with one micro-batch
    assert result.steps == 5
    assert [r["batch_size"] for r in result.history] == [8, 6, 6, 8, 2]
    assert [r["epoch"] for r in result.history] == [0, 1, 1, 2, 2]
    assert [(r["step"], r["total_steps"]) for r in result.history] == [(s, 5) for s in range(1, 6)]
    assert result.history[0]["lr"] == 0.0 and result.history[1]["lr"] == pytest.approx(1e-3)
    assert result.history[2]["lr"] > result.history[3]["lr"] > result.history[4]["lr"] > 0
    ids = [i for r in result.history for i in r["kept_ids"] + r["dropped_ids"]]
    assert sorted(ids) == sorted(list(range(10)) * 3)  # default id: the row index


def test_gradient_checkpointing_gives_the_same_update() -> None:
    rows = make_rows(8)
    opts = dict(batch_size=8, ratio=0.5, max_steps=2, lr=1e-2, progress=False)
    plain, checkpointed = lora(tiny_model()), lora(tiny_model())
    train(plain, rows, **opts)
    during = []
    train(checkpointed, rows, gradient_checkpointing=True,
          on_step=lambda record: during.append(_checkpointing_on(checkpointed)), **opts)
    assert during == [True, True] and not _checkpointing_on(checkpointed)  # on while training, then restored
    a, b = trainable(plain), trainable(checkpointed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_bf16_on_cpu_warns_and_trains_in_fp32() -> None:
    with pytest.warns(UserWarning, match="bf16"):
        result = train(lora(tiny_model()), make_rows(8), batch_size=8, ratio=0.5, bf16=True, progress=False)
    assert result.steps == 1


def _row(ids, labels, **extra):
    return {"input_ids": ids, "labels": labels, **extra}


GOOD = [_row([1, 2, 3, 4], [-100, -100, 3, 4]) for _ in range(7)]
BAD_DATA = [
    ([], ValueError, "empty"),
    (GOOD[:3] + [_row([1, 2, 3], [-100, -100, -100], id="q7")], ValueError,
     r"row 3 \(id 'q7'\) has no supervised"),
    (GOOD[:3] + [_row([5, 6, 7], [5, -100, -100])], ValueError, "row 3 has no supervised"),
    (GOOD[:2] + [_row("hello", [1])], TypeError, "row 2: input_ids must be a list of ints"),
    (GOOD[:2] + [_row([1.0, 2.0], [1, 2])], TypeError, "input_ids must be a list of ints, got list of float"),
    (GOOD[:2] + [_row([1, 2, 3], [1, 2])], ValueError, "labels has length 2 but input_ids has 3"),
    (GOOD[:2] + [_row([1, 2, VOCAB], [-100, 2, 3])], ValueError, "outside the vocabulary"),
    (GOOD[:2] + [{"input_ids": [1, 2, 3]}], ValueError, "no 'labels' field"),
    ({"input_ids": [1, 2]}, TypeError, "sequence of rows"),
]


@pytest.mark.parametrize(("data", "error", "match"), BAD_DATA)
def test_bad_dataset_is_refused_before_training(data, error, match) -> None:
    model = lora(tiny_model())
    before = trainable(model)
    with pytest.raises(error, match=match):
        train(model, data, batch_size=5, progress=False)
    after = trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


BAD_OPTIONS = [
    (dict(batch_size=4, ratio=0.2), "batch_size >= 5"),
    (dict(strategy="median"), "unknown strategy"),
    (dict(lr=0.0), "lr must be"),
    (dict(lr=-1e-3), "lr must be"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(epochs=1.5), "epochs must be"),
    (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(lr_scheduler="sawtooth"), "unknown lr_scheduler"),
    (dict(save_every=2), "needs out_dir"),
    (dict(ewc_coef=1.0), "ewc_fisher"),
    (dict(single_pass="yes"), "single_pass"),
    (dict(backend="cuda"), "unknown backend"),
]


@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS)
def test_bad_options_are_refused(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        train(lora(tiny_model()), GOOD, progress=False, **{"batch_size": 5, **options})


def test_other_refusals(tmp_path) -> None:
    with pytest.raises(TypeError, match="unknown train option"):
        train(lora(tiny_model()), GOOD, batchsize=4)
    with pytest.raises(ValueError, match="needs a PEFT model"):
        train(tiny_model(), GOOD, batch_size=5, kl_coef=0.1)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(lora(tiny_model()), GOOD, batch_size=5, resume=True)
    train(lora(tiny_model()), GOOD, batch_size=5, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(lora(tiny_model()), GOOD, batch_size=5, out_dir=str(tmp_path), progress=False)
    frozen = tiny_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, GOOD, batch_size=5)


def test_full_model_without_peft_trains_and_checkpoints(tmp_path) -> None:
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1.mlp" in name)
    result = train(model, GOOD, batch_size=7, ratio=0.3, out_dir=str(tmp_path), progress=False)
    assert result.adapter_path is None and (result.checkpoint_path / "trainable.safetensors").is_file()


@pytest.mark.parametrize("strategy,extra", [("full", {}), ("random", {}), ("moderate", {}), ("full", {"kl_coef": 0.1})])
def test_non_finite_loss_stops_training_with_the_examples_named(strategy: str, extra: dict) -> None:
    """A NaN loss used to train silently into NaN weights with 'full'/'random': every strategy refuses it."""
    model = lora(tiny_model())
    rows = make_rows(8)
    token = rows[5]["input_ids"][3]
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    before = trainable(model)
    with pytest.raises(ValueError, match=r"non-finite loss for example\(s\) \[\d"):
        train(model, rows, strategy=strategy, batch_size=8, ratio=0.5, progress=False, **extra)
    after = trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(("kwargs", "match"), [({"strategy": "moderat"}, "strategy"), ({"ratio": 0}, "ratio"),
                                               ({"batch_size": 0}, "batch_size")])
def test_train_config_is_checked_at_construction(kwargs: dict, match: str) -> None:
    """As SelectionConfig: a bad option fails where it is written, not later inside train()."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
