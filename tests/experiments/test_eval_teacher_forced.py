"""Teacher-forced refusal margin and KL: hand-made cases with known values, and the cached batched pass against
one plain forward per (prompt, continuation)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastsel.engine.losses import token_kl
from fastsel.experiments.data import toy_tokenizer
from fastsel.experiments.data.tokenize import encode, render_prompt
from fastsel.experiments.eval.teacher_forced import (
    DEFAULT_COMPLIANCE,
    compliance_prefix,
    continuation_ids,
    continuation_scores,
    margin_continuations,
    reference_logprobs,
    refusal_margin,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hi", "a much longer prompt than the first", "mid prompt", "x"]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def tiny(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    return model


def unigram(vocab: int, bias: torch.Tensor) -> LlamaForCausalLM:
    """A model whose next-token logits are `bias` at every position (zero head weight): hand-computable."""
    model = tiny(vocab)
    head = torch.nn.Linear(32, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


def lora(vocab: int) -> torch.nn.Module:
    peft_model = get_peft_model(tiny(vocab), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                            "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model


def test_margin_hand_made_unigram(tok) -> None:
    """p('y') = 1/2 and the rest uniform at every position: margin of "yy" over "no" is log(2 (V-1)) - log 2."""
    vocab = len(tok)
    y = tok.convert_tokens_to_ids("y")
    bias = torch.zeros(vocab)
    bias[y] = math.log(vocab - 1)  # e^b / (e^b + V - 1) = 1/2
    model = unigram(vocab, bias)
    out = refusal_margin(model, tok, [{"prompt": p, "meta": {"target": "no"}} for p in PROMPTS], refusal="yy",
                         batch_size=3)
    expected = math.log(0.5) - math.log(0.5 / (vocab - 1))
    assert out["per_prompt"] == pytest.approx([expected] * len(PROMPTS), abs=1e-5)
    assert out["margin"] == pytest.approx(expected, abs=1e-5)
    assert out["refusal_logprob"] == pytest.approx([math.log(0.5)] * len(PROMPTS), abs=1e-5)
    assert out["kl"] is None and out["kl_per_prompt"] is None
    # the same text on both sides: margin exactly 0; the default compliance prefix for items without a target
    same = refusal_margin(model, tok, PROMPTS, refusal=DEFAULT_COMPLIANCE)
    assert same["per_prompt"] == pytest.approx([0.0] * len(PROMPTS), abs=1e-6)
    # a per-token mean: a longer continuation of equally likely tokens scores the same
    longer = refusal_margin(model, tok, [{"prompt": "hi", "meta": {"target": "nononono"}}], refusal="yyyyyy")
    assert longer["margin"] == pytest.approx(expected, abs=1e-5)


def _naive(model, tok, prompt: str, continuations: list[str]) -> tuple[list[float], list[torch.Tensor]]:
    """One unpadded forward per continuation: summed log-probs, and the logits at the response positions."""
    text = render_prompt(tok, prompt)
    p_ids = encode(tok, text)
    sums, logits = [], []
    for c in continuations:
        c_ids = continuation_ids(tok, text, p_ids, c)
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            out = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(out, -1)
        positions = torch.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1)
        sums.append(float(lp[positions, torch.tensor(c_ids)].sum()))
        logits.append(out[positions])
    return sums, logits


def test_cached_batched_pass_equals_one_forward_per_continuation(tok) -> None:
    model = lora(len(tok))
    prompts = [{"prompt": p, "meta": {"target": t}} for p, t in zip(PROMPTS, ["Sure, here", "ok", "Sure", "S"],
                                                                     strict=True)]
    conts = [["I'm sorry, no.", compliance_prefix(p)] for p in prompts]
    got = continuation_scores(model, tok, prompts, conts, batch_size=3, kl=True)
    for i, p in enumerate(PROMPTS):
        sums, logits = _naive(model, tok, p, conts[i])
        with model.disable_adapter():
            _, ref = _naive(model, tok, p, conts[i])
        assert got["logprob"][i] == pytest.approx(sums, abs=1e-4)
        # KL at the first response position once, then every later position of each continuation
        kls = [token_kl(logits[0][:1], ref[0][:1])] + [token_kl(lg[1:], rf[1:]) for lg, rf in zip(logits, ref,
                                                                                                  strict=True)]
        expected = float(torch.cat(kls).mean())
        assert got["kl"][i] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert got["kl"][i] > 0
    assert got["n_tokens"][0] == [len("I'm sorry, no."), len("Sure, here")]


def test_zero_adapter_has_zero_kl_and_the_base_margin(tok) -> None:
    base = tiny(len(tok))
    before = refusal_margin(base, tok, PROMPTS, batch_size=2)
    peft_model = get_peft_model(tiny(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    after = refusal_margin(peft_model, tok, PROMPTS, batch_size=4, kl=True)  # B = 0: the adapter is a no-op
    assert after["per_prompt"] == pytest.approx(before["per_prompt"], abs=1e-5)
    assert after["kl_per_prompt"] == pytest.approx([0.0] * len(PROMPTS), abs=1e-6)


def test_argument_checks(tok) -> None:
    model = tiny(len(tok))
    with pytest.raises(ValueError, match="same number"):
        continuation_scores(model, tok, ["a", "b"], [["x"], ["x", "y"]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        continuation_scores(model, tok, ["a", "b"], [["x"]])
    with pytest.raises(TypeError, match="PEFT model"):
        refusal_margin(model, tok, ["a"], kl=True)
    was_training = model.train().training
    refusal_margin(model, tok, ["a"])
    assert model.training == was_training  # mode restored


def test_cached_reference_equals_the_adapter_disabled_pass(tok) -> None:
    """reference_logprobs of the plain model, reused: the same KL as disabling the adapter every time."""
    model = lora(len(tok))
    with model.disable_adapter():
        ref = reference_logprobs(model, tok, PROMPTS, margin_continuations(PROMPTS), batch_size=3)
    live = refusal_margin(model, tok, PROMPTS, batch_size=2, kl=True)
    cached = refusal_margin(model, tok, PROMPTS, batch_size=4, kl=True, reference=ref)
    assert cached["kl_per_prompt"] == pytest.approx(live["kl_per_prompt"], rel=1e-5)
    assert cached["per_prompt"] == pytest.approx(live["per_prompt"], abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        refusal_margin(model, tok, PROMPTS, kl=True, reference=ref, refusal="other text")
    with pytest.raises(ValueError, match="holds 4 prompts, not 2"):
        refusal_margin(model, tok, PROMPTS[:2], kl=True, reference=ref)


def test_heldout_losses_batched_equal_one_row_at_a_time(tok) -> None:
    """Padded batches give each row exactly its own mean answer-token NLL."""
    from fastsel.experiments.data import Example, tokenize_examples
    from fastsel.experiments.eval import heldout_losses

    examples = [Example(f"t:{i}", "t", p, a, "t") for i, (p, a) in enumerate(
        [("hi", "yes"), ("a much longer prompt here", "a long answer with many tokens"), ("q", "1")])]
    rows = tokenize_examples(examples, tok, 96)
    model = lora(len(tok))
    batched = heldout_losses(model, rows, pad_token_id=0, batch_size=3)
    for row, got in zip(rows, batched, strict=True):
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        target = labels[1:]
        keep = target != -100
        expected = -lp[keep.nonzero().flatten(), target[keep]].mean()
        assert got == pytest.approx(float(expected), rel=1e-5)
