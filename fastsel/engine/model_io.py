"""How fastsel calls a Hugging Face causal LM: device and vocabulary lookup, batch preparation for the model, and
a forward that returns logits."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache

import torch
from torch import Tensor, nn

from fastsel.engine.batch import prepare_batch


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def vocab_size(model: nn.Module) -> int | None:
    """Number of token ids the model embeds: its input embeddings' rows, else `config.vocab_size` (None if
    neither is known, e.g. a plain nn.Module)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:  # transformers' default for models without embeddings
        emb = None
    if isinstance(emb, nn.Embedding):
        return int(emb.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def prepare_for(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`prepare_batch` on the model's device, with token ids and labels checked against its vocabulary: the one
    place where every entry point (grad_norms, select, selective_backward, train) prepares a batch."""
    return prepare_batch(batch, model_device(model), vocab_size=vocab_size(model))


@lru_cache(maxsize=64)
def _accepts_position_ids(forward_type: type) -> bool:
    try:
        return "position_ids" in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def _core_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (PEFT forwards **kwargs, which hides the signature)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def forward_kwargs(model: nn.Module, batch: dict[str, Tensor], *, mask: bool = True) -> dict[str, Tensor | bool]:
    """Keyword arguments of the model call on a prepared batch: ids, the attention mask (unless `mask` is False),
    position_ids when the model takes them, and use_cache=False for models with a KV cache."""
    kwargs: dict[str, Tensor | bool] = {"input_ids": batch["input_ids"]}
    if mask:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch and _accepts_position_ids(type(_core_model(model))):
        kwargs["position_ids"] = batch["position_ids"]
    if hasattr(getattr(_core_model(model), "config", None), "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def logits_of(out: object) -> Tensor:
    """The logits of a model output (ModelOutput, tuple or tensor)."""
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def forward_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits [B, T, V] of `model` on a prepared batch; position_ids are passed when the model takes them."""
    logits = logits_of(model(**forward_kwargs(model, batch)))
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError("the model must return logits of shape [B, T, V] (a causal LM)")
    return logits
