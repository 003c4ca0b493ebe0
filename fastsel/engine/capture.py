"""Hook lifecycle: capture, per module call, the layer input and (during backward) its output gradient.

A forward hook on every module that owns a target parameter keeps the call's input and registers a tensor hook on
the call's output; when backward reaches that output, the tensor hook hands (module, input, output-grad) to a sink.
Input and gradient of one call travel together in a closure, which gives three properties for free:
- a module called several times per forward (tied or reused modules) reports each call separately;
- non-reentrant gradient checkpointing (transformers' default) re-runs forward hooks during backward, but the
  recomputed outputs are never back-propagated, so their tensor hooks never fire: each activation counts once;
- reentrant checkpointing runs the first forward without grad (no hook registered) and the recompute with grad.
All hooks are removed on exit, also when an exception is raised; nothing on the model is changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

Sink = Callable[[nn.Module, Tensor, Tensor], None]


class HookContext:
    """Base of fastsel's hook context managers: `install` registers hooks (their handles in `_handles`); all are
    removed on exit, also when installing or the block raises."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> HookContext:
        try:
            self.install()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Capture(HookContext):
    """Context manager installing the capture hooks on `modules`; `sink(module, input, grad_output)` gets each call.

    `forward_calls[module]` counts the calls made while `counting` is true whose outputs require grad: after the
    forward phase it says how many gradient contributions each module will send (0 under reentrant checkpointing,
    where they come from the recompute instead).
    """

    def __init__(self, modules: Iterable[nn.Module], sink: Sink) -> None:
        super().__init__()
        self.modules = list(dict.fromkeys(modules))
        self.sink = sink
        self.counting = True
        self.forward_calls: Counter[nn.Module] = Counter()

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        inp = args[0] if args else kwargs["input"]
        inp = inp.detach()
        if self.counting:
            self.forward_calls[module] += 1
        sink = self.sink

        def on_grad(grad: Tensor) -> None:
            sink(module, inp, grad)

        output.register_hook(on_grad)

    def install(self) -> None:
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))

    def __enter__(self) -> Capture:
        super().__enter__()
        return self
