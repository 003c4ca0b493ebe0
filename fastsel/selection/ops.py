"""Selection ops on 1-D CPU float tensors: median, closest_k, extreme_k, loss_band.

The work is done by the C++ extension `fastsel._C` (csrc/select.cpp, ops registered as `torch.ops.fastsel.*`).
The implementation is picked lazily, on the first call, in this order:

1. "cpp": the built extension `fastsel._C` (built by `pip install -e .` or `python setup.py build_ext --inplace`);
2. "cpp-jit": in a source checkout (csrc/select.cpp next to the package) with a C++ compiler on PATH, the same
   source compiled once with `torch.utils.cpp_extension.load` under the op namespace `fastsel_jit`, so it can
   never clash with a built `fastsel._C` loaded in the same process;
3. "torch-fallback": the pure-torch functions `_torch_*` below, with one warning that says why.

All three give identical results, which equal a plain-Python computation on Python floats: arithmetic is in
double, sums run left to right, and ties are broken by the lower index. Every op rejects NaN/inf input with a
ValueError naming the positions ("median: non-finite values at positions [3, 7]").
"""

from __future__ import annotations

import importlib
import math
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["closest_k", "extreme_k", "implementation", "loss_band", "median"]

# At most this many positions are listed in a non-finite error message (kMaxListedPositions in select.cpp).
_MAX_LISTED_POSITIONS = 20
_JIT_NAME = "fastsel_C_jit"
_JIT_NAMESPACE = "fastsel_jit"
# -ffp-contract=off: no fused multiply-add, so the C++ sums round exactly like the Python/torch ones.
_JIT_CFLAGS = ["-O3", "-ffp-contract=off", f"-DFASTSEL_NS={_JIT_NAMESPACE}"]

_lock = threading.Lock()
_state: tuple[str, Any] | None = None  # (implementation name, torch.ops namespace or None for the fallback)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _source_path() -> Path | None:
    """csrc/select.cpp of a source checkout, or None in an installed wheel."""
    src = Path(__file__).resolve().parents[2] / "csrc" / "select.cpp"
    return src if src.is_file() else None


def _find_compiler() -> str | None:
    """Path of a C++ compiler on PATH (c++ or g++), or None."""
    return shutil.which("c++") or shutil.which("g++")


def _import_built() -> Any:
    """Import the built extension; importing it registers torch.ops.fastsel.*."""
    importlib.import_module("fastsel._C")
    return torch.ops.fastsel


def _build_jit(src: Path) -> Any:
    """Compile csrc/select.cpp once (cached by torch under ~/.cache/torch_extensions) and load it."""
    from torch.utils.cpp_extension import load

    load(name=_JIT_NAME, sources=[str(src)], extra_cflags=_JIT_CFLAGS, verbose=False)
    return getattr(torch.ops, _JIT_NAMESPACE)


def _resolve() -> tuple[str, Any]:
    """Pick the implementation: built extension, else JIT build, else the pure-torch fallback (one warning)."""
    reasons = []
    try:
        return "cpp", _import_built()
    except ImportError as e:
        reasons.append(f"fastsel._C is not importable ({e})")
    src = _source_path()
    compiler = _find_compiler()
    if src is None:
        reasons.append("csrc/select.cpp is not next to the package (not a source checkout)")
    elif compiler is None:
        reasons.append("no C++ compiler (c++ or g++) on PATH")
    else:
        try:
            return "cpp-jit", _build_jit(src)
        except Exception as e:  # any build or load failure means: use the fallback
            reasons.append(f"the just-in-time build of {src} failed ({type(e).__name__}: {e})")
    warnings.warn(
        "fastsel.selection.ops: using the pure-torch fallback for the selection ops because "
        + "; ".join(reasons),
        RuntimeWarning,
        stacklevel=4,  # _resolve <- _load <- public op <- caller
    )
    return "torch-fallback", None


def _load() -> tuple[str, Any]:
    """The cached (name, ops) pair; resolved once, on first use, thread-safely."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _resolve()
    return _state


def implementation() -> str:
    """Which implementation the ops use: "cpp", "cpp-jit" or "torch-fallback" (loads it if not done yet)."""
    return _load()[0]


def _as_tensor(values: Tensor | Sequence[float]) -> Tensor:
    """Tensors pass through unchanged (dtype checked by the op); sequences of numbers become float64."""
    return values if isinstance(values, Tensor) else torch.as_tensor(values, dtype=torch.float64)


def _run(name: str, fallback: Callable[..., Any], *args: Any) -> Any:
    """Op `name` in C++ when loaded (its TORCH_CHECK failures re-raised as ValueError, same message), else the
    pure-torch `fallback`."""
    _, ops = _load()
    if ops is None:
        return fallback(*args)
    try:
        return getattr(ops, name)(*args)
    except RuntimeError as e:
        raise ValueError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------------------


def median(values: Tensor | Sequence[float]) -> float:
    """Median of a 1-D float tensor; for an even count the mean (a + b) / 2 of the two middle values."""
    x = _to_finite_double(_as_tensor(values), "median")
    if x.numel() == 0:
        raise ValueError("median: empty input")
    return _run("median", _torch_median, x)


def closest_k(values: Tensor | Sequence[float], target: float, k: int) -> Tensor:
    """Indices (int64, ascending) of the k values closest to target by |v - target|; ties -> lower index."""
    x, target, k = _to_finite_double(_as_tensor(values), "closest_k"), _check_target(target), int(k)
    _check_k(k, x.numel(), "closest_k")
    return _run("closest_k", _torch_closest_k, x, target, k)


def extreme_k(values: Tensor | Sequence[float], k: int, largest: bool) -> Tensor:
    """Indices (int64, ascending) of the k smallest or, with largest, the k largest values; ties -> lower index."""
    x, k = _to_finite_double(_as_tensor(values), "extreme_k"), int(k)
    _check_k(k, x.numel(), "extreme_k")
    return _run("extreme_k", _torch_extreme_k, x, k, bool(largest))


def loss_band(losses: Tensor | Sequence[float], c: float) -> Tensor:
    """Bool mask of |L - mean| <= c * std (population std, divide by n): the losses within c std of the mean."""
    x = _to_finite_double(_as_tensor(losses), "loss_band")
    return _run("loss_band", _torch_loss_band, x, _check_c(c))


# --------------------------------------------------------------------------------------------------------------
# The checks (the public ops run them before either implementation: an exception thrown inside the extension
# crashed the process on the H200 image, 2026-12-04) and the pure-torch fallback, same results as csrc/select.cpp
# --------------------------------------------------------------------------------------------------------------


def _to_finite_double(values: Tensor, op: str) -> Tensor:
    """Validate a 1-D CPU float32/float64 tensor of finite values and return it as float64."""
    if values.dim() != 1:
        raise ValueError(f"{op}: expected a 1-D tensor, got {values.dim()}-D")
    if values.device.type != "cpu":
        raise ValueError(f"{op}: expected a CPU tensor, got device {values.device}")
    if values.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: expected float32 or float64 values, got {values.dtype}")
    x = values.detach().to(torch.float64)
    bad = (~torch.isfinite(x)).nonzero().flatten().tolist()
    if bad:
        listed = ", ".join(str(i) for i in bad[:_MAX_LISTED_POSITIONS])
        where = (
            f"[{listed}, ...] ({len(bad)} in total)" if len(bad) > _MAX_LISTED_POSITIONS else f"[{listed}]"
        )
        raise ValueError(f"{op}: non-finite values at positions {where}")
    return x


def _check_k(k: int, n: int, op: str) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"{op}: k must be in [0, {n}], got {k}")


def _check_target(target: float) -> float:
    target = float(target)
    if not math.isfinite(target):
        raise ValueError(f"closest_k: target must be finite, got {target:g}")
    return target


def _check_c(c: float) -> float:
    c = float(c)
    if not c >= 0.0:
        raise ValueError(f"loss_band: c must be >= 0, got {c:g}")
    return c


def _sequential_sum(x: Tensor) -> float:
    """Left-to-right sum in double, rounding like `for v in x: acc += v` (and the C++ loop).

    torch.sum reduces pairwise/vectorised, which rounds differently; the CPU cumsum kernel accumulates in
    order, so its last element is the sequential sum (the tests check this against plain Python).
    """
    return float(torch.cumsum(x, 0)[-1]) if x.numel() else 0.0


def _first_k_ascending(keys: Tensor, k: int) -> Tensor:
    """Indices of the k smallest keys, ties -> lower index (stable sort), returned in ascending index order."""
    order = torch.sort(keys, stable=True).indices[:k]
    return torch.sort(order).values


def _torch_median(values: Tensor) -> float:
    """Pure-torch median (fallback of the C++ op)."""
    x = _to_finite_double(values, "median")
    n = x.numel()
    if n == 0:
        raise ValueError("median: empty input")
    hi = float(torch.kthvalue(x, n // 2 + 1).values)
    if n % 2 == 1:
        return hi
    lo = float(torch.kthvalue(x, n // 2).values)
    return (lo + hi) / 2.0


def _torch_closest_k(values: Tensor, target: float, k: int) -> Tensor:
    """Pure-torch closest_k (fallback of the C++ op)."""
    x, target = _to_finite_double(values, "closest_k"), _check_target(target)
    _check_k(k, x.numel(), "closest_k")
    return _first_k_ascending((x - target).abs(), k)


def _torch_extreme_k(values: Tensor, k: int, largest: bool) -> Tensor:
    """Pure-torch extreme_k (fallback of the C++ op)."""
    x = _to_finite_double(values, "extreme_k")
    _check_k(k, x.numel(), "extreme_k")
    return _first_k_ascending(-x if largest else x, k)  # negation is exact: ties stay ties


def _torch_loss_band(losses: Tensor, c: float) -> Tensor:
    """Pure-torch loss_band (fallback of the C++ op)."""
    x, c = _to_finite_double(losses, "loss_band"), _check_c(c)
    n = x.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    mean = _sequential_sum(x) / n
    dev = x - mean
    std = math.sqrt(_sequential_sum(dev * dev) / n)
    return dev.abs() <= c * std
