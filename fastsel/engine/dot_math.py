"""Exact per-example gradient dots <G_i, R_k> with reference gradients, in plain PyTorch (fp32 accumulation).

The per-example gradient of a parameter is linear in the module calls' contributions, so its dot with a fixed R
is a sum of per-token terms, reduced into examples: no per-example gradient is needed, and a parameter fed by
several calls just adds its calls' dots (no cross terms, unlike norms). For K references R [K, *shape]:

- Linear weight [m, n], x [B, T, n], delta [B, T, m]: term_t = delta_t^T R_k x_t. The larger side is projected
  onto the smaller (x R_k^T when m <= n, else delta R_k), cost ~ T m n K, memory B T K min(m, n);
- Embedding weight [V, d], ids [B, T], delta [B, T, d]: term_t = delta_t . R_k[id_t];
- Linear bias [m]: term_t = delta_t . r_k;
- when G_i is instantiated anyway (the norm's instantiate form, kept per-example gradients): <G_i, R_k> directly,
  cost m n K per example.

`*_token_dots` return the per-token terms [B, T, K]; `reduce_tokens` sums them into examples: per row (padded
batches), or per sequence with `Segments.sum` (packed batches: `segments`). This file is the reference the Triton
dot kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsel.engine import linear_math
from fastsel.engine.segments import Segments


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _packed(segments: Segments | None) -> bool:
    return segments is not None and segments.packed


def reduce_tokens(token_dots: Tensor, segments: Segments | None = None) -> Tensor:
    """[B, T, K] per-token terms -> [B, K] per-example dots (packed `segments`: [S, K], one per sequence)."""
    return segments.sum(token_dots) if _packed(segments) else token_dots.sum(dim=1)


def linear_token_dots(x: Tensor, delta: Tensor, refs: Tensor) -> Tensor:
    """delta_t^T R_k x_t for every token t and reference k of a Linear weight site: [B, T, K] fp32."""
    b, t, n = x.shape
    m = delta.shape[2]
    k = refs.shape[0]
    x32, d32, r32 = _fp32(x), _fp32(delta), _fp32(refs)
    if m <= n:  # project x onto R's rows: [B*T, n] @ [n, K*m]
        proj = (x32.reshape(b * t, n) @ r32.reshape(k * m, n).T).view(b, t, k, m)
        return (proj * d32[:, :, None, :]).sum(dim=-1)
    proj = (d32.reshape(b * t, m) @ r32.permute(1, 0, 2).reshape(m, k * n)).view(b, t, k, n)
    return (proj * x32[:, :, None, :]).sum(dim=-1)


def linear_dots(x: Tensor, delta: Tensor, refs: Tensor, segments: Segments | None = None) -> Tensor:
    """<G_i, R_k> of a Linear weight site without building G_i: [B, K] fp32 ([S, K] for packed `segments`)."""
    return reduce_tokens(linear_token_dots(x, delta, refs), segments)


def embedding_token_dots(ids: Tensor, delta: Tensor, refs: Tensor) -> Tensor:
    """delta_t . R_k[id_t] for every token of an Embedding call: [B, T, K] fp32."""
    b, t, d = delta.shape
    rows = _fp32(refs)[:, ids.reshape(-1)]  # [K, B*T, d]
    return (rows * _fp32(delta).reshape(1, b * t, d)).sum(dim=-1).T.reshape(b, t, -1)


def bias_token_dots(delta: Tensor, refs: Tensor) -> Tensor:
    """delta_t . r_k for every token of a Linear call (its bias): [B, T, K] fp32."""
    return _fp32(delta) @ _fp32(refs).T


def grads_dots(grads: Tensor, refs: Tensor) -> Tensor:
    """<G_i, R_k> from instantiated per-example gradients [B, *shape] and references [K, *shape]: [B, K] fp32."""
    return _fp32(grads).flatten(1) @ _fp32(refs).flatten(1).T


def sq_norms_and_dots(x: Tensor, delta: Tensor, refs: Tensor, method: str = "auto",
                      segments: Segments | None = None) -> tuple[Tensor, Tensor]:
    """(||G_i||^2 [B], <G_i, R_k> [B, K]) of a Linear weight site: where the norm's cheapest form instantiates
    G_i the dots reuse it; otherwise (Gram, T == 1) they come from the per-token form. Packed `segments`: one
    example per sequence ([S], [S, K]), the form chosen by the longest sequence."""
    if _packed(segments):
        if method == "auto":
            method = linear_math.choose_method(segments.max_length, delta.shape[2], x.shape[2])
        if method == "instantiate":
            grads = linear_math.segment_grads(x, delta, segments)
            return grads.square().sum(dim=(1, 2)), grads_dots(grads, refs)
        return linear_math.segment_sq_norms(x, delta, segments), linear_dots(x, delta, refs, segments)
    if method == "auto":
        method = linear_math.choose_method(x.shape[1], delta.shape[2], x.shape[2])
    if method == "instantiate":
        grads = linear_math.per_example_grads(x, delta)
        return grads.square().sum(dim=(1, 2)), grads_dots(grads, refs)
    return linear_math.sq_norms(x, delta, method), linear_dots(x, delta, refs)


__all__ = ["bias_token_dots", "embedding_token_dots", "grads_dots", "linear_dots", "linear_token_dots",
           "reduce_tokens", "sq_norms_and_dots"]
