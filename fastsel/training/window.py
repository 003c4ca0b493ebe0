"""The accumulation window's one guard: no optimizer step while a `sync=False` contribution is unreduced.

`selective_backward(..., sync=False)` leaves its share of the gradient unreduced over ranks until the window's last
micro-batch (`sync=True`) averages it: in `.grad` under DDP or a single process (`training.selective`), in a
full-size fp32 sum beside the sharded `.grad` under FSDP2 (`training.fsdp`). Each of the two records its own state
and registers here, as a `WindowKind`, how to ask whether a parameter is still pending; this module holds the one
global optimizer step pre-hook (registered only while some kind tracks a parameter) and the one error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle


class UnreducedGradientError(RuntimeError):
    """An optimizer step over gradients that `selective_backward(sync=False)` left unreduced across ranks (DDP-style
    `.grad` in fastsel.training.selective, FSDP2's window in fastsel.training.fsdp)."""


@dataclass(frozen=True)
class WindowKind:
    """One way of holding an open window: whether a parameter is still pending (forgetting stale state), whether
    any parameter is tracked at all, and the error's sentence for `n` pending parameters."""

    name: str
    pending: Callable[[Tensor], bool]
    active: Callable[[], bool]
    message: Callable[[int], str]


_KINDS: dict[str, WindowKind] = {}
_GUARD: RemovableHandle | None = None


def register_kind(kind: WindowKind) -> None:
    _KINDS[kind.name] = kind


def arm() -> None:
    """Register the step pre-hook (once) after a kind started tracking a parameter."""
    global _GUARD
    if _GUARD is None:
        _GUARD = register_optimizer_step_pre_hook(_refuse_unreduced_step)


def disarm_if_idle() -> None:
    """Remove the step pre-hook when no kind tracks any parameter (no cost for steps outside a window)."""
    global _GUARD
    if _GUARD is not None and not any(kind.active() for kind in _KINDS.values()):
        _GUARD.remove()
        _GUARD = None


def armed() -> bool:
    return _GUARD is not None


def _refuse_unreduced_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step pre-hook: raise when a parameter of `optimizer` still holds an unreduced contribution."""
    del args, kwargs
    params = [p for group in optimizer.param_groups for p in group["params"]]
    counts = {name: sum([kind.pending(p) for p in params]) for name, kind in _KINDS.items() if kind.active()}
    disarm_if_idle()
    problems = [_KINDS[name].message(n) for name, n in counts.items() if n]
    if problems:
        raise UnreducedGradientError("; ".join(problems) + ": the last micro-batch before optimizer.step() must "
                                     "call selective_backward(..., sync=True) (with the Trainer integration: "
                                     "accelerate's sync_gradients does this)")


__all__ = ["UnreducedGradientError", "WindowKind", "arm", "armed", "disarm_if_idle", "register_kind"]
