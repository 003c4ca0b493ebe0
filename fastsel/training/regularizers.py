"""Forgetting regularizers for fine-tuning: KL to the frozen reference model and EWC (diagonal Fisher).

- `kl_to_reference_loss`: mean over examples of the token-mean KL(p_ref || p_model) on each example's
  supervised positions (the positions where the task loss is defined). The reference is the same PEFT model
  with its adapter disabled (`model.disable_adapter()`), evaluated under no_grad, so it costs one extra
  forward and no memory for a second model. Forward KL(p_ref || p_model) is the distillation direction: it
  pulls the fine-tuned model back toward every token the base model found likely (mass covering), and its
  gradient is that of the cross-entropy to the reference distribution.
- `ewc_penalty`: the EWC term 1/2 * sum_j F_j (theta_j - theta*_j)^2 of Kirkpatrick et al. (2017), with the
  diagonal Fisher F and anchor theta* from the end of the previous task; `train` adds `ewc_coef` times it.
- `olora_penalty`: O-LoRA's loss terms (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model
  Continual Learning"): lambda_1 * sum over LoRA sites of sum_{j,k} |A_new A_old^T|_{jk} (the new task's lora_A
  rows kept orthogonal to the earlier tasks' subspaces, `previous`: their lora_A rows stacked per site) plus
  lambda_2 * sum over the new LoRA parameters of their L2 norm. `lora_a_weights` takes the snapshot.
- `diagonal_fisher`: the empirical diagonal Fisher F_j = (1/N) sum_i (dL_i/dtheta_j)^2, L_i the mean token
  loss of example i under its own labels, from one batched pass per batch with
  `fastsel.norm_pass(keep_grads=True)`, whose per-example gradients are exactly each example's own (no
  per-example loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastsel.engine.batch import collate
from fastsel.engine.losses import per_example_kl, supervised_positions
from fastsel.engine.model_io import forward_logits, model_device, prepare_for
from fastsel.engine.norms import norm_pass
from fastsel.training.rows import check_dataset
from fastsel.utils import eval_mode


def _reference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable):
        raise TypeError(
            "the KL regularizer needs a PEFT model (the reference is the model under "
            f"model.disable_adapter()); got {type(model).__name__}: pass reference=<frozen model> instead"
        )
    return disable()


def kl_per_example(model: nn.Module, batch: Mapping[str, Tensor], *, logits: Tensor | None = None,
                   reference: nn.Module | None = None) -> Tensor:
    """[B] token-mean KL(p_ref || p_model) over each example's supervised (shifted) positions, in fp32.

    `logits` are the model's logits on `batch` when already computed (with grad), saving a forward. The
    reference logits come from `reference` if given, else from `model` under `disable_adapter()`, no grad.
    """
    prepared = prepare_for(model, batch)
    if logits is None:
        logits = forward_logits(model, prepared)
    with torch.no_grad():
        if reference is not None:
            ref_logits = forward_logits(reference, prepared)
        else:
            with _reference_context(model):
                ref_logits = forward_logits(model, prepared)
    return per_example_kl(ref_logits[:, :-1], logits[:, :-1], supervised_positions(prepared["labels"])[:, :-1],
                          prepared["segments"])


def kl_to_reference_loss(model: nn.Module, batch: Mapping[str, Tensor], *, logits: Tensor | None = None,
                         reference: nn.Module | None = None) -> Tensor:
    """Scalar: mean over examples of `kl_per_example` (the same averaging as the task loss)."""
    return kl_per_example(model, batch, logits=logits, reference=reference).mean()


def check_ewc_state(model: nn.Module, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> None:
    """Raise ValueError unless fisher and anchor are dicts of tensors for the same model parameters."""
    params = dict(model.named_parameters())
    if not isinstance(fisher, Mapping) or not isinstance(anchor, Mapping) or not fisher:
        raise ValueError("EWC needs ewc_fisher and ewc_anchor: dicts {parameter name: tensor} "
                         "(see diagonal_fisher)")
    if set(fisher) != set(anchor):
        raise ValueError(f"ewc_fisher and ewc_anchor name different parameters: "
                         f"{sorted(set(fisher) ^ set(anchor))[:5]}")
    for name, value in fisher.items():
        if name not in params:
            raise ValueError(f"EWC parameter {name!r} is not a parameter of the model")
        for what, t in (("ewc_fisher", value), ("ewc_anchor", anchor[name])):
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{what}[{name!r}] must be a tensor of shape {tuple(params[name].shape)}, "
                                 f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def ewc_penalty(model: nn.Module, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Tensor:
    """1/2 * sum over the named parameters of fisher * (param - anchor)^2 (a differentiable fp32 scalar)."""
    params = dict(model.named_parameters())
    total = torch.zeros((), device=model_device(model))
    for name, f in fisher.items():
        if name not in params:
            raise KeyError(f"EWC parameter {name!r} is not a parameter of the model")
        p = params[name]
        diff = p.float() - anchor[name].to(device=p.device, dtype=torch.float32)
        total = total + (f.to(device=p.device, dtype=torch.float32) * diff.square()).sum()
    return 0.5 * total


def anchor_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the trainable parameters: the EWC anchor theta* at the end of a task."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


def lora_a_weights(model: nn.Module) -> dict[str, Tensor]:
    """fp32 copies of the trainable lora_A weights [r, d_in] by parameter name: a task's subspaces for O-LoRA."""
    found = {name: p.detach().float().clone() for name, p in model.named_parameters()
             if p.requires_grad and ".lora_A." in name}
    if not found:
        raise ValueError("O-LoRA needs a PEFT LoRA model: no trainable lora_A weight found")
    return found


def check_olora_state(model: nn.Module, previous: Mapping[str, Tensor]) -> None:
    """Raise ValueError unless `previous` maps trainable lora_A weights of `model` to [r_old, d_in] tensors."""
    params = dict(model.named_parameters())
    if not isinstance(previous, Mapping) or not previous:
        raise ValueError("olora_previous must be a dict {lora_A parameter name: earlier tasks' rows [r_old, d_in]}")
    for name, old in previous.items():
        p = params.get(name)
        if p is None or ".lora_A." not in name:
            raise ValueError(f"olora_previous[{name!r}] is not a lora_A weight of the model")
        if not isinstance(old, Tensor) or old.dim() != 2 or old.shape[1] != p.shape[1]:
            raise ValueError(f"olora_previous[{name!r}] must be [r_old, {p.shape[1]}], got "
                             f"{tuple(old.shape) if isinstance(old, Tensor) else type(old).__name__}")


def olora_penalty(model: nn.Module, previous: Mapping[str, Tensor] | None, *, orth_coef: float,
                  l2_coef: float) -> Tensor:
    """orth_coef * sum_site sum |A_new A_old^T| + l2_coef * sum over trainable LoRA parameters of ||theta||_2.

    `previous`: {lora_A parameter name: the earlier tasks' lora_A rows stacked, [r_old, d_in]} (None or empty at
    the first task: no orthogonality term). A differentiable fp32 scalar."""
    total = torch.zeros((), device=model_device(model))
    params = dict(model.named_parameters())
    if orth_coef and previous:
        for name, old in previous.items():
            new = params[name].float()
            total = total + orth_coef * (new @ old.to(device=new.device, dtype=torch.float32).T).abs().sum()
    if l2_coef:
        for name, p in params.items():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                total = total + l2_coef * p.float().norm()
    return total


def _batches(data: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Tensor]], batch_size: int,
             pad_token_id: int) -> Iterable[Mapping[str, Tensor]]:
    """Yield ready batches: `data` is either batches of tensors or tokenized rows (validated, then padded)."""
    indexable = hasattr(data, "__len__") and hasattr(data, "__getitem__") and len(data) > 0
    if indexable and isinstance(data[0], Mapping) and not isinstance(data[0].get("input_ids"), Tensor):
        check_dataset(data)
        for start in range(0, len(data), batch_size):
            yield collate([data[i] for i in range(start, min(start + batch_size, len(data)))], pad_token_id)
        return
    yield from data


def diagonal_fisher(model: nn.Module, data: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Tensor]], *,
                    batch_size: int = 8, pad_token_id: int = 0, backend: str = "auto") -> dict[str, Tensor]:
    """Empirical diagonal Fisher of the trainable parameters: the mean of squared per-example gradients.

    `data`: tokenized rows ({"input_ids", "labels"} lists, as for `train`) or batches of tensors. The model
    runs in eval mode (no dropout) and is left as found; no `.grad` is written. Returns {name: fp32 tensor}.
    Memory: one batch's per-example gradients (batch_size x trainable parameters): meant for LoRA adapters.
    """
    sums: dict[str, Tensor] = {}
    count = 0
    with eval_mode(model):
        for batch in _batches(data, batch_size, pad_token_id):
            measured = norm_pass(batch, model, params="trainable", backend=backend, keep_grads=True)
            grads = measured.per_example_grads
            for name, g in grads.items():
                sq = g.float().square().sum(dim=0)
                sums[name] = sq if name not in sums else sums[name] + sq
            count += int(measured.losses.numel())  # examples: rows, or sequences of packed rows
    if count == 0:
        raise ValueError("diagonal_fisher got no examples")
    return {name: s / count for name, s in sums.items()}
