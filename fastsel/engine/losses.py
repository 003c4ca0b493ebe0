"""Per-example losses of a causal LM: L_i, the KL between two models' next-token distributions, finiteness checks.

Labels follow the transformers convention (shifted inside: position t predicts label t+1, -100 = unsupervised).
All math in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsel.engine.batch import IGNORE_INDEX


def per_example_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """L_i = mean token cross-entropy over example i's supervised positions, in fp32. Returns [B]."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts


def check_finite(values: Tensor, what: str) -> None:
    """Raise ValueError naming the examples whose `what` is NaN or infinite."""
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite {what} for example(s) {bad}: {values[bad].tolist()}")


def supervised_positions(labels: Tensor) -> Tensor:
    """[B, T] bool: the positions t whose next token (label t+1) is supervised, i.e. where L_i is defined."""
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return sel


def token_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) of the next-token distributions at every position ([..., V] logits -> [...]), in fp32."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def per_example_kl(logits_p: Tensor, logits_q: Tensor, positions: Tensor) -> Tensor:
    """[B] mean over each example's selected `positions` ([B, T] bool) of KL(p || q), in fp32."""
    kl = token_kl(logits_p, logits_q) * positions
    return kl.sum(dim=1) / positions.sum(dim=1)
