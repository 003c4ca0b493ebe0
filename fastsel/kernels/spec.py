"""What a kernel file declares about each kernel family it provides: a `KernelSpec`.

A family is one way of launching the kernels as the engine asks for it ('instantiate', 'segment_gram', 'dots', ...;
`fastsel.engine.backends` asks `usable(family, ...)` before it launches). Its spec names the public entry point
(the launcher in `fastsel.kernels`), the self-test case that runs it on small inputs against the naive torch
reference (`reference.py`), and the launch sites the ahead-of-time compile sweep (`tools/kernels_aot.py --quick`)
builds for it. The first-use self-test (`fastsel.engine.kernel_selftest`) and the sweep iterate the specs
(`fastsel.kernels.specs()`); a new kernel family is a new spec in its kernel file and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .reference import Case


@dataclass(frozen=True)
class AotSite:
    """One Linear site as the launchers see it: x [B, T, n], delta [B, T, m], dtypes, and what is asked.

    `segments` > 0: a packed batch, that many (row, start, end) sequences of at most `max_length` tokens over the
    B rows (the launch then has one program row per sequence); 0: one example per row (`has_range`: its valid
    tokens)."""

    label: str
    t: int
    m: int
    n: int
    x_dtype: str = "float32"
    delta_dtype: str = "float32"
    method: str = "auto"
    has_range: bool = True
    write_grads: bool = False
    segments: int = 0
    max_length: int | None = None
    dots: int = 0  # K > 0: the dot launch of the site with K references (method 'instantiate' or 'project')


@dataclass(frozen=True)
class KernelSpec:
    """One kernel family: its launcher, its self-test case and its ahead-of-time launch sites."""

    family: str
    launcher: str  # the public entry point in fastsel.kernels that the family's launches go through
    selftest: Callable[[Case], None]  # runs the launcher on `case` and raises KernelMismatch on a difference
    aot_sites: tuple[AotSite, ...] = ()  # the family adds no launch of its own when empty (e.g. grouped)


__all__ = ["AotSite", "KernelSpec"]
