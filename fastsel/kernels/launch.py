"""A kernel launch described as data: which kernel, grid, arguments, constexprs and warps.

The launchers in `linear_norm.py` and `gram_norm.py` build a `Launch` and run it; `aot.py` builds the same `Launch`
from meta tensors and compiles it ahead of time for a GPU target instead. One description, so that what is
compiled offline is exactly what would be launched. `site_args` is the argument prefix every norm kernel takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


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


def site_args(x: Tensor, delta: Tensor, ranges: Tensor | None, norms: Tensor) -> tuple[Any, ...]:
    """The arguments every norm kernel starts with: x, delta, segments, norms, T, M, N, x / delta / segment strides.

    Without `ranges` the segments pointer is a placeholder (norms) that the kernel never reads (HAS_RANGE False).
    """
    r = ranges if ranges is not None else norms
    return (
        x,
        delta,
        r,
        norms,
        x.shape[1],
        delta.shape[2],
        x.shape[2],
        x.stride(0),
        x.stride(1),
        x.stride(2),
        delta.stride(0),
        delta.stride(1),
        delta.stride(2),
        r.stride(0) if ranges is not None else 0,
    )


__all__ = ["Launch", "site_args"]
