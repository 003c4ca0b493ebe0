"""Per-example losses of a causal LM: L_i, the KL between two models' next-token distributions, finiteness checks.

Labels follow the transformers convention (shifted inside: position t predicts label t+1, -100 = unsupervised).
All math in fp32 whatever the logits' dtype. On a packed batch (several sequences per row) the per-token values are
reduced per sequence by its `Segments` (a sequence's first label is masked by `prepare_batch`, so a supervised
position t and its target t+1 always lie in the same sequence).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsel.engine.batch import IGNORE_INDEX
from fastsel.engine.segments import Segments

CE_CHUNK_ROWS = 64  # positions per chunk of the cross-entropy: a [64, V] fp32 block stays in cache


class _TokenCrossEntropy(torch.autograd.Function):
    """Cross-entropy of every position, [K, V] logits (any float dtype) and [K] targets (-100: ignored, loss 0)
    -> [K] fp32, chunk by chunk. Saves only the logits and each row's log-sum-exp: no [K, V] log-probabilities
    kept from the forward, no zero-filled [K, V] gradient in the backward (softmax - one-hot is written directly), no
    fp32 copy of bf16 logits; on a CPU this was a quarter of the loss's cost (benchmarks/README.md, profile)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        safe = targets.clamp_min(0)[:, None]
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            end = start + CE_CHUNK_ROWS
            block = logits[start:end].float()
            # log_softmax, not logsumexp: its kernel works row by row, so a row's result never depends on which
            # other rows share its chunk (a generic reduction may split short chunks differently)
            picked = torch.log_softmax(block, dim=-1).gather(1, safe[start:end])[:, 0]
            loss[start:end] = -picked
            lse[start:end] = block.gather(1, safe[start:end])[:, 0] - picked
        ctx.save_for_backward(logits, targets, lse)
        return loss.masked_fill_(targets == IGNORE_INDEX, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        weight = torch.where(targets != IGNORE_INDEX, grad.float(), 0.0)
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            end = start + CE_CHUNK_ROWS
            block = torch.exp(logits[start:end].float() - lse[start:end, None]).mul_(weight[start:end, None])
            block.scatter_add_(1, targets[start:end].clamp_min(0)[:, None], -weight[start:end, None])
            out[start:end] = block
        return out, None


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy in fp32: logits [..., V], targets [...] (-100: ignored, 0) -> [...]. Under
    torch.func transforms (vmap/grad: the bench's vmap baseline), which custom autograd Functions do not join,
    the same math through `F.cross_entropy`."""
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if torch._C._functorch.is_functorch_wrapped_tensor(flat_logits):
        flat = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    else:
        flat = _TokenCrossEntropy.apply(flat_logits, flat_targets)
    return flat.view(targets.shape)


def _shifted(logits: Tensor, labels: Tensor, columns: Tensor | None) -> tuple[Tensor, Tensor]:
    """The logits that predict a label and those labels: every position but the last ([R, N-1, V], [R, N-1]),
    or, when the logits hold only the positions `columns` ([R, K, V]), the labels after those ([R, K])."""
    if columns is None:
        return logits[:, :-1, :], labels[:, 1:]
    return logits, labels[:, columns + 1]


def _per_position(values: Tensor, columns: Tensor | None, width: int) -> Tensor:
    """[R, K] values of the shifted positions (all, or `columns`) placed on the batch's [R, N] positions, 0 elsewhere."""
    if columns is None:
        return F.pad(values, (0, 1))
    return values.new_zeros((values.shape[0], width)).index_copy(1, columns, values)


def per_example_losses(logits: Tensor, labels: Tensor, segments: Segments | None = None,
                       columns: Tensor | None = None) -> Tensor:
    """L_i = mean token cross-entropy over example i's supervised positions, in fp32. Returns [B] (one example
    per row) or [S] (a packed batch's `segments`: one example per sequence). `columns`: the logits hold only these
    positions (`model_io.forward_supervised`: where some row's next label is supervised); the others contribute
    nothing to any L_i, so the result is the same."""
    shift_logits, shift_labels = _shifted(logits, labels, columns)
    token_loss = token_cross_entropy(shift_logits, shift_labels)
    supervised = shift_labels != IGNORE_INDEX
    if segments is not None and segments.packed:
        width = labels.shape[1]
        return segments.sum(_per_position(token_loss, columns, width)) / \
            segments.sum(_per_position(supervised.float(), columns, width))
    return token_loss.sum(dim=1) / supervised.sum(dim=1)


@torch.no_grad()
def token_statistics(logits: Tensor, labels: Tensor, segments: Segments, columns: Tensor | None = None
                     ) -> dict[str, Tensor]:
    """Per-example sums over the supervised positions, [S] fp32 each: `tokens` (supervised positions), `correct`
    (top-1 prediction == label) and `entropy` (of the next-token distribution): TRL's logged token metrics.
    `columns` as in `per_example_losses`."""
    shift_logits, shift_labels = _shifted(logits, labels, columns)
    positions = shift_labels != IGNORE_INDEX
    picked = shift_logits[positions].float()
    log_p = F.log_softmax(picked, dim=-1)
    per_token = torch.zeros((3, *shift_labels.shape), device=logits.device)
    per_token[0][positions] = -(log_p.exp() * log_p).sum(dim=-1)
    per_token[1][positions] = (picked.argmax(dim=-1) == shift_labels[positions]).float()
    per_token[2] = positions.float()
    width = labels.shape[1]
    sums = segments.sum(torch.stack([_per_position(v, columns, width) for v in per_token], dim=-1))
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
