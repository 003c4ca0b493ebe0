"""Packed (padding-free) batches: per-sequence norms against the unpadded naive oracle, the boundary checks, the
packing probe, and the model left as found."""

from __future__ import annotations

import pytest
import torch
from needs import need_kernels, on_kernel_device
from tiny import lora, make_batch, make_packed, tiny_model

import fastsel
from fastsel.engine.batch import pack, prepare_batch
from fastsel.engine.norms import norm_pass
from fastsel.engine.segments import PackedBatchError

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [[7, 2, 12], [5, 2, 9, 3]]  # several sequences per row, several rows, sequences of length 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-12)).max())


def naive(batch, model):
    return fastsel.grad_norms(batch, model, backend="naive")


def sequences(batch: dict[str, torch.Tensor]) -> list[dict[str, list[int]]]:
    """The sequences of a packed batch as tokenized rows (what `pack` / `collate` take)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][r].tolist()
        n = int(batch["attention_mask"][r].sum()) if "attention_mask" in batch else len(pos)
        starts = [t for t in range(n) if pos[t] == 0] + [n]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            out.append({"input_ids": batch["input_ids"][r, a:b].tolist(), "labels": batch["labels"][r, a:b].tolist()})
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_lora_matches_naive_and_padded(kind: str) -> None:
    model = lora(tiny_model(kind))
    batch = make_packed(ROWS, pad=3, prompt=1)
    got = fastsel.grad_norms(batch, model, backend="torch")
    assert got.shape == (7,) and got.dtype == torch.float32
    assert rel_err(got, naive(batch, model)) <= 1e-5
    from fastsel.engine.batch import collate

    padded = collate(sequences(batch), 0)
    assert rel_err(got, fastsel.grad_norms(padded, model, backend="torch")) <= 1e-5


def test_supervised_first_tokens_are_never_predicted_across_sequences() -> None:
    """Every label supervised, the first included: the label at a sequence's first token would be predicted from
    the previous sequence's last token; it is not a target (as for the sequence alone)."""
    model = lora(tiny_model())
    batch = make_packed([[4, 6, 2, 5]], prompt=0)
    result = norm_pass(batch, model, backend="torch")
    oracle = norm_pass(batch, model, backend="naive")
    assert rel_err(result.norms, oracle.norms) <= 1e-5 and rel_err(result.losses, oracle.losses) <= 1e-5
    assert result.tokens.tolist() == [4, 6, 2, 5]


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_gradient_checkpointing(reentrant: bool) -> None:
    model = lora(tiny_model())
    model.train()
    batch = make_packed(ROWS, prompt=1)
    expected = naive(batch, model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), expected) <= 1e-5


@pytest.mark.parametrize("gram", [False, True])
def test_packed_tied_embeddings_full_finetuning(gram: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tied input/output embeddings (two calls per forward): instantiated per sequence, or (gram) the mixed Gram
    form with cross terms, one sequence at a time."""
    if gram:
        from fastsel.engine import accumulate

        monkeypatch.setattr(accumulate, "INSTANTIATE_BUDGET_BYTES", 0)
    model = tiny_model(tie=True)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" not in name)
    model.config.pad_token_id = None
    batch = make_packed([[6, 2, 9], [4, 7]], prompt=1)
    assert rel_err(fastsel.grad_norms(batch, model, backend="torch"), naive(batch, model)) <= 1e-5


def test_packed_per_example_grads_equal_naive() -> None:
    """keep_grads (the single-pass step's per-sequence gradients) == each sequence's own gradient."""
    model = lora(tiny_model())
    batch = make_packed([[5, 8], [6]])
    result = norm_pass(batch, model, backend="torch", keep_grads=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i, row in enumerate(sequences(batch)):
        single = pack([row], 0)
        prepared = prepare_batch(single)
        from fastsel.engine.losses import per_example_losses
        from fastsel.engine.model_io import forward_logits

        loss = per_example_losses(forward_logits(model, prepared), prepared["labels"], prepared["segments"])[0]
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, _), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(result.per_example_grads[name][i], g, rtol=1e-5, atol=1e-7)


def test_boundaries_from_cu_seq_lens_or_seq_idx_give_the_same_norms() -> None:
    model = lora(tiny_model())
    batch = make_packed([[5, 2, 9]], prompt=1)
    expected = fastsel.grad_norms(batch, model, backend="torch")
    no_pos = {k: batch[k] for k in ("input_ids", "labels")}
    cu = {**no_pos, "cu_seq_lens_q": torch.tensor([0, 5, 7, 16], dtype=torch.int32)}
    seq = {**no_pos, "seq_idx": torch.tensor([[0] * 5 + [1] * 2 + [2] * 9])}
    both = {**batch, **cu}
    for b in (cu, seq, both):
        assert torch.equal(fastsel.grad_norms(b, model, backend="torch"), expected)


def test_pack_helper_rows_and_token_budget() -> None:
    rows = sequences(make_packed([[5, 2, 9, 3]], prompt=1))
    one = pack(rows, 0)
    assert one["input_ids"].shape == (1, 19) and "attention_mask" not in one
    split = pack(rows, 0, max_tokens=8)  # [5, 2] [9] [3]: a longer row gets its own packed row
    assert split["input_ids"].shape == (3, 9) and split["attention_mask"].sum(dim=1).tolist() == [7, 9, 3]
    model = lora(tiny_model())
    assert rel_err(fastsel.grad_norms(split, model, backend="torch"), fastsel.grad_norms(one, model)) <= 1e-5


# ------------------------------------------------------------------------------------------------- bad input


def _state(model: torch.nn.Module) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    grads = [p.grad for p in model.parameters()]
    return hooks, all(g is None for g in grads), model.training, {n: p.clone() for n, p in model.state_dict().items()}


def _bad(batch: dict[str, torch.Tensor], key: str, fn) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {k: v.clone() for k, v in batch.items()}
    out[key] = fn(out[key])
    return out


def _set(t: torch.Tensor, index: tuple, value: int) -> torch.Tensor:
    t[index] = value
    return t


BASE = make_packed([[5, 4, 6], [3, 8]])
BAD_INPUTS = [
    (_bad(BASE, "position_ids", lambda p: p + 1), PackedBatchError, "row 0 start at 1, not 0"),
    (_bad(BASE, "position_ids", lambda p: _set(p, (1, 5), 9)), PackedBatchError, "row 1 jump from 1 to 9 at token 5"),
    ({**BASE, "cu_seq_lens_q": torch.tensor([0, 5, 9, 15, 18, 30])}, PackedBatchError,
     "position_ids and cu_seq_lens_q disagree"),
    ({**BASE, "cu_seq_lens_q": torch.tensor([0, 5, 9, 20])}, PackedBatchError, "across rows 0 and 1"),
    ({**BASE, "seq_idx": torch.zeros(2, 14, dtype=torch.long)}, ValueError, "same shape"),
    ({**BASE, "labels": BASE["labels"][:, :-1]}, ValueError, "same shape"),
    (_bad(BASE, "labels", lambda lab: _set(lab, (1, slice(3, 11)), -100)), ValueError,
     r"no supervised token .*sequence 4 \(row 1, tokens 3-10\)"),
    (_bad(BASE, "labels", lambda lab: _set(lab, (0, slice(0, 5)), -100)), ValueError, r"sequence 0 \(row 0"),
    ({**make_packed([[4, 1, 3]], prompt=0)}, ValueError, r"sequence 1 \(row 0, tokens 4-4\)"),  # length 1
    ({**BASE, "attention_mask": torch.ones(2, 15, dtype=torch.long).index_fill_(1, torch.tensor([0]), 0)},
     PackedBatchError, "padded only at the end"),
]


@pytest.mark.parametrize("batch, error, match", BAD_INPUTS)
def test_bad_packed_batches_are_refused_and_the_model_is_untouched(batch, error, match) -> None:
    model = lora(tiny_model())
    before = _state(model)
    with pytest.raises(error, match=match):
        fastsel.grad_norms(batch, model, backend="torch")
    after = _state(model)
    assert before[:3] == after[:3]
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


def test_a_model_leaking_across_sequences_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packing probe: an attention that ignores the position_id restarts (here transformers' and fastsel's
    packed-sequence detection switched off) mixes the sequences; the first packed pass says so and leaves the model as found."""
    import transformers.masking_utils as masking

    from fastsel.engine import packed_attention

    model = lora(tiny_model())
    batch = make_packed([[6, 5]])
    from fastsel.engine.model_io import packing_leak

    assert packing_leak(model, batch["input_ids"]) <= 1e-5
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    monkeypatch.setattr(packed_attention, "_row_lengths", lambda position_ids, rows: None)  # fastsel's too
    leaking = lora(tiny_model())
    assert packing_leak(leaking, batch["input_ids"]) > 1e-3
    before = _state(leaking)
    with pytest.raises(ValueError, match="attend across sequence boundaries"):
        fastsel.grad_norms(batch, leaking, backend="torch")
    after = _state(leaking)
    assert before[:3] == after[:3]
    # padded batches still work on that model
    assert fastsel.grad_norms(make_batch([6, 5]), leaking, backend="torch").shape == (2,)


class NoPositions(torch.nn.Module):
    """A causal LM whose forward takes no position_ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(97, 8)
        self.head = torch.nn.Linear(8, 97)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_a_model_without_position_ids_cannot_take_packed_rows() -> None:
    with pytest.raises(ValueError, match="takes position_ids"):
        fastsel.grad_norms(make_packed([[6, 5]]), NoPositions(), backend="torch")


@pytest.mark.parametrize("case", ["lora", "full"])
def test_triton_backend_on_packed_rows(case: str) -> None:
    """The segment kernels end to end (the CPU interpreter here): instantiate (LoRA, and the single pass's
    per-sequence gradients) and Gram (full fine-tuning, short sequences) over (row, start, end) segments."""
    need_kernels()
    if case == "lora":
        model = lora(tiny_model(), r=4, targets=["q_proj", "down_proj"])
    else:
        model = tiny_model()
        for name, p in model.named_parameters():
            p.requires_grad_("layers.1.self_attn" in name and "proj" in name)
    batch = make_packed([[6, 2, 9], [5, 4]], prompt=1)
    model, batch = on_kernel_device(model, batch)
    result = norm_pass(batch, model, backend="triton", keep_grads=case == "lora")
    assert rel_err(result.norms, naive(batch, model)) <= 1e-5
    if case == "lora":
        expected = norm_pass(batch, model, backend="torch", keep_grads=True).per_example_grads
        for name, g in expected.items():
            torch.testing.assert_close(result.per_example_grads[name], g, rtol=1e-5, atol=1e-6)
