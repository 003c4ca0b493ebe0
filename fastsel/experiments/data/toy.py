"""An offline byte-level toy tokenizer with a chat template, for tests and smoke runs without any hub access.

Every byte is one token (no merges), so any text round-trips exactly; six special tokens come first:
``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Vocabulary: 262.
"""

from __future__ import annotations

from typing import Any

TOY_SPECIALS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def toy_tokenizer(chat_template: bool = True) -> Any:
    """A `PreTrainedTokenizerFast` over bytes (vocab 262); `chat_template=False` leaves the template unset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TOY_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=list(TOY_SPECIALS[3:]))
    if chat_template:
        tok.chat_template = TOY_CHAT_TEMPLATE
    return tok
