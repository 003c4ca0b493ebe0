"""FSDP2 (`torch.distributed.fsdp.fully_shard`) in the engine: which tensors autograd really differentiates.

Under FSDP2 a module's registered parameters are sharded DTensors; during its forward FSDP swaps in the
all-gathered ("unsharded") parameter, and that plain tensor is the leaf autograd accumulates into. A backward
through `.backward()` would hand those gradients to FSDP, which reduce-scatters them (averaged over ranks) into
the sharded `.grad` - wasted communication for the norm pass, and the wrong gradient for selection (fastsel needs
this rank's unreduced share, to reduce once per accumulation window itself).

So for a sharded model fastsel records, in a forward pre-hook of every module owning a target parameter, the
tensor standing in the module's attribute at call time (the unsharded leaf), and differentiates with
`torch.autograd.grad` with respect to those leaves: autograd writes no `.grad`, FSDP finds no gradient to reduce,
and the result is this rank's full-size local gradient. The capture hooks see the same local activations as
without sharding, so norms are unchanged. (Reentrant activation checkpointing supports only `.backward()`: with
FSDP2 use the non-reentrant kind, transformers' default.)
"""

from __future__ import annotations

from torch import Tensor, nn

from fastsel.engine.capture import HookContext
from fastsel.engine.targets import Target


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` or one of its submodules is wrapped by FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


class ForwardLeaves(HookContext):
    """Context manager recording, per target, the leaf tensor its owner modules use during the forward.

    Only active for a sharded model (`is_sharded`); otherwise it installs nothing and `leaves()` returns the
    targets' parameters. A module called several times (or recomputed by non-reentrant checkpointing) uses the
    same unsharded leaf: the first one seen is kept, and a different one raises.
    """

    def __init__(self, model: nn.Module, targets: list[Target]) -> None:
        super().__init__()
        self.targets = targets
        self.active = is_sharded(model)
        self._seen: dict[str, Tensor] = {}

    def _pre_hook(self, name: str, attr: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            del args
            leaf = getattr(module, attr)
            seen = self._seen.setdefault(name, leaf)
            if seen is not leaf:
                raise RuntimeError(f"parameter {name!r} changed identity between calls within one forward "
                                   "(FSDP2 resharding inside the forward is not supported by fastsel)")

        return hook

    def install(self) -> None:
        if self.active:
            for target in self.targets:
                for _, module, role in target.owners:
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(target.name, role.name)))

    def __enter__(self) -> ForwardLeaves:
        super().__enter__()
        return self

    def leaves(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors to differentiate for `params` (target parameters): the unsharded leaf seen in the forward,
        else the parameter itself (not used by this forward: its gradient is None)."""
        if not self.active:
            return list(params)
        by_param = {id(t.param): self._seen.get(t.name, t.param) for t in self.targets}
        return [by_param[id(p)] for p in params]
