"""Attention over packed (padding-free) rows that costs sum_i T_i^2, not N^2: each sequence attends on its own.

transformers runs a packed row (several sequences back to back, `position_ids` restarting at 0 per sequence, no
attention mask) through sdpa or eager attention with an N x N block-diagonal mask: on a CPU that is N^2 work and
memory for a row of N tokens, while the same sequences apart cost sum_i T_i^2 (a row of 32 sequences of 155 tokens:
32x the attention work). On a GPU flash-attention varlen avoids it from the same position_ids. This module gives
every device the same: an attention function registered with transformers' `AttentionInterface` under `NAME`
that finds the sequences from `position_ids` (or flash-attention's `cu_seq_lens_q`) and runs
transformers' sdpa once per sequence, causal, without a mask; and a mask function
(`AttentionMaskInterface`) that builds no mask for such rows. A batch with an attention mask (padded rows) or one
sequence per row goes to transformers' own sdpa unchanged. Exact: the logits equal separate per-sequence forwards
(tests/engine/test_packed_attention.py, and the packing probe of `model_io` checks it on every model).

Use it for any packed training:

    import fastsel
    fastsel.register_packed_attention()                       # once per process; returns NAME
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastsel_varlen")
    # or, on a loaded model: model.set_attn_implementation("fastsel_varlen")

fastsel's own packed paths switch a model that uses 'sdpa' or 'eager' to it (`EAGER_NAME` for eager: the model's
eager attention per sequence) for the duration of a pass (`packed_attention`), and back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

NAME = "fastsel_varlen"  # per sequence through transformers' sdpa
EAGER_NAME = "fastsel_varlen_eager"  # per sequence through the model's eager attention
REPLACES = {"sdpa": NAME, "eager": EAGER_NAME}  # implementations that pay N^2 on a packed row (flash varlen does not)

_last: tuple[weakref.ref[Tensor], list[list[int]] | None] | None = None  # boundaries of the last position_ids


def _row_lengths(position_ids: Tensor, rows: int) -> list[list[int]] | None:
    """Sequence lengths of every row (a new sequence wherever a position does not follow the previous one), or
    None when every row holds one sequence. Cached for the tensor, so all layers of a forward pay one host sync."""
    global _last
    if _last is not None and _last[0]() is position_ids:
        return _last[1]
    pos = position_ids.expand(rows, -1)
    starts = torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    lengths: list[list[int]] | None = None
    if int(starts.sum()) > rows:
        width = pos.shape[1]
        lengths = []
        for row in starts.cpu():
            bounds = row.nonzero().flatten().tolist() + [width]
            lengths.append([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    _last = (weakref.ref(position_ids), lengths)
    return lengths


def _lengths_from_cu_seqlens(cu_seqlens: Tensor, rows: int, width: int) -> list[list[int]] | None:
    """Per-row sequence lengths from offsets over the row-major flattened tokens (one row in practice)."""
    cu = cu_seqlens.flatten().tolist()
    lengths: list[list[int]] = [[] for _ in range(rows)]
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        lengths[a // width].append(b - a)
    for row in lengths:
        if sum(row) < width:
            row.append(width - sum(row))  # trailing padding: a sequence of its own, never read
    return lengths if any(len(row) > 1 for row in lengths) else None


def _sequence_mask(length: int, window: int | None, eager: bool, dtype: torch.dtype, device: torch.device
                   ) -> Tensor | None:
    """[1, 1, L, L] mask of one sequence (query q sees keys k <= q, within `window`): None where sdpa's causal
    flag is enough; additive (0 / dtype min) for eager attention."""
    if not eager and (window is None or length <= window):
        return None
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    allowed = (k <= q) if window is None else (k <= q) & (k > q - window)
    if not eager:
        return allowed[None, None]
    return torch.zeros((length, length), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min
                                                                                 )[None, None]


def _eager_function(module: nn.Module) -> Callable[..., tuple[Tensor, Any]]:
    """The model's own eager attention (each modeling file defines `eager_attention_forward`)."""
    import sys

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward: use sdpa attention")
    return fn


def _sequence_lengths(query: Tensor, key: Tensor, attention_mask: Tensor | None, causal: bool,
                      kwargs: dict[str, Any]) -> list[list[int]] | None:
    """Per-row sequence lengths of a packed batch, or None when the attention is not per sequence here (a mask
    was given, one sequence per row, a KV cache, softcapping)."""
    rows, width = query.shape[0], query.shape[2]
    if attention_mask is not None or not causal or key.shape[2] != width or kwargs.get("softcap") is not None:
        return None
    if kwargs.get("cu_seq_lens_q") is not None:
        return _lengths_from_cu_seqlens(kwargs["cu_seq_lens_q"], rows, width)
    if kwargs.get("position_ids") is not None:
        return _row_lengths(kwargs["position_ids"], rows)
    return None


def _per_sequence(eager: bool) -> Callable[..., tuple[Tensor, None]]:
    """A transformers attention function running every sequence of a packed row on its own through sdpa (or the
    model's eager attention), each on its [1, H, L, D] slice: the same kernels, GQA handling and rounding as the
    sequence alone. The slices come from `split`, whose backward concatenates their gradients (slicing would
    zero-fill a full row per sequence)."""

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                  **kwargs: Any) -> tuple[Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        lengths = _sequence_lengths(query, key, attention_mask, causal, kwargs)
        inner = _eager_function(module) if eager else sdpa_attention_forward
        if lengths is None:  # padded rows (a mask), one sequence per row, a KV cache: the implementation as is
            extra = {} if eager else {"is_causal": is_causal}
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra,
                         **kwargs)
        window = kwargs.get("sliding_window")
        rows, width = query.shape[0], query.shape[2]
        out = []
        for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), lengths, strict=True):
            for qs, ks, vs in zip(q.split(row, dim=2), k.split(row, dim=2), v.split(row, dim=2), strict=True):
                mask = _sequence_mask(qs.shape[2], window, eager, qs.dtype, qs.device)
                extra = {} if eager else {"is_causal": True}
                out.append(inner(module, qs, ks, vs, mask, dropout=dropout, scaling=scaling, **extra)[0])
        return torch.cat(out, dim=1).view(rows, width, *out[0].shape[2:]), None

    return attention


varlen_attention = _per_sequence(eager=False)
varlen_eager_attention = _per_sequence(eager=True)


def _mask_function(kind: str) -> Callable[..., Tensor | None]:
    """transformers mask function: no mask without a padding mask (the attention finds the sequences itself),
    else the mask of the implementation replaced (`kind`: 'sdpa' or 'eager')."""

    def mask(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
        if attention_mask is None:
            return None
        from transformers import masking_utils

        return getattr(masking_utils, f"{kind}_mask")(*args, attention_mask=attention_mask, **kwargs)

    return mask


def register() -> str:
    """Register `NAME` with transformers' attention and mask interfaces (idempotent); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionInterface.register(EAGER_NAME, varlen_eager_attention)
    AttentionMaskInterface.register(NAME, _mask_function("sdpa"))
    AttentionMaskInterface.register(EAGER_NAME, _mask_function("eager"))
    return NAME


def _configs(model: nn.Module) -> list[Any]:
    """The transformers configs whose attention implementation the model's attention layers read."""
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    get_base = getattr(core, "get_base_model", None)
    core = get_base() if callable(get_base) else core
    config = getattr(core, "config", None)
    return [config] if config is not None and hasattr(config, "_attn_implementation") else []


@contextlib.contextmanager
def packed_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block (forward and backward), a model on 'sdpa' or 'eager' attention runs it per sequence
    (`NAME`, `EAGER_NAME`); its own setting is restored on exit, also on error. Other implementations
    (flash-attention varlen, flex) are kept: they already cost sum_i T_i^2."""
    configs = [c for c in _configs(model) if enabled and c._attn_implementation in REPLACES]
    if configs:
        register()
    before = [c._attn_implementation for c in configs]
    try:
        for c, impl in zip(configs, before, strict=True):
            c._attn_implementation = REPLACES[impl]
        yield
    finally:
        for c, impl in zip(configs, before, strict=True):
            c._attn_implementation = impl
