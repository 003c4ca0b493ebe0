"""Per-example losses of a causal LM: L_i, the KL between two models' next-token distributions, finiteness checks.

Labels follow the transformers convention (shifted inside: position t predicts label t+1, -100 = unsupervised).
All math in fp32 whatever the logits' dtype. On a packed batch (several sequences per row) the per-token values are
reduced per sequence by its `Segments` (a sequence's first label is masked by `prepare_batch`, so a supervised
position t and its target t+1 always lie in the same sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsel.engine.batch import IGNORE_INDEX
from fastsel.engine.segments import Segments


def per_example_losses(logits: Tensor, labels: Tensor, segments: Segments | None = None) -> Tensor:
    """L_i = mean token cross-entropy over example i's supervised positions, in fp32. Returns [B] (one example
    per row) or [S] (a packed batch's `segments`: one example per sequence)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    supervised = shift_labels != IGNORE_INDEX
    if segments is not None and segments.packed:
        return segments.sum(F.pad(token_loss, (0, 1))) / segments.sum(F.pad(supervised, (0, 1)))
    return token_loss.sum(dim=1) / supervised.sum(dim=1)


@torch.no_grad()
def token_statistics(logits: Tensor, labels: Tensor, segments: Segments) -> dict[str, Tensor]:
    """Per-example sums over the supervised positions, [S] fp32 each: `tokens` (supervised positions), `correct`
    (top-1 prediction == label) and `entropy` (of the next-token distribution): TRL's logged token metrics."""
    positions = supervised_positions(labels)
    picked = logits[positions].float()
    log_p = F.log_softmax(picked, dim=-1)
    per_token = torch.zeros((2, *labels.shape), device=logits.device)
    per_token[0][positions] = -(log_p.exp() * log_p).sum(dim=-1)
    per_token[1][positions] = (picked.argmax(dim=-1) == labels[:, 1:][positions[:, :-1]]).float()
    sums = segments.sum(torch.cat([per_token.permute(1, 2, 0), positions[..., None].float()], dim=-1))
    return {"entropy": sums[:, 0], "correct": sums[:, 1], "tokens": sums[:, 2]}


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


def per_example_kl(logits_p: Tensor, logits_q: Tensor, positions: Tensor, segments: Segments | None = None) -> Tensor:
    """[B] mean over each example's selected `positions` ([B, T] bool) of KL(p || q), in fp32 (per sequence of a
    packed batch with its `segments`; T may be the batch's width or one less, the shifted positions)."""
    kl = token_kl(logits_p, logits_q) * positions
    if segments is not None and segments.packed:
        pad = (0, segments.width - kl.shape[1])
        return segments.sum(F.pad(kl, pad)) / segments.sum(F.pad(positions, pad))
    return kl.sum(dim=1) / positions.sum(dim=1)
