"""fastsel.integrations.hf: selection inside transformers.Trainer (and TRL SFTTrainer) equals fastsel's own primitives."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from datasets import Dataset
from tiny import VOCAB, lora, make_batch, tiny_model
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

import fastsel
from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits
from fastsel.experiments.data import collate
from fastsel.integrations.hf import (
    PackedBatchError,
    SelectionConfig,
    SelectiveTrainer,
    make_selective,
    to_fastsel_batch,
)

KEYS = ("input_ids", "attention_mask", "labels")
LR = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")


def token_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` examples of 5-12 random tokens with an id; the first two tokens are the unsupervised prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 13, (1,), generator=g))
        tokens = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        rows.append({"id": f"ex{i}", "input_ids": tokens, "labels": [-100, -100] + tokens[2:], "source": "toy"})
    return rows


def pad_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate(features, 0)
    return {k: batch[k] for k in KEYS}


def new_model() -> torch.nn.Module:
    return lora(tiny_model("llama", seed=0), r=4)


def training_args(tmp_path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                                  learning_rate=LR, logging_steps=1, report_to="none", save_strategy="no",
                                  use_cpu=True, disable_tqdm=True, optim="adamw_torch", seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class GradCapture(TrainerCallback):
    """The trainable gradients right before each optimizer step (after the Trainer's clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def batch_of(rows: list[dict[str, Any]], ids: list[str]) -> dict[str, torch.Tensor]:
    by_id = {r["id"]: r for r in rows}
    return pad_collator([by_id[i] for i in ids])


# --------------------------------------------------------------------------------------------------------------


def test_trainer_trains_and_logs_ids(tmp_path) -> None:
    rows = token_rows(24)
    model = new_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    trainer = SelectiveTrainer(model=model, args=training_args(tmp_path, max_steps=3),
                               train_dataset=Dataset.from_list(rows), data_collator=pad_collator,
                               fastsel_config=SelectionConfig(ratio=0.25))
    trainer.train()

    log = trainer.fastsel_log
    assert [(e["step"], e["micro_step"]) for e in log] == [(1, 0), (2, 0), (3, 0)]  # numbered as log_history
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [e["step"] for e in log]
    all_ids = {r["id"] for r in rows}
    for e in log:
        assert e["batch_size"] == 8 and e["k"] == 2 and len(e["kept_ids"]) == 2 and not e["packed"]
        assert set(e["ids"]) <= all_ids
        assert e["kept_ids"] == [e["ids"][i] for i in e["kept_positions"]]
        assert sorted(e["kept_ids"] + e["dropped_ids"]) == sorted(e["ids"])
    lines = (tmp_path / "fastsel_selection.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(log))
    # the logged training loss is the kept examples' mean loss
    assert trainer.state.log_history[0]["loss"] == pytest.approx(log[0]["loss_kept"], rel=1e-4)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, start[n]) for n, p in trainable(model).items())


def test_fastsel_hf_is_reachable_after_import_fastsel() -> None:
    """`fastsel.hf.make_selective(...)` after a bare `import fastsel` (a fresh interpreter)."""
    import subprocess
    import sys

    code = "import fastsel; print(fastsel.hf.make_selective.__name__, fastsel.hf.SelectionConfig().ratio)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["make_selective", "0.2"]


def test_a_missing_id_column_is_named_and_no_id_column_is_said_once(tmp_path, caplog) -> None:
    rows = token_rows(8)
    with pytest.raises(ValueError, match=r"no column 'uid' \(its columns: id, input_ids, labels, source\)"):
        SelectiveTrainer(model=new_model(), args=training_args(tmp_path), train_dataset=Dataset.from_list(rows),
                         data_collator=pad_collator, fastsel_config=SelectionConfig(id_column="uid"))
    import logging

    with caplog.at_level(logging.WARNING, logger="fastsel.integrations.hf"):
        trainer = SelectiveTrainer(model=new_model(), args=training_args(tmp_path, max_steps=2),
                                   train_dataset=Dataset.from_list(rows), data_collator=pad_collator,
                                   fastsel_config=SelectionConfig(id_column=None, ratio=0.5))
        trainer.train()
    said = [r for r in caplog.records if "id_column=None" in r.getMessage()]
    assert len(said) == 1 and "positions, not example ids" in said[0].getMessage()
    assert all(e["ids"] is None for e in trainer.fastsel_log)


def test_resume_keeps_each_step_once_and_logs_the_loss_of_all_candidates(tmp_path) -> None:
    """Resumed from checkpoint-2 of a 4-step run: the selection log holds steps 1-4 once each (cut back to the
    checkpoint's step, as `train`'s log is), numbered as log_history; `loss` is the kept examples' mean and
    `loss_all` the mean over every example."""
    rows = token_rows(32)
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, seed=3)
    first = SelectiveTrainer(model=new_model(), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=pad_collator, fastsel_config=SelectionConfig(ratio=0.25))
    first.train()
    path = tmp_path / "fastsel_selection.jsonl"
    straight = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["step"] for e in straight] == [1, 2, 3, 4]
    history = [h for h in first.state.log_history if "loss" in h]
    for h, e in zip(history, straight, strict=True):
        assert h["loss"] == pytest.approx(e["loss_kept"], rel=1e-4)
        assert h["loss_all"] == pytest.approx(e["loss_all"], abs=1e-4)
    resumed = SelectiveTrainer(model=new_model(), args=args, train_dataset=Dataset.from_list(rows),
                               data_collator=pad_collator, fastsel_config=SelectionConfig(ratio=0.25))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["step"] for e in again] == [1, 2, 3, 4]
    assert again[:2] == straight[:2] and [e["ids"] for e in again[2:]] == [e["ids"] for e in straight[2:]]


@pytest.mark.parametrize("single_pass, checkpointing", [("auto", False), (False, True)])
def test_trainer_step_equals_select_and_manual_step(tmp_path, single_pass, checkpointing) -> None:
    """Same batch: the Trainer keeps the ids `fastsel.select` picks, and its update equals selective_backward +
    the Trainer's clipping (max_grad_norm=1) + AdamW by hand (also with the Trainer's gradient checkpointing)."""
    rows = token_rows(16, seed=1)
    model, ref = new_model(), new_model()
    capture = GradCapture()
    config = SelectionConfig(ratio=0.25, strategy="moderate", loss_band=1.0, single_pass=single_pass)
    args = training_args(tmp_path, gradient_checkpointing=checkpointing)
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               data_collator=pad_collator, fastsel_config=config, callbacks=[capture])
    trainer.train()
    entry = trainer.fastsel_log[0]
    batch = batch_of(rows, entry["ids"])

    sel = fastsel.select(batch, ref, ratio=0.25, strategy="moderate", loss_band=1.0)
    assert sel.indices.tolist() == entry["kept_positions"]
    assert [entry["ids"][i] for i in sel.indices.tolist()] == entry["kept_ids"]
    assert entry["single_pass"] is (single_pass == "auto")

    params = trainable(ref)
    optimizer = torch.optim.AdamW(params.values(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step = fastsel.selective_backward(batch, ref, ratio=0.25, strategy="moderate", loss_band=1.0,
                                      single_pass=single_pass)
    assert step.indices.tolist() == entry["kept_positions"]
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    for name, p in params.items():
        assert rel(capture.grads[0][name], p.grad) <= 1e-5, name
    start = {n: p.detach().clone() for n, p in params.items()}
    optimizer.step()
    got = trainable(model)
    for name, p in params.items():
        assert rel(got[name].detach() - start[name], p.detach() - start[name]) <= 1e-5, name


def test_gradshield_with_recomputed_reference(tmp_path) -> None:
    """strategy='gradshield', reference_batches + reference_every=1: each step keeps what `fastsel.select` keeps
    with the reference of that step's weights (eval mode), and its update is that selection's."""
    from fastsel.utils import eval_mode

    rows = token_rows(16, seed=2)
    anchors = make_batch([6, 8, 5], seed=30)
    model, ref = new_model(), new_model()
    capture = GradCapture()
    config = SelectionConfig(strategy="gradshield", reference_batches=[anchors], reference_every=1,
                             log_measurements=True)
    trainer = SelectiveTrainer(model=model, args=training_args(tmp_path, max_steps=2, max_grad_norm=0.0),
                               train_dataset=Dataset.from_list(rows), data_collator=pad_collator,
                               fastsel_config=config, callbacks=[capture])
    trainer.train()
    log = trainer.fastsel_log
    assert [e["reference_step"] for e in log] == [0, 1]
    batch = batch_of(rows, log[0]["ids"])
    with eval_mode(ref):
        reference = fastsel.reference_gradient(anchors, ref)
    sel = fastsel.select(batch, ref, strategy="gradshield", reference=reference)
    assert sel.indices.tolist() == log[0]["kept_positions"] and sel.num_selected > 0
    assert log[0]["scores"] == pytest.approx(sel.scores.tolist(), rel=1e-4, abs=1e-9)
    fastsel.selective_backward(batch, ref, strategy="gradshield", reference=reference)
    for name, p in trainable(ref).items():
        assert rel(capture.grads[0][name], p.grad) <= 1e-5, name


def test_gradient_accumulation_two_micro_batches(tmp_path, monkeypatch) -> None:
    """GA=2: the accumulated gradient is 1/2 (grad of kept-mean loss, micro-batch 1 + micro-batch 2); the
    Trainer's num_items_in_batch (a token count over all candidates) plays no part. Only the window's last
    micro-batch passes sync=True (under DDP the one gradient all-reduce of the step)."""
    import fastsel.integrations.hf

    syncs: list[bool] = []

    def spy(*args: Any, sync: bool = True, **kwargs: Any) -> fastsel.Selection:
        syncs.append(sync)
        return fastsel.selective_backward(*args, sync=sync, **kwargs)

    monkeypatch.setattr(fastsel.integrations.hf, "selective_backward", spy)
    rows = token_rows(16, seed=2)
    model, ref = new_model(), new_model()
    capture = GradCapture()
    trainer = SelectiveTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=4,
                                                               gradient_accumulation_steps=2, max_grad_norm=0.0),
                               train_dataset=Dataset.from_list(rows), data_collator=pad_collator,
                               fastsel_config=SelectionConfig(ratio=0.5), callbacks=[capture])
    trainer.train()
    log = trainer.fastsel_log
    assert [(e["step"], e["micro_step"]) for e in log] == [(1, 0), (1, 1)]  # the optimizer step they belong to, from 1
    assert syncs == [False, True]

    params = trainable(ref)
    total = 0.0
    for e in log:  # independent reference: autograd of the kept rows' mean loss, scaled by 1/2
        prepared = prepare_batch(batch_of(rows, [e["ids"][i] for i in e["kept_positions"]]))
        total = total + 0.5 * per_example_losses(forward_logits(ref, prepared), prepared["labels"]).mean()
    expected = torch.autograd.grad(total, list(params.values()))
    for (name, _), g in zip(params.items(), expected, strict=True):
        assert rel(capture.grads[0][name], g) <= 1e-5, name
    # fastsel's primitive with scale=1/2 per micro-batch gives the same
    for e in log:
        fastsel.selective_backward(batch_of(rows, e["ids"]), ref, ratio=0.5, scale=0.5)
    for name, p in params.items():
        assert rel(capture.grads[0][name], p.grad) <= 1e-5, name
    assert trainer.state.log_history[0]["loss"] == pytest.approx((log[0]["loss_kept"] + log[1]["loss_kept"]) / 2,
                                                                 rel=1e-4)


def test_random_strategy_seed_per_micro_step(tmp_path) -> None:
    """strategy='random' with a seed: micro-step t of the run draws with seed + t (a resumed run draws alike)."""
    trainer = SelectiveTrainer(model=new_model(), args=training_args(tmp_path, per_device_train_batch_size=4,
                                                                     gradient_accumulation_steps=2, max_steps=2),
                               train_dataset=Dataset.from_list(token_rows(16, seed=5)), data_collator=pad_collator,
                               fastsel_config=SelectionConfig(ratio=0.5, strategy="random", seed=7, loss_band=None,
                                                              log_measurements=True))
    trainer.train()
    assert len(trainer.fastsel_log) == 4
    for t, e in enumerate(trainer.fastsel_log):
        assert (e["step"] - 1, e["micro_step"]) == divmod(t, 2)  # steps numbered from 1, as log_history
        losses = torch.tensor(e["losses"])
        expected = fastsel.select_indices(losses, torch.zeros_like(losses), ratio=0.5, strategy="random",
                                          loss_band=None, seed=7 + t)
        assert expected.indices.tolist() == e["kept_positions"]
        assert len(e["grad_norms"]) == len(e["in_loss_band"]) == 4


def test_packed_batches_train_like_padded_ones(tmp_path) -> None:
    """DataCollatorWithFlattening (one row, position_ids restarting): each sequence is one example, with the
    same selection, ids and update as the padded batch."""
    rows = token_rows(16, seed=3)
    results = []
    for name, collator in (("padded", pad_collator), ("packed", DataCollatorWithFlattening())):
        model = new_model()
        trainer = SelectiveTrainer(model=model, args=training_args(tmp_path / name, max_steps=2),
                                   train_dataset=Dataset.from_list(rows), data_collator=collator,
                                   fastsel_config=SelectionConfig(ratio=0.25))
        trainer.train()
        results.append((trainer.fastsel_log, trainable(model)))
    (padded_log, padded), (packed_log, packed) = results
    assert [e["packed"] for e in packed_log] == [True, True]
    assert [e["kept_ids"] for e in packed_log] == [e["kept_ids"] for e in padded_log]
    assert [e["ids"] for e in packed_log] == [e["ids"] for e in padded_log]
    for name, p in padded.items():
        assert rel(packed[name].detach(), p.detach()) <= 1e-5, name


# -------------------------------------------------------------------------------------------------------------- batches


def test_missing_attention_mask_means_all_ones() -> None:
    batch = make_batch([6, 6, 6, 6])
    no_mask = {k: batch[k] for k in ("input_ids", "labels")}
    converted, ids, info = to_fastsel_batch(no_mask, ["a", "b", "c", "d"])
    assert torch.equal(converted["attention_mask"], torch.ones_like(batch["input_ids"]))
    assert ids == ["a", "b", "c", "d"] and not info["packed"]
    model = new_model()
    a = fastsel.selective_backward(converted, model, ratio=0.5)
    ga = [p.grad.clone() for p in trainable(model).values()]
    model.zero_grad()
    b = fastsel.selective_backward(batch, model, ratio=0.5)
    assert a.indices.tolist() == b.indices.tolist()
    for x, p in zip(ga, trainable(model).values(), strict=True):
        torch.testing.assert_close(x, p.grad)


def _packed_row(lengths: list[int], pad: int = 0) -> dict[str, torch.Tensor]:
    """One TRL-style padding-free row: sequences back to back, position_ids restarting, `pad` padding tokens
    (position 0, label -100) at the end."""
    batch = make_batch(lengths)
    ids, labels, pos = [], [], []
    for i, n in enumerate(lengths):
        ids.append(batch["input_ids"][i, :n])
        labels.append(batch["labels"][i, :n])
        pos.append(torch.arange(n))
    ids.append(torch.zeros(pad, dtype=torch.long))
    labels.append(torch.full((pad,), -100))
    pos.append(torch.zeros(pad, dtype=torch.long))
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None], "position_ids": torch.cat(pos)[None]}


def test_packed_row_conversions() -> None:
    """Packed rows stay packed (no re-padding); TRL's padding sequences (position 0, no label) are taken out;
    boundaries from cu_seq_lens_q or seq_idx alone give the same batch; norms equal the padded batch's."""
    lengths = [5, 7, 4]
    row = _packed_row(lengths, pad=3)
    converted, ids, info = to_fastsel_batch(row, ["a", "b", "c"])
    assert info["packed"] and info["unsupervised_segments"] == 3 and ids == ["a", "b", "c"]
    assert sorted(converted) == ["input_ids", "labels", "position_ids"]
    for key in converted:
        assert torch.equal(converted[key], row[key][:, :16]), key
    flat = {k: v[:, :16] for k, v in row.items() if k != "position_ids"}
    cu = to_fastsel_batch({**flat, "cu_seq_lens_q": torch.tensor([0, 5, 12, 16], dtype=torch.int32)})[0]
    seq = to_fastsel_batch({**flat, "seq_idx": torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])})[0]
    for key in converted:
        assert torch.equal(cu[key], converted[key]) and torch.equal(seq[key], converted[key]), key
    model = new_model()
    assert rel(fastsel.grad_norms(converted, model), fastsel.grad_norms(make_batch(lengths), model)) <= 1e-5
    # a sequence without a supervised token inside the row: taken out, its id dropped
    middle = {k: v.clone() for k, v in row.items()}
    middle["labels"][0, 5:12] = -100
    converted, ids, info = to_fastsel_batch(middle, ["a", "b", "c"])
    assert ids == ["a", "c"] and info["unsupervised_segments"] == 4 and converted["input_ids"].shape == (1, 9)
    assert torch.equal(converted["input_ids"][0], torch.cat([row["input_ids"][0, :5], row["input_ids"][0, 12:16]]))
    # ids that do not match the sequences (rows packed before collation) are dropped with a note
    _, ids, info = to_fastsel_batch(row, ["only-one"])
    assert ids is None and "ids" in info["note"]


def test_packed_batch_errors() -> None:
    row = _packed_row([5, 7])
    with pytest.raises(PackedBatchError, match="start at 2"):
        to_fastsel_batch({**row, "position_ids": row["position_ids"] + 2})
    two_rows = {k: v.repeat(2, 1) for k, v in row.items() if k != "position_ids"}
    with pytest.raises(PackedBatchError, match="cover"):
        to_fastsel_batch({**two_rows, "cu_seq_lens_q": torch.tensor([0, 5, 12])})
    with pytest.raises(PackedBatchError, match="disagree"):
        to_fastsel_batch({**row, "cu_seq_lens_q": torch.tensor([0, 6, 12])})
    with pytest.raises(ValueError, match="no sequence has a supervised token"):
        to_fastsel_batch({**row, "labels": torch.full_like(row["labels"], -100)})


def test_unsupported_batches_are_refused() -> None:
    batch = make_batch([5, 6])
    with pytest.raises(KeyError, match="DataCollatorForLanguageModeling"):
        to_fastsel_batch({k: batch[k] for k in ("input_ids", "attention_mask")})
    with pytest.raises(NotImplementedError, match="pixel_values"):
        to_fastsel_batch({**batch, "pixel_values": torch.zeros(2, 3, 4, 4)})
    with pytest.raises(ValueError, match="4-D"):
        to_fastsel_batch({**batch, "attention_mask": torch.ones(2, 1, 6, 6)})


# -------------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.0), "ratio"),
    (dict(ratio=1.5), "ratio"),
    (dict(strategy="median"), "strategy"),
    (dict(loss_band=-1.0), "loss_band"),
    (dict(single_pass="yes"), "single_pass"),
    (dict(single_pass=1), "single_pass"),
    (dict(backend="cuda"), "backend"),
    (dict(seed=1.5), "seed"),
    (dict(memory_budget_bytes=-1), "memory_budget_bytes"),
    (dict(id_column=""), "id_column"),
    (dict(log_file=3), "log_file"),
    (dict(strategy="gradshield"), "needs reference= or reference_batches"),
    (dict(strategy="moderate", reference_batches=[{}]), "used only by"),
    (dict(strategy="gradshield", reference={}, reference_every=3), "reference_every"),
])
def test_bad_selection_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kwargs)


def test_bad_trainer_setups(tmp_path) -> None:
    ds = Dataset.from_list(token_rows(8))
    common = dict(train_dataset=ds, data_collator=pad_collator)
    with pytest.raises(TypeError, match="SelectionConfig"):
        SelectiveTrainer(model=new_model(), args=training_args(tmp_path), fastsel_config={"ratio": 0.2}, **common)
    with pytest.raises(ValueError, match="compute_loss_func"):
        SelectiveTrainer(model=new_model(), args=training_args(tmp_path), compute_loss_func=lambda *a, **k: 0,
                         **common)
    with pytest.raises(ValueError, match="label_smoothing"):
        SelectiveTrainer(model=new_model(), args=training_args(tmp_path, label_smoothing_factor=0.1), **common)
    with pytest.raises(TypeError, match="Trainer subclass"):
        make_selective(dict)

    class CustomLoss(SelectiveTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            raise AssertionError("never called")

    with pytest.warns(UserWarning, match="compute_loss is overridden"):
        CustomLoss(model=new_model(), args=training_args(tmp_path), **common)


def test_distributed_types_fsdp2_accepted_others_refused_with_why(tmp_path) -> None:
    """accelerate runs FSDP only on accelerators, so the setup check is driven with the accelerator's state as
    accelerate sets it (distributed type, fsdp_plugin.fsdp_version); the FSDP2 step itself: test_fsdp.py."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    trainer = SelectiveTrainer(model=new_model(), args=training_args(tmp_path),
                               train_dataset=Dataset.from_list(token_rows(8)), data_collator=pad_collator)

    def check(kind: DistributedType, fsdp_version: int | None = None) -> None:
        plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
        trainer.accelerator = SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=plugin))
        trainer._fastsel_check_setup()

    check(DistributedType.FSDP, fsdp_version=2)  # accepted
    check(DistributedType.MULTI_GPU)
    with pytest.raises(NotImplementedError, match="FSDP1 flattens parameters.*fsdp_version"):
        check(DistributedType.FSDP, fsdp_version=1)
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO partitions and reduces gradients"):
        check(DistributedType.DEEPSPEED)
    with pytest.raises(NotImplementedError, match="Megatron-LM"):
        check(DistributedType.MEGATRON_LM)


def test_forward_without_logits_is_explained(tmp_path) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = new_model()
    model.base_model.model.forward = lambda *a, **k: CausalLMOutputWithPast(loss=torch.zeros(()), logits=None)
    trainer = SelectiveTrainer(model=model, args=training_args(tmp_path, remove_unused_columns=False),
                               train_dataset=Dataset.from_list(token_rows(8)), data_collator=pad_collator)
    with pytest.raises(TypeError, match="fused"):
        trainer.train()


def test_make_selective_and_eval_without_ids(tmp_path) -> None:
    cls = make_selective(Trainer)
    assert issubclass(cls, Trainer) and cls is make_selective(Trainer) and cls.__name__ == "SelectiveTrainer"
    assert make_selective(SelectiveTrainer) is SelectiveTrainer
    rows = token_rows(8)
    trainer = cls(model=new_model(), args=training_args(tmp_path, per_device_eval_batch_size=4),
                  train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                  data_collator=pad_collator, fastsel_config=SelectionConfig(ratio=0.5, log_file=None))
    metrics = trainer.evaluate()  # the id column reaches the batch and is taken out before the model call
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    trainer.train()
    assert len(trainer.fastsel_log) == 1 and not (tmp_path / "fastsel_selection.jsonl").exists()


# -------------------------------------------------------------------------------------------------------------- TRL


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")),
                                   pad_token="<pad>", eos_token="t2")


@pytest.mark.parametrize("padding_free", [False, True])
def test_trl_sft_trainer(tmp_path, padding_free) -> None:
    """make_selective(trl.SFTTrainer): trains, keeps ids; TRL's deprecated chunked_nll (fused LM head, no logits
    in its own loss path) is fine since fastsel runs the plain forward; padding-free selects like padded."""
    trl = pytest.importorskip("trl")
    rows = [{k: r[k] for k in ("id", "input_ids", "labels")} for r in token_rows(16, seed=4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                               learning_rate=LR, report_to="none", use_cpu=True, save_strategy="no",
                               disable_tqdm=True, loss_type="chunked_nll", padding_free=padding_free,
                               max_length=None if padding_free else 1024, optim="adamw_torch")
    trainer = make_selective(trl.SFTTrainer)(model=new_model(), args=config, train_dataset=Dataset.from_list(rows),
                                             processing_class=_word_tokenizer(),
                                             fastsel_config=SelectionConfig(ratio=0.25))
    trainer.train()
    entry = trainer.fastsel_log[0]
    assert entry["packed"] is padding_free and len(entry["kept_ids"]) == 2
    sel = fastsel.select(batch_of(token_rows(16, seed=4), entry["ids"]), new_model(), ratio=0.25)
    assert [entry["ids"][i] for i in sel.indices.tolist()] == entry["kept_ids"]

    with pytest.raises(ValueError, match="loss_type='dft'"):
        make_selective(trl.SFTTrainer)(model=new_model(), args=trl.SFTConfig(output_dir=str(tmp_path),
                                                                           loss_type="dft", use_cpu=True,
                                                                           report_to="none"),
                                       train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer())


@pytest.mark.parametrize("mode", ["padding_free", "bfd"])
def test_trl_packed_batches_run_natively_and_select_like_padded(tmp_path, mode) -> None:
    """SFTTrainer(padding_free=True) and packing=True (BFD): the model receives the packed row as it is (one row,
    no attention mask, restarting position_ids), the kept sequences are the padded path's, and TRL's token metrics
    are logged over the kept examples."""
    trl = pytest.importorskip("trl")
    rows = [{k: r[k] for k in ("id", "input_ids", "labels")} for r in token_rows(8, seed=9)]
    model = new_model()
    seen: list[dict[str, Any]] = []

    def record(module, args, kwargs):  # noqa: ANN001
        if torch.is_grad_enabled():  # the training forward (the packing probe runs without grad)
            seen.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=LR, report_to="none",
                               use_cpu=True, save_strategy="no", disable_tqdm=True, optim="adamw_torch",
                               logging_steps=1, padding_free=mode == "padding_free", packing=mode == "bfd",
                               per_device_train_batch_size=8 if mode == "padding_free" else 1,
                               max_length=None if mode == "padding_free" else 128)
        trainer = make_selective(trl.SFTTrainer)(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                                 processing_class=_word_tokenizer(),
                                                 fastsel_config=SelectionConfig(ratio=0.25))
        trainer.train()
    entry = trainer.fastsel_log[0]
    assert entry["packed"] and entry["batch_size"] == 8 and len(entry["kept_positions"]) == 2
    lengths = sum(len(r["input_ids"]) for r in rows)
    inputs = seen[0]
    assert "attention_mask" not in inputs and inputs["input_ids"].shape == (1, lengths)
    pos = inputs["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [lengths]
    sequences = [tuple(inputs["input_ids"][0, a:b].tolist()) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    kept = {sequences[i] for i in entry["kept_positions"]}
    if mode == "padding_free":
        assert sorted(entry["ids"]) == sorted(r["id"] for r in rows) and len(entry["kept_ids"]) == 2
        by_id = {r["id"]: tuple(r["input_ids"]) for r in rows}
        assert {by_id[i] for i in entry["kept_ids"]} == kept
    padded = fastsel.select(pad_collator(rows), new_model(), ratio=0.25)
    assert {tuple(rows[i]["input_ids"]) for i in padded.indices.tolist()} == kept
    # TRL's metrics over the kept examples, from the model before the step
    kept_rows = [r for r in rows if tuple(r["input_ids"]) in kept]
    batch = prepare_batch(pad_collator(kept_rows))
    with torch.no_grad():
        logits = forward_logits(new_model(), batch)
    target = batch["labels"][:, 1:]
    sup = target != -100
    log_p = torch.log_softmax(logits[:, :-1][sup], dim=-1)
    logged = trainer.state.log_history[0]
    assert logged["num_tokens"] == sum(len(r["input_ids"]) for r in kept_rows)
    assert logged["mean_token_accuracy"] == pytest.approx(float((log_p.argmax(-1) == target[sup]).float().mean()))
    assert logged["entropy"] == pytest.approx(float(-(log_p.exp() * log_p).sum(-1).mean()), rel=1e-5)
