"""The selective step under FSDP2 (`fully_shard`): sharded `.grad`, one reduce-scatter per accumulation window.

What fastsel does differently from DDP, and why (the simplest exact path):
- Every pass differentiates the unsharded leaves with `torch.autograd.grad` (fastsel.engine.sharded), so FSDP's
  own post-backward finds no gradient and reduce-scatters nothing; fastsel gets this rank's full-size local
  gradient of its selected rows (single pass: the kept per-example gradients; two pass: a backward of those rows).
- A call adds this rank's contribution, `scale / kept_global x` its rows' summed gradient, to a full-size fp32
  buffer that fastsel owns (not to `.grad`). A `sync=True` call ends by reduce-scattering (sum) the buffer over
  the parameter's device mesh and adding the result to the sharded `.grad` - so `.grad` gains exactly the shard of
  `scale x` the kept-mean gradient over all ranks' selected examples. FSDP's averaging divide factor plays no
  part: the division by the global kept count is fastsel's.
- `sync=False` communicates no gradient: the contribution stays in the buffer (one unsharded fp32 copy of the
  trainable parameters per rank - what FSDP's own `set_requires_gradient_sync(False)` accumulation keeps too), and
  the next `sync=True` call reduce-scatters the whole window once. An optimizer step while a buffer is pending
  raises UnreducedGradientError (`training.window`'s guard); `zero_grad()` (set_to_none True or False) drops the window: a `sync=False` call
  makes sure `.grad` exists (zeros) so that zeroing it is visible, and a changed `.grad` that is all zeros on every
  rank (checked at the next `sync=True` call, with one small all-gather) ends the window.
- FSDP's `set_requires_gradient_sync` does not affect selective_backward (it leaves FSDP nothing to reduce); it
  still governs plain `loss.backward()` calls the user mixes in, which FSDP accumulates and reduces itself.
- The device mesh of every sharded parameter must span all ranks (FSDP or HSDP over the whole world): global
  selection gathers over the default process group. Tensor/pipeline parallel meshes are refused.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fastsel.engine.targets import Target
from fastsel.training import distributed
from fastsel.training import window as accumulation


@dataclass
class _Pending:
    """A parameter's unreduced window: the full-size fp32 sum of its contributions, and the `.grad` it was
    recorded against (weakly) with that tensor's version counter."""

    total: Tensor
    grad: weakref.ref
    version: int


_PENDING: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> _Pending (training.window guards the step)


def check_sharded_targets(targets: list[Target]) -> None:
    """Refuse parameters whose device mesh does not span every rank (tensor or pipeline parallelism)."""
    from torch.distributed.tensor import DTensor

    world = distributed.world_size()
    for t in targets:
        if isinstance(t.param, DTensor) and t.param.device_mesh.size() != world:
            raise NotImplementedError(
                f"parameter {t.name!r} is sharded over a device mesh of {t.param.device_mesh.size()} ranks, not "
                f"all {world}: fastsel supports FSDP2/HSDP over the whole world only (global selection gathers "
                "over every rank; tensor and pipeline parallelism shard examples' computations)")


def _zeros_like_param(p: Tensor) -> Tensor:
    """A zero gradient laid out like `p` (a DTensor with p's placements, or a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        local = torch.zeros_like(p.to_local())
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return torch.zeros_like(p)


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _window_state(p: Tensor) -> str:
    """'none', 'kept' (.grad untouched since recorded), 'changed' (touched: still pending unless all zeros
    on every rank) or 'dropped' (.grad set to None)."""
    pending = _PENDING.get(p)
    if pending is None:
        return "none"
    grad = p.grad
    if grad is None:
        return "dropped"
    if grad is pending.grad() and grad._version == pending.version:
        return "kept"
    return "changed"


def _forget(params: list[Tensor]) -> None:
    for p in params:
        _PENDING.pop(p, None)
    accumulation.disarm_if_idle()


def _locally_pending(p: Tensor) -> bool:
    state = _window_state(p)
    if state == "changed":
        return bool(_local(p.grad).any())
    return state == "kept"


def _step_pending(p: Tensor) -> bool:
    """The window guard's question: a `.grad` set to None drops the window, else `_locally_pending`."""
    if p not in _PENDING:
        return False
    if _window_state(p) == "dropped":
        _PENDING.pop(p, None)
        return False
    return _locally_pending(p)


accumulation.register_kind(accumulation.WindowKind(
    "fsdp2", _step_pending, lambda: len(_PENDING) > 0,
    lambda n: f"{n} FSDP2 parameter(s) hold gradients added by selective_backward(..., sync=False) that were never "
              "reduce-scattered over ranks"))


def has_pending(model: nn.Module) -> bool:
    """Whether a parameter of `model` holds a `sync=False` contribution not yet reduce-scattered (this rank)."""
    return any(_locally_pending(p) for p in model.parameters() if p in _PENDING)


def _still_pending(params: list[Tensor]) -> list[bool]:
    """Per parameter, whether its window is open - the same answer on every rank (an all-gather when a `.grad`
    was changed from outside since the window was recorded)."""
    if not any(p in _PENDING for p in params):  # the same on every rank: no sync=False call since the last sync
        return [False] * len(params)
    states = [_window_state(p) for p in params]
    changed = [i for i, s in enumerate(states) if s == "changed"]
    flags = [s == "kept" for s in states]
    if distributed.any_rank(bool(changed)):
        local = [int(states[i] == "changed" and bool(_local(params[i].grad).any())) for i in range(len(params))]
        everywhere = distributed.gather_ints(local)
        for i in changed:
            flags[i] = any(rank_flags[i] for rank_flags in everywhere)
    return flags


def apply_sharded(targets: list[Target], summed: list[Tensor | None], kept: int, scale: float,
                  sync: bool) -> None:
    """Add this rank's contribution of `scale` x kept-mean gradient to the window; with `sync`, reduce-scatter the
    window into the sharded `.grad` (module docstring). The same collectives on every rank: `kept` is global and
    the window state is agreed on."""
    params = [t.param for t in targets]
    open_window = _still_pending(params)
    _forget([p for p, still in zip(params, open_window, strict=True) if not still])
    contributions: list[Tensor | None] = [None] * len(params)
    if kept:
        factor = scale / kept
        contributions = [torch.zeros(p.shape, dtype=torch.float32, device=_local(p).device) if g is None
                         else g.float() * factor for p, g in zip(params, summed, strict=True)]
    with torch.no_grad():
        if sync:
            if kept or any(open_window):
                for p, contribution in zip(params, contributions, strict=True):
                    pending = _PENDING.get(p)
                    total = pending.total if pending is not None else None
                    if contribution is not None:
                        total = contribution if total is None else total + contribution
                    if total is None:
                        total = torch.zeros(p.shape, dtype=torch.float32, device=_local(p).device)
                    shard = distributed.reduce_to_shard(total, p)
                    _add_shard(p, shard)
            _forget(params)
            return
        if not kept:
            return
        for p, contribution in zip(params, contributions, strict=True):
            if p.grad is None:
                p.grad = _zeros_like_param(p)
            pending = _PENDING.get(p)
            total = contribution if pending is None else pending.total + contribution
            _PENDING[p] = _Pending(total, weakref.ref(p.grad), p.grad._version)
        accumulation.arm()


def _add_shard(p: Tensor, shard: Tensor) -> None:
    """`.grad += shard` in the parameter's dtype and layout (created when None)."""
    from torch.distributed.tensor import DTensor

    shard = shard.to(p.dtype)
    if isinstance(p, DTensor):
        value = DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride())
    else:
        value = shard
    if p.grad is None:
        p.grad = value
    else:
        p.grad.add_(value)
