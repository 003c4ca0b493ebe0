"""Chat-template tokenization of examples for training (padding rows into a batch: `fastsel.engine.batch.collate`).

An example becomes the conversation ``[user: prompt, assistant: response]`` rendered with the tokenizer's chat
template. The prompt length is the length of ``[user: prompt]`` rendered with ``add_generation_prompt=True``
(when the two tokenizations disagree at the boundary, the longest common prefix is the prompt); labels are -100
on the prompt and equal to input_ids on the response, which includes the template's end-of-turn token(s), so the
model learns to stop. Labels follow the transformers causal-LM convention (shifted inside the loss).

A tokenizer without a chat template gets `FALLBACK_CHAT_TEMPLATE`::

    <bos>### User:\\n{prompt}\\n\\n### Assistant:\\n{response}<eos>
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastsel.engine.batch import IGNORE_INDEX
from fastsel.experiments.data.examples import Example

log = logging.getLogger(__name__)

FALLBACK_CHAT_TEMPLATE = (  # newlines as Jinja string literals: transformers renders with trim_blocks=True
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + m['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
OVERFLOW_MODES = ("truncate", "skip")


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or `FALLBACK_CHAT_TEMPLATE` if it has none."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def messages_for(prompt: str, response: str | None = None, system_prompt: str | None = None) -> list[dict[str, str]]:
    """[system?, user, assistant?] messages."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The chat as text, with the tokenizer's template (or the fallback)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template_of(tokenizer))
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def render_prompt(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The generation input for a user prompt: the chat with only the user turn plus the generation prompt."""
    return render_chat(tokenizer, messages_for(prompt, system_prompt=system_prompt), add_generation_prompt=True)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered template text (the template already holds the special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _middle_truncate(ids: list[int], budget: int) -> list[int]:
    """Keep the first ceil(budget/2) and last floor(budget/2) tokens (template header and assistant header)."""
    if len(ids) <= budget:
        return ids
    tail = budget // 2
    return ids[: budget - tail] + (ids[len(ids) - tail:] if tail else [])


def tokenize_with_status(example: Example, tokenizer: Any, max_length: int, *, system_prompt: str | None = None,
                         min_prompt_tokens: int = 16) -> tuple[dict[str, Any], str]:
    """`tokenize_example` plus what truncation did: "ok", "prompt_truncated" or "response_truncated"."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompt_ids = encode(tokenizer, render_prompt(tokenizer, example.prompt, system_prompt))
    full_ids = encode(tokenizer, render_chat(tokenizer, messages_for(example.prompt, example.response,
                                                                     system_prompt)))
    n_prompt = _common_prefix(prompt_ids, full_ids)
    prompt, response = full_ids[:n_prompt], full_ids[n_prompt:]
    if not response:
        raise ValueError(f"{example.id}: the rendered response is empty; nothing to train on")
    status = "ok"
    if len(prompt) + len(response) > max_length:
        keep_prompt = min(len(prompt), min_prompt_tokens, max_length - 1)
        if len(response) > max_length - keep_prompt:
            response = response[: max_length - keep_prompt]
            status = "response_truncated"
        else:
            status = "prompt_truncated"
        prompt = _middle_truncate(prompt, max_length - len(response))
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response,
            "id": example.id}, status


def tokenize_example(example: Example, tokenizer: Any, max_length: int, *, system_prompt: str | None = None,
                     min_prompt_tokens: int = 16) -> dict[str, Any]:
    """Tokenize `example` for training: dict(input_ids, labels, id), at most `max_length` tokens.

    Loss only on the response (labels -100 on the prompt). Over-long examples keep the response: the prompt is
    cut in the middle (its start, with the template header, and its end, with the assistant header, stay) down
    to `min_prompt_tokens`; only if the response does not fit beside those is the response's end cut (reported
    as "response_truncated" by `tokenize_with_status` / `tokenize_examples`). min_prompt_tokens=0 cuts the
    response only when it alone exceeds max_length.
    """
    return tokenize_with_status(example, tokenizer, max_length, system_prompt=system_prompt,
                                min_prompt_tokens=min_prompt_tokens)[0]


class TokenizedExamples(list):
    """Features from `tokenize_examples`, with `.stats` counting truncated and skipped examples."""

    def __init__(self, items: Iterable[dict[str, Any]] = (), stats: dict[str, int] | None = None):
        super().__init__(items)
        self.stats: dict[str, int] = dict(stats or {})


def tokenize_examples(examples: Iterable[Example], tokenizer: Any, max_length: int, *, overflow: str = "truncate",
                      system_prompt: str | None = None, min_prompt_tokens: int = 16) -> TokenizedExamples:
    """Tokenize many examples. overflow="truncate" truncates as `tokenize_example` does; "skip" drops every
    example that would need truncation. `.stats` counts total, ok, prompt_truncated, response_truncated and
    skipped_too_long, and a summary is logged, so nothing is dropped unreported."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    out = TokenizedExamples(stats={"total": 0, "ok": 0, "prompt_truncated": 0, "response_truncated": 0,
                                   "skipped_too_long": 0})
    for ex in examples:
        feats, status = tokenize_with_status(ex, tokenizer, max_length, system_prompt=system_prompt,
                                             min_prompt_tokens=min_prompt_tokens)
        out.stats["total"] += 1
        if status != "ok" and overflow == "skip":
            out.stats["skipped_too_long"] += 1
            continue
        out.stats[status] += 1
        out.append(feats)
    if out.stats["total"] != out.stats["ok"]:
        log.info("tokenize_examples(max_length=%d): %s", max_length, out.stats)
    return out


def pad_token_id_of(tokenizer: Any) -> int:
    """The pad id: pad_token_id, else eos_token_id, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
