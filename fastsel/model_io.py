"""How fastsel calls a Hugging Face causal LM: device lookup and a forward that returns logits."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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


def forward_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits [B, T, V] of `model` on a prepared batch; position_ids are passed when the model takes them."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch and _accepts_position_ids(type(_core_model(model))):
        kwargs["position_ids"] = batch["position_ids"]
    out = model(**kwargs, use_cache=False) if _takes_use_cache(model) else model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError("the model must return logits of shape [B, T, V] (a causal LM)")
    return logits


def _takes_use_cache(model: nn.Module) -> bool:
    core = _core_model(model)
    return hasattr(getattr(core, "config", None), "use_cache")
