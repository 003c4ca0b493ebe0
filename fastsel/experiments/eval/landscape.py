"""Safety landscape (VISAGE; Peng et al. 2024, "Navigating the Safety Landscape: Measuring Risks in Finetuning
Large Language Models"): ASR along random directions in weight space, theta + alpha * d.

Directions are Gaussian, normalized per tensor to the norm of the weight they perturb (filter normalization,
Li et al. 2018, here per tensor), on the merged weights: for a LoRA layer the norm is that of
W + (active adapter deltas), and adding alpha * d to the base weight W moves the merged weight by exactly
alpha * d. Only floating-point matrices (>= 2-D) are perturbed; 1-D parameters (norms, biases) and the LoRA
factors are left alone, as Li et al. leave biases and normalization layers. Directions are regenerated from
(seed, direction, tensor index), never stored. Optional and slow: each alpha is a full ASR evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

ParamFilter = Callable[[str, Tensor], bool]


@dataclass
class _Target:
    name: str
    param: Tensor
    norm: float  # of the merged weight


def _lora_deltas(model: nn.Module) -> dict[int, Tensor]:
    """id(base weight) -> summed delta of the active, unmerged LoRA adapters on it."""
    out: dict[int, Tensor] = {}
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        get_delta = getattr(module, "get_delta_weight", None)
        if base is None or not callable(get_delta) or getattr(module, "merged", False):
            continue
        weight = getattr(base, "weight", None)
        adapters = [a for a in getattr(module, "active_adapters", []) if a in getattr(module, "lora_A", {})]
        if weight is None or not adapters or getattr(module, "disable_adapters", False):
            continue
        with torch.no_grad():
            out[id(weight)] = sum(get_delta(a).float() for a in adapters)
    return out


def default_param_filter(name: str, param: Tensor) -> bool:
    """Floating-point tensors with >= 2 dims that are not LoRA factors."""
    return param.is_floating_point() and param.dim() >= 2 and "lora_" not in name


def perturbation_targets(model: nn.Module, param_filter: ParamFilter | None = None) -> list[_Target]:
    """The tensors a direction perturbs, with the norms of their merged weights."""
    keep = param_filter or default_param_filter
    deltas = _lora_deltas(model)
    targets = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not keep(name, p):
                continue
            merged = p.float() + deltas[id(p)].to(p.device) if id(p) in deltas else p.float()
            targets.append(_Target(name, p, float(merged.norm())))
    if not targets:
        raise ValueError("no parameter to perturb (the filter excluded every tensor)")
    return targets


def _direction(target: _Target, seed: int, direction: int, index: int) -> Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + direction * 10_007 + index) % (2**63))
    d = torch.randn(target.param.shape, generator=g, dtype=torch.float32)
    d_norm = float(d.norm())
    return d * (target.norm / d_norm) if d_norm > 0 else d


@contextmanager
def perturbed_weights(model: nn.Module, alpha: float, *, direction: int = 0, seed: int = 0,
                      param_filter: ParamFilter | None = None, backup_device: str | torch.device | None = None
                      ) -> Iterator[nn.Module]:
    """Inside: each target weight W is W + alpha * d (direction `direction` of `seed`). On exit (also after an
    exception) every weight is copied back from a backup, so the model is restored bit for bit.
    backup_device: where the backup copies live (e.g. "cpu" to save accelerator memory); default the weight's."""
    targets = perturbation_targets(model, param_filter) if alpha != 0 else []  # alpha = 0 changes nothing
    backups: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for i, t in enumerate(targets):
                backups.append((t.param, t.param.detach().to(backup_device, copy=True) if backup_device
                                else t.param.detach().clone()))
                d = _direction(t, seed, direction, i)
                t.param.add_(d.to(device=t.param.device, dtype=t.param.dtype), alpha=alpha)
        yield model
    finally:
        with torch.no_grad():
            for param, backup in backups:
                param.copy_(backup)


def safety_landscape(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], judge: Any = None,
                     n_directions: int = 1, alphas: Sequence[float] = (-0.5, 0.0, 0.5), *, seed: int = 0,
                     max_new_tokens: int = 64, batch_size: int = 8, param_filter: ParamFilter | None = None,
                     backup_device: str | torch.device | None = None) -> dict[str, Any]:
    """ASR (%) at theta + alpha * d for each of `n_directions` random directions and each alpha.

    Returns {"alphas", "asr": [[ASR per alpha] per direction], "mean_asr": [per alpha], "visage": mean of
    (100 - ASR) over all sampled points (a VISAGE-style safety score of the neighbourhood), "n_directions",
    "seed", "n_tensors"}. alpha = 0 is evaluated once and shared by all directions. The weights are restored
    exactly afterwards.
    """
    from fastsel.experiments.eval.judges import RefusalJudge
    from fastsel.experiments.eval.safety import attack_success_rate

    if n_directions < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions}")
    judge = judge or RefusalJudge()
    n_tensors = len(perturbation_targets(model, param_filter))
    at_zero: float | None = None
    grid: list[list[float]] = []
    for k in range(n_directions):
        row = []
        for alpha in alphas:
            if alpha == 0 and at_zero is not None:
                row.append(at_zero)
                continue
            with perturbed_weights(model, float(alpha), direction=k, seed=seed, param_filter=param_filter,
                                   backup_device=backup_device):
                asr = attack_success_rate(model, tokenizer, prompts, judge, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)["asr"]
            if alpha == 0:
                at_zero = asr
            row.append(asr)
        grid.append(row)
    mean_asr = [sum(r[a] for r in grid) / len(grid) for a in range(len(alphas))]
    visage = sum(100.0 - x for r in grid for x in r) / (len(grid) * len(alphas))
    return {"alphas": [float(a) for a in alphas], "asr": grid, "mean_asr": mean_asr, "visage": visage,
            "n_directions": n_directions, "seed": seed, "n_tensors": n_tensors}
