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

import weakref
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
    where they come from the recompute instead). `chain_inputs()` then names the tensors a backward must reach so
    that every hooked call receives its output gradient, when the hooked calls form input -> output chains.
    """

    def __init__(self, modules: Iterable[nn.Module], sink: Sink) -> None:
        super().__init__()
        self.modules = list(dict.fromkeys(modules))
        self.sink = sink
        self.counting = True
        self.forward_calls: Counter[nn.Module] = Counter()
        # (input, output) of the counted calls, as passed; weak, so no activation outlives its use in the graph
        self._calls: list[tuple[weakref.ref[Tensor], weakref.ref[Tensor]]] = []

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        inp = args[0] if args else kwargs["input"]
        if self.counting:
            self.forward_calls[module] += 1
            self._calls.append((weakref.ref(inp), weakref.ref(output)))
        inp = inp.detach()
        sink = self.sink

        def on_grad(grad: Tensor) -> None:
            sink(module, inp, grad)

        output.register_hook(on_grad)

    def chain_inputs(self) -> list[Tensor] | None:
        """Outputs of hooked calls that are the input of another hooked call (PEFT LoRA: each lora_A output is
        its lora_B's input), when every counted call either produced one of them or consumed one; else None.

        A backward restricted to these tensors (`torch.autograd.backward(..., inputs=...)`) passes through every
        hooked call's output, so every capture hook fires, yet computes no parameter gradient: the norm pass
        forms per-example gradients itself and does not need autograd's batch gradient too."""
        calls = [(inp(), out()) for inp, out in self._calls]  # dead: not kept by the graph, so in no chain
        consumed = {id(inp) for inp, _ in calls if inp is not None}
        chain = [out for _, out in calls if out is not None and id(out) in consumed]
        ends = {id(t) for t in chain}
        if not calls or any(id(inp) not in ends and id(out) not in ends for inp, out in calls):
            return None
        return chain

    def install(self) -> None:
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))

    def __enter__(self) -> Capture:
        super().__enter__()
        return self
