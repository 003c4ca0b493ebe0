"""Gradient alignment: reference gradients, and every example's exact <grad L_i, R> from one batched pass.

    R = fastsel.reference_gradient(refusal_batch, model)          # {name: fp32 gradient of the mean loss}
    dots = fastsel.grad_dots(batch, model, R)                      # [B]: <grad L_i, R>, exact
    measured = fastsel.norm_pass(batch, model, reference=[R_harm, R_safe])   # norms + [B, 2] dots, one pass

The dots come from the same captured (input, output-gradient) pairs as the norms (`fastsel.engine.dot_math`,
or the Triton kernels), so `norm_pass(..., reference=R)` still runs one forward and one backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fastsel.engine.losses import check_finite
from fastsel.engine.model_io import forward_losses, model_device, prepare_for
from fastsel.engine.norms import backward_keeping_grads, norm_pass, resolve_backend
from fastsel.engine.packed_attention import packed_attention
from fastsel.engine.references import ReferenceLike
from fastsel.engine.targets import find_targets

Batches = Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]


def _as_batches(batch: Batches) -> list[Mapping[str, Tensor]]:
    if isinstance(batch, Mapping):
        return [batch]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and batch:
        return list(batch)
    raise TypeError("the reference data must be a batch dict (input_ids, attention_mask, labels) or a non-empty "
                    f"list of them, got {type(batch).__name__}")


def reference_gradient(batch: Batches, model: nn.Module, *, params: str = "trainable", normalize: bool = False,
                       backend: str = "auto", memory_budget_bytes: int = 1 << 30) -> dict[str, Tensor]:
    """The fp32 gradient of the mean per-example loss over a reference batch (or a list of batches, averaged over
    all their examples; padded or packed batches, a packed sequence being one example), as {parameter name: tensor}
    over the parameters of `params` - the form `grad_dots`, `norm_pass(reference=...)` and the reference
    strategies take. The model is left as found (no `.grad` written,
    modes unchanged); it runs in its current mode (wrap it in `fastsel.utils.eval_mode` for a dropout-free R).

    `normalize=True` gives He et al.'s anchor direction instead: the mean over the examples of their unit
    gradients, (1/N) sum_j grad L_j / ||grad L_j|| (a zero gradient counts as 0): from one norm pass keeping the
    per-example gradients when they fit in `memory_budget_bytes`, else from a norm pass and a pass of the
    1/||grad L_j||-weighted loss (same dropout masks in both: the RNG is replayed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batches = _as_batches(batch)
    targets = find_targets(model, params)
    device = model_device(model)
    prepared = [prepare_for(model, b) for b in batches]  # every batch checked before anything runs
    total = sum(len(p["segments"]) for p in prepared)  # examples: rows, or the sequences of packed rows
    backend = resolve_backend(backend, model)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    summed: list[Tensor | None] = [None] * len(targets)
    numel = sum(t.param.numel() for t in targets)
    for raw, ready in zip(batches, prepared, strict=True):
        rows = len(ready["segments"])
        if normalize and rows * numel * 4 <= memory_budget_bytes:  # one pass: the unit per-example gradients
            measured = norm_pass(raw, model, backend="torch" if backend == "naive" else backend, targets=targets,
                                 keep_grads=True)
            unit = torch.where(measured.norms > 0, 1.0 / measured.norms.clamp_min(torch.finfo(torch.float32).tiny),
                               0.0) / total
            for j, t in enumerate(targets):
                g = torch.tensordot(unit, measured.per_example_grads[t.name].float(), dims=1)
                summed[j] = g if summed[j] is None else summed[j] + g
            continue
        weights = torch.full((rows,), 1.0 / total, device=device)
        with torch.random.fork_rng(devices=rng_devices, enabled=normalize):
            if normalize:  # this pass's dropout masks are replayed by the weighted pass below
                norms = norm_pass(raw, model, backend="torch" if backend == "naive" else backend,
                                  targets=targets).norms
                weights = torch.where(norms > 0, weights / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        with packed_attention(model, ready["segments"].packed):
            losses = forward_losses(model, ready)[0]
            grads = backward_keeping_grads((losses * weights.to(losses.dtype)).sum(), model,
                                           [t.param for t in targets])
        check_finite(losses.detach(), "reference loss")
        for j, g in enumerate(grads):
            if g is not None:
                summed[j] = g.float() if summed[j] is None else summed[j] + g.float()
    return {t.name: (torch.zeros(t.shape, device=device) if g is None else g.detach())
            for t, g in zip(targets, summed, strict=True)}


def grad_dots(batch: Mapping[str, Tensor], model: nn.Module, reference: ReferenceLike, *,
              params: str = "trainable", backend: str = "auto") -> Tensor:
    """Exact <grad L_i, R> for every example i of `batch`, fp32: [B] for one reference dict, [B, K] for a list.

    One batched forward and backward (`norm_pass(..., reference=...)`, which also gives the norms, hence the
    cosines). The model is left exactly as found, also on error; a reference whose keys, shapes or values do not
    fit the parameters raises before the model runs, naming the parameter.
    """
    return norm_pass(batch, model, params=params, backend=backend, reference=reference).dots


__all__ = ["grad_dots", "reference_gradient"]
