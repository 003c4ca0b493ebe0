"""A kernel launch described as data: which kernel, grid, arguments, constexprs and warps.

The launchers in `linear_norm.py` and `gram_norm.py` build a `Launch` and run it; `aot.py` builds the same `Launch`
from meta tensors and compiles it ahead of time for a GPU target instead. One description, so that what is
compiled offline is exactly what would be launched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Launch:
    """`kernel[grid](*args, **constexprs, num_warps=num_warps)`, not yet run."""

    kernel: Any  # a triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


__all__ = ["Launch"]
