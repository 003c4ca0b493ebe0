"""First-use self-test of the Triton kernels: each kernel family is checked once per (device, dtypes) on small
shapes against the naive torch reference (`fastsel.kernels.reference`) before the norm pass trusts it.

Why: the kernels are tested under the CPU interpreter and compiled ahead of time, but a user's first CUDA run may
be their first compiled run (a new GPU, a new Triton). `backend="auto"` must never return wrong norms because of
that, so the first time a family is needed on a (device, input dtype, output-grad dtype) it runs on small inputs
with padded examples (token ranges), odd sizes and several tiles, and its result is compared with the torch
reference (fp32 math, TF32 off) at RTOL. Outcome, per (device, dtypes, family):
- passed: the kernel is used from then on (the check costs one compile and a few small launches, once);
- a mismatch beyond RTOL, or a compile/launch error: with backend 'auto' the torch math is used for that family
  there, after ONE `KernelSelfTestWarning` naming the failure; with an explicit backend='triton',
  `KernelSelfTestError` is raised (every time) instead of falling back.
`report()` (shown by `fastsel.backends()`) lists every result.

When: on CUDA devices by default. FASTSEL_KERNEL_SELFTEST=always runs it on every device (the CPU interpreter
too: tests, `benchmarks/gpu_session.sh --dry-run`), =off never (the kernels are trusted as they are).

Extending: the checks are the kernel families' self-test cases, declared in the kernel files beside their
launchers (`fastsel.kernels.spec.KernelSpec`, collected by `fastsel.kernels.specs()`); `CHECKS` reads them (on
first use: the kernel modules are imported then). A new kernel family adds one spec to its kernel file and asks
`usable(family, ...)` in its dispatch before launching. Families: the norm forms ('instantiate', 'gram', 'outer',
'grouped', 'write_grads') and the gradient dots ('dots': fused instantiate + dots, Gram + project, dots alone;
'grouped_dots'). Packed batches use their 'segment_*' variants (several examples per row, given as (row, start,
end) segments); padded batches the plain ones (one example per row).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from fastsel.kernels.reference import RTOL, Case, KernelMismatch, compare

ENV = "FASTSEL_KERNEL_SELFTEST"
MODES = ("auto", "always", "off")


class KernelSelfTestError(RuntimeError):
    """A Triton kernel family failed its self-test and backend='triton' was asked for explicitly."""


class KernelSelfTestWarning(RuntimeWarning):
    """A Triton kernel family failed its self-test: backend='auto' uses the torch math for it instead."""


@dataclass
class Result:
    """One family's self-test outcome on one (device, dtypes)."""

    ok: bool
    detail: str
    seconds: float
    warned: bool = False


class _Checks(Mapping[str, Callable[[Case], None]]):
    """Family name -> self-test case, read from the kernel files' specs at the first use (importing triton then)."""

    def _specs(self) -> dict[str, Callable[[Case], None]]:
        from fastsel import kernels

        return {family: spec.selftest for family, spec in kernels.specs().items()}

    def __getitem__(self, family: str) -> Callable[[Case], None]:
        return self._specs()[family]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs())

    def __len__(self) -> int:
        return len(self._specs())


# The norm pass asks for 'segment_<form>' on packed batches, '<form>' on padded ones.
CHECKS: Mapping[str, Callable[[Case], None]] = _Checks()

_RESULTS: dict[tuple[str, str, str], Result] = {}


# ------------------------------------------------------------------------------------------------ the gate

def mode() -> str:
    """FASTSEL_KERNEL_SELFTEST: 'auto' (default: CUDA devices), 'always' or 'off'."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def dtype_name(x_dtype: torch.dtype, delta_dtype: torch.dtype) -> str:
    x, d = str(x_dtype).removeprefix("torch."), str(delta_dtype).removeprefix("torch.")
    return x if x == d else f"{x}+{d}"


def run(family: str, case: Case) -> Result:
    """Run `family`'s check on `case` now (no cache): the Result."""
    if family not in CHECKS:
        raise KeyError(f"no self-test for kernel family {family!r} (known: {', '.join(CHECKS)})")
    start = time.perf_counter()
    try:
        # the caller may be under autocast (train's bf16) or recording gradients: the check runs without either
        with torch.no_grad(), torch.autocast(case.device.type, enabled=False), contextlib.ExitStack() as stack:
            if case.device.type == "cuda":
                stack.enter_context(torch.cuda.device(case.device))
            CHECKS[family](case)
    except KernelMismatch as e:
        return Result(False, str(e), time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001  (a compile or launch error is a failed self-test, reported as such)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return Result(False, f"{type(e).__name__} while running: {first}", time.perf_counter() - start)
    return Result(True, "passed", time.perf_counter() - start)


def usable(family: str, device: torch.device, x_dtype: torch.dtype, delta_dtype: torch.dtype, *,
           strict: bool) -> bool:
    """Whether `family`'s kernels may be used on (device, dtypes); runs the self-test at the first ask.

    False (after one KernelSelfTestWarning) when it failed and not `strict`; raises KernelSelfTestError when it
    failed and `strict` (explicit backend='triton'). True without testing when the mode skips this device.
    """
    current = mode()
    if current == "off" or (current == "auto" and torch.device(device).type != "cuda"):
        return True
    key = (device_name(device), dtype_name(x_dtype, delta_dtype), family)
    result = _RESULTS.get(key)
    if result is None:
        result = _RESULTS[key] = run(family, Case(torch.device(key[0]), x_dtype, delta_dtype))
    if result.ok:
        return True
    where = f"the Triton {family!r} kernels on {key[0]} ({key[1]})"
    if strict:
        raise KernelSelfTestError(f"{where} failed fastsel's first-use self-test: {result.detail}. "
                                  "backend='triton' was asked for explicitly; backend='auto' would use the torch "
                                  "math for this family instead")
    if not result.warned:
        result.warned = True
        warnings.warn(f"{where} failed fastsel's first-use self-test ({result.detail}): using the torch backend "
                      "for them; fastsel.backends() lists the self-test results", KernelSelfTestWarning,
                      stacklevel=2)
    return False


def run_all(device: torch.device,
            dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)) -> dict[str, str]:
    """Self-test every family on `device` for each dtype now (cached like first use; no warning): `report()`."""
    for dtype in dtypes:
        for family in CHECKS:
            key = (device_name(device), dtype_name(dtype, dtype), family)
            if key not in _RESULTS:
                _RESULTS[key] = run(family, Case(torch.device(key[0]), dtype, dtype))
    return report()


def report() -> dict[str, str]:
    """Every self-test run so far: {'cuda:0 bfloat16 gram': 'passed (0.41 s)' or 'FAILED, torch used: ...'}."""
    return {" ".join(key): (f"passed ({r.seconds:.2f} s)" if r.ok else f"FAILED, torch used: {r.detail}")
            for key, r in sorted(_RESULTS.items())}


def failed() -> list[str]:
    """The keys ('device dtypes family') whose self-test failed."""
    return [" ".join(key) for key, r in sorted(_RESULTS.items()) if not r.ok]


__all__ = ["CHECKS", "ENV", "MODES", "RTOL", "Case", "KernelMismatch", "KernelSelfTestError", "KernelSelfTestWarning",
           "Result", "compare", "device_name", "dtype_name", "failed", "mode", "report", "reset", "run", "run_all",
           "usable"]


def reset() -> None:
    """Forget every result (tests; a new Triton cache)."""
    _RESULTS.clear()
