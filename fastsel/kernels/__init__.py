"""Triton kernels of fastsel (installed as `fastsel.kernels`): exact per-example gradient norms of Linear sites.

One op per file, Liger-Kernel style, kernel and launcher side by side:

- `linear_norm.py`: instantiate-in-registers and T == 1 kernels, and the `linear_sq_norms` launcher;
- `gram_norm.py`: the Gram ("ghost") kernel for short T and large m*n;
- `grouped.py`: `grouped_linear_sq_norms`, all same-shape sites of a model in one launch;
- `linear_dot.py`: per-example gradient dots <G_i, R_k> with reference gradients (fused with the instantiate
  norm, or the per-token delta^T R x contraction), per site and grouped.

Each of those files ends with its `SPECS`: one `spec.KernelSpec` per kernel family it provides (the launcher, a
self-test case against the naive torch reference of `reference.py`, and its ahead-of-time launch sites).
`specs()` collects them: the first-use self-test (`fastsel.engine.kernel_selftest`) and the compile sweep
(`tools/kernels_aot.py`) iterate them, so a new family is declared once, in its kernel file.

Every kernel reduces over examples given as token segments (row, start, end) of the rows: one per row (padded), or
several per row (packed, padding-free rows; `segments` or `cu_seqlens`), so packed batches need no padding.

This package imports only torch and triton, and triton lazily: `import fastsel.kernels` works without triton
(`available()` then says False) and the kernel modules are imported on the first kernel call, which raises a clear
ImportError when triton is missing. Lazy import also lets TRITON_INTERPRET=1 be set any time before that first call
(Triton reads it when a kernel is defined).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from .cost import choose_method

__all__ = ["available", "choose_method", "specs", "grouped_linear_sq_norms", "grouped_linear_sq_norms_dots", "installed",
           "interpreted", "linear_dots", "linear_sq_norms", "linear_sq_norms_dots", "segments_from_cu_seqlens"]

_TRITON_OK: bool | None = None


def _triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install failing at import
            _TRITON_OK = False
    return _TRITON_OK


def installed() -> bool:
    """True when triton imports (whether or not there is a device to run the kernels on)."""
    return _triton_importable()


def interpreted() -> bool:
    """True when the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 set before their first use)."""
    return bool(_module("linear_norm")._is_interpreted())


def available() -> bool:
    """True when the kernels can run here: triton importable and a CUDA device or TRITON_INTERPRET=1 (CPU)."""
    return _triton_importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _module(name: str) -> ModuleType:
    if not _triton_importable():
        raise ImportError(
            "fastsel.kernels needs triton (pip install 'triton>=3.2'); without it use the torch backend "
            "(fastsel.engine.linear_math)"
        )
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


_SPEC_MODULES = ("linear_norm", "gram_norm", "grouped", "linear_dot")  # the files that declare kernel families


def specs() -> dict[str, Any]:
    """Every kernel family's `KernelSpec` by family name, from the kernel files' `SPECS` (imports them)."""
    found: dict[str, Any] = {}
    for name in _SPEC_MODULES:
        for spec in _module(name).SPECS:
            if spec.family in found:
                raise RuntimeError(f"kernel family {spec.family!r} is declared twice (fastsel.kernels.{name})")
            found[spec.family] = spec
    return found


# Public kernel entry points, forwarded lazily to the module that defines them (whose docstrings are theirs):
# `linear_sq_norms(x, delta, *, method, write_grads, valid_range, segments, cu_seqlens, max_length)`,
# `grouped_linear_sq_norms(xs, deltas, *, method, valid_range, segments, max_length)`, and the gradient dots
# `linear_sq_norms_dots(x, delta, refs, *, method, valid_range, segments, max_length)`, `linear_dots(...)` and
# `grouped_linear_sq_norms_dots(xs, deltas, refs, *, valid_range, segments, max_length)`.
_FORWARDED = {"linear_sq_norms": "linear_norm", "grouped_linear_sq_norms": "grouped",
              "segments_from_cu_seqlens": "linear_norm", "linear_sq_norms_dots": "linear_dot",
              "linear_dots": "linear_dot", "grouped_linear_sq_norms_dots": "linear_dot"}


def __getattr__(name: str) -> Any:
    if name in _FORWARDED:
        return getattr(_module(_FORWARDED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
