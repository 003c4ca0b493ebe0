"""Per-example gradient math of a Linear-like site, in plain PyTorch.

A Linear layer applied over a sequence has, for example i, the weight gradient G_i = sum_t delta_{i,t} x_{i,t}^T,
with x [B, T, n] its input and delta [B, T, m] the gradient of the loss w.r.t. its output. These functions return
||G_i||_F^2 for every i, accumulated in fp32 whatever the input dtype. They are the `torch` backend of fastsel and the
reference every Triton kernel in `fastsel.kernels` is tested against.

- instantiate: build G_i (cost ~ B*T*m*n, memory B*m*n), cheap when m or n is small (LoRA factors);
- gram: sum_{t,s} <delta_t, delta_s><x_t, x_s> (cost ~ B*T^2*(m+n), memory B*T^2), cheap for short T;
- outer: T == 1, where ||delta x^T|| = ||delta|| * ||x|| is exact.

On a packed batch (several sequences per row) example i is a segment of a row (`fastsel.engine.segments`): the
`segment_*` functions form G_i from that segment's tokens only, choosing the form per segment by its own length, so
no padding is ever multiplied and nothing of size (#segments x N) or R x N x N is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsel.engine.segments import Segments
from fastsel.kernels.cost import choose_method, gram_cost, instantiate_cost  # noqa: F401  (the one cost rule)


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def per_example_grads(x: Tensor, delta: Tensor) -> Tensor:
    """G_i = sum_t delta_t x_t^T for every example: [B, m, n] in fp32."""
    return torch.bmm(_fp32(delta).transpose(1, 2), _fp32(x))


def sq_norms_instantiate(x: Tensor, delta: Tensor) -> Tensor:
    """||G_i||^2 by building G_i: [B] fp32."""
    return per_example_grads(x, delta).square().sum(dim=(1, 2))


def sq_norms_gram(x: Tensor, delta: Tensor) -> Tensor:
    """||G_i||^2 = sum_{t,s} <delta_t, delta_s><x_t, x_s>: [B] fp32."""
    x32, d32 = _fp32(x), _fp32(delta)
    gram_x = torch.bmm(x32, x32.transpose(1, 2))
    gram_d = torch.bmm(d32, d32.transpose(1, 2))
    return (gram_x * gram_d).sum(dim=(1, 2))


def sq_norms_outer(x: Tensor, delta: Tensor) -> Tensor:
    """T == 1: ||delta x^T||^2 = ||delta||^2 ||x||^2 exactly. [B] fp32."""
    if x.shape[1] != 1:
        raise ValueError(f"the outer-product form is exact only for T == 1, got T = {x.shape[1]}")
    return _fp32(x).square().sum(dim=(1, 2)) * _fp32(delta).square().sum(dim=(1, 2))


def sq_norms(x: Tensor, delta: Tensor, method: str = "auto") -> Tensor:
    """Exact per-example ||G_i||^2 of a Linear site by the chosen (or cheapest) method. [B] fp32."""
    if x.dim() != 3 or delta.dim() != 3 or x.shape[:2] != delta.shape[:2]:
        raise ValueError(f"expected x [B, T, n] and delta [B, T, m], got {tuple(x.shape)} and {tuple(delta.shape)}")
    if method == "auto":
        method = choose_method(x.shape[1], delta.shape[2], x.shape[2])
    if method == "instantiate":
        return sq_norms_instantiate(x, delta)
    if method == "gram":
        return sq_norms_gram(x, delta)
    if method == "outer":
        return sq_norms_outer(x, delta)
    raise ValueError(f"unknown method {method!r}: expected 'auto', 'instantiate', 'gram' or 'outer'")


def segment_grads(x: Tensor, delta: Tensor, segments: Segments) -> Tensor:
    """G_i = sum over segment i's tokens of delta_t x_t^T, for x [R, N, n], delta [R, N, m]: [S, m, n] fp32."""
    out = torch.empty((len(segments), delta.shape[-1], x.shape[-1]), dtype=torch.float32, device=x.device)
    for i, (xs, ds) in enumerate(zip(segments.views(x), segments.views(delta), strict=True)):
        torch.mm(_fp32(ds).T, _fp32(xs), out=out[i])
    return out


def segment_sq_norms(x: Tensor, delta: Tensor, segments: Segments) -> Tensor:
    """||G_i||^2 of every segment by the cheapest exact form for its length (x [R, N, n], delta [R, N, m]): [S].

    The instantiated G_i go into one [S, m, n] buffer (one matmul per segment, written in place) and are reduced
    at once; only segments where the Gram form is cheaper (long sequences of a full-size layer) run it on their own.
    """
    m, n = delta.shape[-1], x.shape[-1]
    instantiate = [i for i, t in enumerate(segments.lengths) if choose_method(t, m, n) != "gram"]
    grads = torch.empty((len(instantiate), m, n), dtype=torch.float32, device=x.device)
    slot = {i: k for k, i in enumerate(instantiate)}
    sq = torch.empty(len(segments), dtype=torch.float32, device=x.device)
    for i, (xs, ds) in enumerate(zip(segments.views(x), segments.views(delta), strict=True)):
        xs, ds = _fp32(xs), _fp32(ds)
        if i in slot:  # instantiate (a single token's outer product included)
            torch.mm(ds.T, xs, out=grads[slot[i]])
        else:
            sq[i] = (xs @ xs.T * (ds @ ds.T)).sum()
    if instantiate:
        sq[instantiate] = grads.square().sum(dim=(1, 2))
    return sq
