"""How fastsel calls a Hugging Face causal LM: device and vocabulary lookup, batch preparation for the model, a
forward that returns logits, the packing probe.

Packed (padding-free) rows go to the model without an attention mask, with their restarting position_ids and
use_cache=False: transformers then builds a block-diagonal causal mask (flash-attention varlen on GPU). That is
checked, not trusted: the first packed forward of a model (per attention implementation) runs a short probe, two
sequences packed in one row against each alone, and a model that lets tokens see the other sequence is refused.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.batch import IGNORE_INDEX, packed_examples, prepare_batch
from fastsel.engine.losses import per_example_losses, token_statistics
from fastsel.engine.packed_attention import packed_attention
from fastsel.utils import eval_mode


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
    rows = getattr(emb, "num_embeddings", None)  # an embedding table of any kind
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def prepare_for(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`prepare_batch` on the model's device, with token ids and labels checked against its vocabulary: the one
    place where every entry point (grad_norms, select, selective_backward, train) prepares a batch."""
    return prepare_batch(batch, model_device(model), vocab_size=vocab_size(model))


LAYOUTS = ("auto", "given", "packed")
AUTO_PACK_DEVICES = ("cpu",)  # where layout 'auto' packs padded batches (measured there; CUDA: not yet)


def in_layout(model: nn.Module, prepared: dict[str, Any], layout: str = "auto") -> dict[str, Any]:
    """A prepared batch in the layout a pass runs it in: the same examples, in the same order.

    'given': as it is. 'packed': a padded batch's examples packed into one padding-free row (`packed_examples`;
    refused, as any packed batch, by a model that cannot keep packed sequences apart). 'auto' (the default): packed
    on a CPU when the model takes packed rows exactly, else as given. On a CPU compute grows with the tokens
    processed: a padded batch pays for its padding (and attention over it), a packed row with per-sequence
    attention (`packed_attention`) only for the real tokens (benchmarks/README.md: 0.3-0.5x the padded pass on
    instruction data at natural lengths). On CUDA padded batches stay padded (not measured yet).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    segments = prepared["segments"]
    if layout == "given" or segments.packed:
        return prepared
    if layout == "auto" and prepared["input_ids"].device.type not in AUTO_PACK_DEVICES:
        return prepared
    if layout == "auto":
        with packed_attention(model):  # probed as the packed pass will run it (the probe is cached)
            if not supports_packing(model, prepared["input_ids"][prepared["attention_mask"].bool()]):
                return prepared
    return prepare_for(model, packed_examples(prepared))


@lru_cache(maxsize=64)
def _forward_takes(forward_type: type, argument: str) -> bool:
    """Whether the forward of `forward_type` names `argument` (position_ids, logits_to_keep) in its signature."""
    try:
        return argument in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def _accepts_position_ids(forward_type: type) -> bool:
    return _forward_takes(forward_type, "position_ids")


def _core_model(model: nn.Module) -> nn.Module:
    """The transformers model under a DDP or PEFT wrapper (they forward **kwargs, which hides the signature)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_packed(batch: dict[str, Any]) -> bool:
    segments = batch.get("segments")
    return bool(getattr(segments, "packed", False))


def forward_kwargs(model: nn.Module, batch: dict[str, Any], *, mask: bool = True) -> dict[str, Tensor | bool]:
    """Keyword arguments of the model call on a prepared batch: ids, the attention mask (unless `mask` is False or
    the rows are packed), position_ids when the model takes them (a packed batch needs them), and use_cache=False
    for models with a KV cache."""
    kwargs: dict[str, Tensor | bool] = {"input_ids": batch["input_ids"]}
    packed = _is_packed(batch)
    if mask and not packed:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch and _accepts_position_ids(type(_core_model(model))):
        kwargs["position_ids"] = batch["position_ids"]
    elif packed:
        raise ValueError(f"a packed (padding-free) batch needs a model whose forward takes position_ids; "
                         f"{type(_core_model(model)).__name__} does not: use padded batches")
    if hasattr(getattr(_core_model(model), "config", None), "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


# model -> {attention implementation: probe passed}; weak, so a model's entry goes with the model
_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _attn_implementation(model: nn.Module) -> str:
    config = getattr(_core_model(model), "config", None)
    return str(getattr(config, "_attn_implementation", None))


def _probe_logits(model: nn.Module, tokens: Tensor, lengths: list[int], packed: bool) -> Tensor:
    positions = torch.cat([torch.arange(n, device=tokens.device) for n in lengths])[None]
    batch: dict[str, Any] = {"input_ids": tokens[None], "position_ids": positions,
                             "attention_mask": torch.ones_like(tokens)[None]}
    kwargs = forward_kwargs(model, batch, mask=not packed)
    return logits_of(model(**kwargs))[0].float()


def packing_leak(model: nn.Module, tokens: Tensor) -> float:
    """Largest |logit| change, relative to the logits' scale, that packing 2 sequences in one row causes to the
    second's logits (0 for a model with block-diagonal attention). `tokens`: >= 4 token ids of the vocabulary."""
    tokens = tokens.flatten()[:8]
    if tokens.numel() < 4:
        raise ValueError("the packing probe needs at least 4 tokens")
    first, second = tokens.numel() // 2, tokens.numel() - tokens.numel() // 2
    autocast_off = torch.autocast(device_type=tokens.device.type, enabled=False)  # the model's own precision
    with torch.no_grad(), eval_mode(model), autocast_off:
        together = _probe_logits(model, tokens, [first, second], packed=True)[first:]
        alone = _probe_logits(model, tokens[first:], [second], packed=False)
    return float((together - alone).abs().max() / alone.abs().max().clamp_min(1e-6))


def _probe_tolerance(model: nn.Module) -> float:
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def check_packing(model: nn.Module, tokens: Tensor) -> None:
    """Raise ValueError unless sequences packed in one row stay apart in `model` (probed once per model and
    attention implementation, on the first `tokens`)."""
    impl = _attn_implementation(model)
    seen = _PROBED.setdefault(model, {})
    if impl not in seen:
        seen[impl] = packing_leak(model, tokens) <= _probe_tolerance(model)
    if not seen[impl]:
        raise ValueError(
            f"{type(_core_model(model)).__name__} (attn_implementation={impl!r}) lets the tokens of a packed row "
            "attend across sequence boundaries: its logits for a sequence packed after another differ from the "
            "sequence alone. transformers builds the block-diagonal mask from restarting position_ids only when "
            "attention_mask is None and no cache is used; this model or attention implementation does not. Use "
            "padded batches (TrainConfig(packing=False), a padding collator) or eager/sdpa/flash attention")


def supports_packing(model: nn.Module, tokens: Tensor) -> bool:
    """Whether packed rows are exact for `model`: it takes position_ids and the probe finds no leak."""
    if not _accepts_position_ids(type(_core_model(model))):
        return False
    try:
        check_packing(model, tokens)
    except ValueError:
        return False
    return True


def logits_of(out: object) -> Tensor:
    """The logits of a model output (ModelOutput, tuple or tensor)."""
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def forward_logits(model: nn.Module, batch: dict[str, Any], *, columns: Tensor | None = None) -> Tensor:
    """Logits [B, T, V] of `model` on a prepared batch; position_ids are passed when the model takes them. A packed
    batch is first checked by the packing probe (once per model). `columns`: only those positions' logits
    ([B, K, V], the model's `logits_to_keep`)."""
    kwargs = forward_kwargs(model, batch)
    if columns is not None:
        kwargs["logits_to_keep"] = columns
    if _is_packed(batch):
        check_packing(model, batch["input_ids"])
    logits = logits_of(model(**kwargs))
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError("the model must return logits of shape [B, T, V] (a causal LM)")
    return logits


def _output_layer_trained(model: nn.Module) -> bool:
    get = getattr(_core_model(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head is None or any(p.requires_grad for p in head.parameters())


def supervised_columns(model: nn.Module, labels: Tensor) -> Tensor | None:
    """The positions whose logits can matter: t where some row's label t+1 is supervised (sorted long [K]), or
    None for every position. None when the model takes no `logits_to_keep` or its output layer is trained (fastsel
    then hooks it and reads every position). Unsupervised positions add nothing to any loss or gradient, so
    computing the LM head, the softmax and their backward only at these columns is exact (TRL's chunked loss
    does the same)."""
    if not _forward_takes(type(_core_model(model)), "logits_to_keep") or _output_layer_trained(model):
        return None
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def forward_losses(model: nn.Module, batch: dict[str, Any], *, token_stats: bool = False
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example losses of a prepared batch (`losses.per_example_losses`), with logits only at the supervised
    columns (`supervised_columns`), and with `token_stats` also `losses.token_statistics`."""
    columns = supervised_columns(model, batch["labels"])
    logits = forward_logits(model, batch, columns=columns)
    losses = per_example_losses(logits, batch["labels"], batch.get("segments"), columns)
    stats = token_statistics(logits, batch["labels"], batch["segments"], columns) if token_stats else {}
    return losses, stats
