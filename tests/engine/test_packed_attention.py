"""Per-sequence attention for packed rows (`fastsel.engine.packed_attention`): logits and per-example losses equal
separate forwards of each sequence, norms equal the naive oracle, the user's attention setting comes back."""

from __future__ import annotations

import pytest
import torch
from tiny import lora, make_packed, tiny_model

import fastsel
from fastsel.engine import packed_attention as PA
from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits

ROWS = [[2, 7, 5], [9, 2, 2, 3]]  # several sequences per row, length-2 sequences, rows of unequal width


def _alone(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> list[torch.Tensor]:
    """Logits of every sequence of a packed batch run alone (its tokens only)."""
    prepared = prepare_batch(batch)
    out = []
    for r, s, e in prepared["segments"].spans:
        ids = batch["input_ids"][r:r + 1, s:e]
        with torch.no_grad():
            out.append(model(input_ids=ids, use_cache=False).logits[0])
    return out


def _packed_logits(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> list[torch.Tensor]:
    prepared = prepare_batch(batch)
    with torch.no_grad():
        logits = forward_logits(model, prepared)
    return [logits[r, s:e] for r, s, e in prepared["segments"].spans]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_and_losses_equal_separate_forwards(kind: str, impl: str) -> None:
    model = tiny_model(kind)
    model.config._attn_implementation = impl
    batch = make_packed(ROWS, pad=3, prompt=1)
    alone = _alone(batch, model)
    with PA.packed_attention(model):
        assert model.config._attn_implementation == PA.REPLACES[impl]
        packed = _packed_logits(batch, model)
    assert model.config._attn_implementation == impl  # restored
    for a, p in zip(alone, packed, strict=True):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)
    prepared = prepare_batch(batch)
    with PA.packed_attention(model), torch.no_grad():
        losses = per_example_losses(forward_logits(model, prepared), prepared["labels"], prepared["segments"])
    expected = []
    for (r, s, e), logits in zip(prepared["segments"].spans, alone, strict=True):
        expected.append(per_example_losses(logits[None], prepared["labels"][r:r + 1, s:e])[0])
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_registered_name_works_on_a_loaded_model_and_with_cu_seq_lens() -> None:
    """The user's route: register, set the implementation; flash-attention's cu_seq_lens_q also marks sequences."""
    model = tiny_model()
    name = fastsel.register_packed_attention()
    model.set_attn_implementation(name)
    batch = make_packed([[4, 6, 3]], prompt=1)
    alone = _alone(batch, model)
    cu = torch.tensor([0, 4, 10, 13], dtype=torch.int32)
    with torch.no_grad():
        by_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        by_offsets = model(input_ids=batch["input_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                           max_length_k=6, use_cache=False).logits
    torch.testing.assert_close(by_positions[0], torch.cat(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_offsets[0, 4:10], alone[1], rtol=1e-5, atol=1e-5)


def test_padded_batch_runs_transformers_sdpa_unchanged() -> None:
    model = tiny_model()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, 7:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation(PA.register())
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, expected)


def test_sliding_window_is_kept_per_sequence() -> None:
    """Qwen2 with a sliding window shorter than a sequence: the window applies inside each sequence."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                         max_window_layers=0, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    assert model.model.has_sliding_layers
    batch = make_packed([[7, 5, 2]], prompt=1)
    alone = _alone(batch, model)
    with PA.packed_attention(model):
        packed = _packed_logits(batch, model)
    for a, p in zip(alone, packed, strict=True):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_norms_equal_the_naive_oracle_and_model_untouched(kind: str) -> None:
    model = lora(tiny_model(kind), r=4)
    model.base_model.model.config._attn_implementation = "sdpa"
    batch = make_packed(ROWS, prompt=1)
    got = fastsel.norm_pass(batch, model, backend="torch")
    naive = fastsel.norm_pass(batch, model, backend="naive")
    torch.testing.assert_close(got.norms, naive.norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.losses, naive.losses, rtol=1e-5, atol=0)
    assert model.base_model.model.config._attn_implementation == "sdpa"


def test_setting_restored_when_the_pass_fails() -> None:
    model = tiny_model()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="boom"), PA.packed_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_other_implementations_and_padded_batches_are_left_alone() -> None:
    model = tiny_model()
    model.config._attn_implementation = "sdpa"
    with PA.packed_attention(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "flex_attention"
    with PA.packed_attention(model):
        assert model.config._attn_implementation == "flex_attention"
