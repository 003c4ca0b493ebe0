"""The reversion analysis (the paper's Appendix D): do high-norm samples pull the model back toward its
pretrained weights?

Gamma = theta_pretrained - theta_aligned over the full weights of chosen decoder layers (those the alignment
changed). For every training row, at the aligned model, one batched pass per batch
(`fastsel.engine.norms.norm_pass` with the chosen weights as the trainable parameters and [Gamma, Gamma on its top
k coordinates] as the references, the per-example gradients kept for the top-k norms) gives the exact dot
<grad L_i, Gamma> and the norm. A descent step on row i moves the weights along -grad L_i, toward the pretrained
model when <-grad L_i, Gamma> > 0: `cosine` is cos(-grad L_i, Gamma) and `topk_cosine` the same over the k
coordinates of largest |Gamma| (the paper's TopK-Cosine), so positive values mean "pulls back toward the pretrained
weights". `correlation` relates them to the gradient norm (Pearson and Spearman, percentile bootstrap CI).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastsel.engine.batch import collate
from fastsel.engine.norms import norm_pass
from fastsel.utils import eval_mode


def layer_weights(model: nn.Module, layers: Sequence[int], changed: Mapping[str, Tensor]) -> list[str]:
    """Names of the 2-D weights of decoder layers `layers` (negative: from the end) that `changed` differs on."""
    indices = sorted({int(m.group(1)) for n, _ in model.named_parameters()
                      if (m := re.search(r"\.layers\.(\d+)\.", n))})
    if not indices:
        raise ValueError("the model has no '.layers.<i>.' parameters to take the reversion direction over")
    wanted = {indices[i] for i in layers}
    names = [n for n, p in model.named_parameters()
             if p.dim() == 2 and (m := re.search(r"\.layers\.(\d+)\.", n)) and int(m.group(1)) in wanted
             and n in changed and bool((changed[n] != 0).any())]
    if not names:
        raise ValueError(f"no weight of decoder layers {sorted(wanted)} differs between the pretrained and the "
                         "aligned model: the reversion direction is zero there")
    return names


def reversion_direction(pretrained: nn.Module, aligned: nn.Module) -> dict[str, Tensor]:
    """Gamma = theta_pretrained - theta_aligned for every parameter the two models share by name (fp32)."""
    pre = dict(pretrained.named_parameters())
    return {n: (pre[n].detach().float() - p.detach().float()) for n, p in aligned.named_parameters() if n in pre}


def top_k_mask(gamma: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Boolean masks (per weight) of the k coordinates of largest |Gamma| over all the weights together."""
    flat = torch.cat([g.flatten().abs() for g in gamma.values()])
    k = min(k, flat.numel())
    top = torch.topk(flat, k).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[top] = True
    out, start = {}, 0
    for name, g in gamma.items():
        out[name] = mask[start:start + g.numel()].view_as(g)
        start += g.numel()
    return out


def reversion_scores(model: nn.Module, rows: Sequence[Mapping[str, Any]], gamma: Mapping[str, Tensor], *,
                     topk: int, batch_size: int, pad_token_id: int, backend: str = "auto") -> dict[str, list]:
    """Per row: dot <grad L_i, Gamma>, cos(-grad L_i, Gamma), the same over the top-k coordinates of |Gamma|, and
    the gradient norm over Gamma's weights.

    `model`'s trainable parameters must be exactly Gamma's weights (by name); it is left as found."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if sorted(names) != sorted(gamma):
        raise ValueError(f"the model's trainable parameters {names[:3]}... must be Gamma's weights "
                         f"{list(gamma)[:3]}...")
    masks = top_k_mask(gamma, topk)
    gamma_k = {n: g * masks[n] for n, g in gamma.items()}
    gamma_norm = float(torch.sqrt(sum(g.square().sum() for g in gamma.values())))
    gamma_k_norm = float(torch.sqrt(sum(g.square().sum() for g in gamma_k.values())))
    out: dict[str, list] = {"id": [], "dot": [], "cosine": [], "topk_cosine": [], "norm": []}
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = list(rows[start:start + batch_size])
            measured = norm_pass(collate(chunk, pad_token_id), model, params="trainable", backend=backend,
                                 keep_grads=True, reference=[dict(gamma), gamma_k])
            dots = measured.dots  # [B, 2]
            norms = measured.norms  # L2 norms over the chosen weights
            sub_sq = sum(measured.per_example_grads[n].float().square().mul(masks[n]).flatten(1).sum(1)
                         for n in gamma)
            for j, row in enumerate(chunk):
                out["id"].append(row["id"])
                out["dot"].append(float(dots[j, 0]))
                out["cosine"].append(-float(dots[j, 0]) / (float(norms[j]) * gamma_norm + 1e-30))
                out["topk_cosine"].append(-float(dots[j, 1]) / (float(sub_sq[j].sqrt()) * gamma_k_norm + 1e-30))
                out["norm"].append(float(norms[j]))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho uses them."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def correlation(x: Sequence[float], y: Sequence[float], *, method: str = "pearson", n_boot: int = 2000,
                seed: int = 0) -> dict[str, Any]:
    """{"r", "ci95": [lo, hi], "n"}: Pearson or Spearman correlation with a percentile bootstrap over pairs."""
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 3:
        raise ValueError(f"need two equal-length series of >= 3 values, got {a.shape} and {b.shape}")

    def stat(u: np.ndarray, v: np.ndarray) -> float:
        return _pearson(_ranks(u), _ranks(v)) if method == "spearman" else _pearson(u, v)

    rng = np.random.default_rng(seed)
    reps = [stat(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n_boot))]
    lo, hi = np.nanpercentile(reps, [2.5, 97.5])
    return {"r": stat(a, b), "ci95": [float(lo), float(hi)], "n": int(len(a))}


__all__ = ["correlation", "layer_weights", "reversion_direction", "reversion_scores", "top_k_mask"]
