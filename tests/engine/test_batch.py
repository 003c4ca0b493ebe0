"""Batch preparation: the left-padding rule at the shift, and the checks every entry point runs before torch sees
the batch (types before shapes, token ids and labels inside the model's vocabulary)."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, lora, make_batch, make_packed, tiny_model

import fastsel
from fastsel.engine.batch import IGNORE_INDEX, check_batch, prepare_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY_POINTS = {
    "grad_norms": lambda batch, model: fastsel.grad_norms(batch, model, backend="torch"),
    "select": lambda batch, model: fastsel.select(batch, model, ratio=0.5, backend="torch"),
    "selective_backward": lambda batch, model: fastsel.selective_backward(batch, model, ratio=0.5, backend="torch"),
    "selective_backward_full": lambda batch, model: fastsel.selective_backward(batch, model, strategy="full"),
}


def test_a_label_after_padding_is_never_a_target() -> None:
    """Left, middle and right padding: label t+1 counts only when positions t and t+1 are both attended."""
    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 0, 7, 8], [5, 6, 7, 0, 0]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 0, 0]]),
    }
    batch["labels"] = batch["input_ids"].clone()
    labels = prepare_batch(batch)["labels"]
    expected = torch.tensor([[-100, -100, -100, 6, 7], [5, 6, -100, -100, 8], [5, 6, 7, -100, -100]])
    assert labels.tolist() == expected.tolist()
    assert batch["labels"][0, 2] == 5  # the caller's tensor is not modified


def test_an_example_supervised_only_after_padding_has_no_loss() -> None:
    batch = {"input_ids": torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, -100, 5, -100], [-100, 6, 7, 8]])}
    with pytest.raises(ValueError, match=r"example\(s\) \[0\] have no supervised token"):
        prepare_batch(batch)


def test_vocab_size_of_a_model() -> None:
    from fastsel.engine.model_io import vocab_size

    model = tiny_model()
    assert vocab_size(model) == VOCAB == vocab_size(lora(tiny_model()))

    class ConfigOnly(torch.nn.Module):
        config = type("Config", (), {"vocab_size": 40})()

    assert vocab_size(ConfigOnly()) == 40 and vocab_size(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", ["id_too_large", "id_negative", "label_too_large", "label_negative"])
def test_token_ids_outside_the_vocabulary_name_example_and_position(entry: str, case: str) -> None:
    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 7, 6])
    key = "input_ids" if case.startswith("id") else "labels"
    batch[key][1, 4] = VOCAB if case.endswith("large") else -3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    what = "token id" if key == "input_ids" else "label"
    with pytest.raises(ValueError, match=rf"{what} -?\d+ of example 1 at position 4 is outside .*\[0, {VOCAB}\)"):
        ENTRY_POINTS[entry](batch, model)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ignore_index_labels_and_the_largest_id_are_accepted() -> None:
    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 7])
    batch["input_ids"][0, 1] = VOCAB - 1
    batch["labels"][0, 1] = VOCAB - 1
    assert batch["labels"][1, 0] == IGNORE_INDEX
    assert fastsel.grad_norms(batch, model, backend="torch").isfinite().all()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_list_instead_of_a_tensor_is_a_type_error(entry: str) -> None:
    model = lora(tiny_model(), r=2)
    batch = make_batch([5, 7])
    batch["input_ids"] = batch["input_ids"].tolist()
    with pytest.raises(TypeError, match=r"batch\['input_ids'\] must be a torch.Tensor, got list"):
        ENTRY_POINTS[entry](batch, model)
    with pytest.raises(TypeError, match="batch must be a dict"):
        ENTRY_POINTS[entry]([batch], model)


def test_packed_labels_at_sequence_starts_and_trailing_padding_are_never_targets() -> None:
    """A packed row [5 6 7 | 8 9 | pad pad]: every label supervised by the caller; the label at each sequence's
    first token (predicted from the previous sequence) and the padding's labels are masked."""
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0]]), "labels": torch.tensor([[5, 6, 7, 8, 9, 1, 1]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}
    prepared = prepare_batch(batch)
    assert prepared["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100]]
    assert prepared["segments"].spans == [(0, 0, 3), (0, 3, 5)]
    assert set(check_batch(batch)) == {"input_ids", "labels", "position_ids", "attention_mask"}


@pytest.mark.parametrize("entry", ["grad_norms", "selective_backward"])
@pytest.mark.parametrize("key", ["input_ids", "labels"])
def test_packed_ids_outside_the_vocabulary_name_the_sequence(entry: str, key: str) -> None:
    model = lora(tiny_model(), r=2)
    batch = make_packed([[5, 4], [6]])
    batch[key][0, 7] = VOCAB
    what = "token id" if key == "input_ids" else "label"
    with pytest.raises(ValueError, match=rf"{what} {VOCAB} in sequence 1 \(row 0, tokens 5-8\) at row 0, position 7 "
                                         rf"is outside .*\[0, {VOCAB}\)"):
        ENTRY_POINTS[entry](batch, model)
    assert all(p.grad is None for p in model.parameters())
