"""First-use self-test of the Triton kernels: each kernel family is checked once per (device, dtypes) on small
shapes against its torch reference in `fastsel.engine.linear_math` before the norm pass trusts it.

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

Extending: `CHECKS` maps a family name to a check function `check(case: Case) -> None`, which runs the family's
kernels on small inputs on `case.device` in `case.x_dtype` / `case.delta_dtype` and calls `compare` (or raises)
on any difference from the torch reference. A new kernel family adds ONE entry to `CHECKS` and asks
`usable(family, ...)` in its dispatch before launching. Families: the norm forms ('instantiate', 'gram',
'outer', 'grouped', 'write_grads') and the gradient dots ('dots': fused instantiate + dots, Gram + project, dots
alone; 'grouped_dots'). Packed batches use their 'segment_*' variants (several examples per row, given as
(row, start, end) segments); padded batches the plain ones (one example per row).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from fastsel.engine import dot_math, linear_math

RTOL = 1e-3  # fp32 summation order moves the last bits (~1e-6); a wrong tile or a missed block moves far more
ENV = "FASTSEL_KERNEL_SELFTEST"
MODES = ("auto", "always", "off")


class KernelSelfTestError(RuntimeError):
    """A Triton kernel family failed its self-test and backend='triton' was asked for explicitly."""


class KernelSelfTestWarning(RuntimeWarning):
    """A Triton kernel family failed its self-test: backend='auto' uses the torch math for it instead."""


class KernelMismatch(AssertionError):
    """A kernel's result differs from the torch reference beyond tolerance."""


@dataclass(frozen=True)
class Case:
    """Where and in which dtypes a family is checked: the kernels' input x and output-grad delta dtypes."""

    device: torch.device
    x_dtype: torch.dtype
    delta_dtype: torch.dtype

    def inputs(self, b: int, t: int, n: int, m: int, seed: int) -> tuple[Tensor, Tensor]:
        """Random x [b, t, n] and delta [b, t, m] on the device in the case's dtypes (drawn on the CPU)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, t, n, generator=g).to(self.device, self.x_dtype)
        delta = torch.randn(b, t, m, generator=g).to(self.device, self.delta_dtype)
        return x, delta

    def ranges(self, bounds: list[tuple[int, int]]) -> Tensor:
        """[B, 2] [start, end) token ranges (left / right padded examples) on the device."""
        return torch.tensor(bounds, dtype=torch.long, device=self.device)


@dataclass
class Result:
    """One family's self-test outcome on one (device, dtypes)."""

    ok: bool
    detail: str
    seconds: float
    warned: bool = False


def _kernels():
    from fastsel import kernels

    return kernels


@contextmanager
def _exact_fp32() -> Iterator[None]:
    """The torch reference in true fp32 (no TF32), whatever the user set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _masked(t: Tensor, ranges: Tensor) -> Tensor:
    """`t` in fp32 with the tokens outside each example's [start, end) zeroed (the kernels skip them)."""
    pos = torch.arange(t.shape[1], device=t.device)
    keep = (pos[None, :] >= ranges[:, :1]) & (pos[None, :] < ranges[:, 1:])
    return t.float() * keep[:, :, None]


def compare(what: str, got: Tensor, ref: Tensor, rtol: float = RTOL) -> None:
    """Raise KernelMismatch unless `got` equals `ref` elementwise to `rtol` (relative; tiny values against the
    largest magnitude), with the same shape and only finite values."""
    if tuple(got.shape) != tuple(ref.shape):
        raise KernelMismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    got64, ref64 = got.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(got64).all()):
        raise KernelMismatch(f"{what}: non-finite values")
    floor = 1e-6 * float(ref64.abs().max()) + 1e-30
    rel = float(((got64 - ref64).abs() / (ref64.abs() + floor)).max()) if ref64.numel() else 0.0
    if not rel <= rtol:
        raise KernelMismatch(f"{what}: max relative error {rel:.2e} > {rtol:.0e} against the torch reference")


# ------------------------------------------------------------------------------------------------ the checks

def check_instantiate(case: Case) -> None:
    """Instantiate form, both LoRA orientations (small side m, then small side n), several tiles, ranges."""
    for i, (n, m) in enumerate(((150, 5), (5, 150))):
        x, d = case.inputs(3, 21, n, m, seed=i)
        vr = case.ranges([(0, 21), (4, 21), (0, 13)])
        got, _ = _kernels().linear_sq_norms(x, d, method="instantiate", valid_range=vr)
        with _exact_fp32():
            ref = linear_math.sq_norms_instantiate(_masked(x, vr), _masked(d, vr))
        compare(f"instantiate n={n} m={m}", got, ref)


def check_gram(case: Case) -> None:
    """Gram form over several token blocks (off-diagonal pairs counted twice), ranges."""
    x, d = case.inputs(3, 40, 48, 40, seed=2)
    vr = case.ranges([(0, 40), (9, 40), (0, 17)])
    got, _ = _kernels().linear_sq_norms(x, d, method="gram", valid_range=vr)
    with _exact_fp32():
        ref = linear_math.sq_norms_gram(_masked(x, vr), _masked(d, vr))
    compare("gram", got, ref)


def check_outer(case: Case) -> None:
    """T == 1: ||delta||^2 ||x||^2, an example whose range excludes the token gives 0."""
    x, d = case.inputs(4, 1, 40, 24, seed=3)
    vr = case.ranges([(0, 1), (0, 1), (1, 1), (0, 1)])
    got, _ = _kernels().linear_sq_norms(x, d, method="outer", valid_range=vr)
    with _exact_fp32():
        ref = linear_math.sq_norms_outer(_masked(x, vr), _masked(d, vr))
    compare("outer (T=1)", got, ref)


def check_grouped(case: Case) -> None:
    """One launch for two same-shape sites plus one for a third shape, per-site results in order."""
    shapes = ((24, 4), (24, 4), (4, 40))
    pairs = [case.inputs(3, 19, n, m, seed=10 + i) for i, (n, m) in enumerate(shapes)]
    vr = case.ranges([(0, 19), (5, 19), (0, 11)])
    got = _kernels().grouped_linear_sq_norms([x for x, _ in pairs], [d for _, d in pairs], valid_range=vr)
    with _exact_fp32():
        ref = torch.stack([linear_math.sq_norms(_masked(x, vr), _masked(d, vr)) for x, d in pairs])
    compare("grouped", got, ref)


def check_write_grads(case: Case) -> None:
    """Instantiate with write_grads: the per-example gradients themselves, and their norms."""
    x, d = case.inputs(3, 21, 33, 6, seed=4)
    vr = case.ranges([(0, 21), (4, 21), (0, 13)])
    norms, grads = _kernels().linear_sq_norms(x, d, method="instantiate", write_grads=True, valid_range=vr)
    with _exact_fp32():
        ref = linear_math.per_example_grads(_masked(x, vr), _masked(d, vr))
    if grads is None:
        raise KernelMismatch("write_grads: no gradients returned")
    compare("write_grads gradients", grads, ref)
    compare("write_grads norms", norms, ref.square().sum(dim=(1, 2)))


# packed rows (several examples per row, trailing padding, a 1-token and a 2-token sequence): (row, start, end)
_SPANS = [(0, 0, 7), (0, 7, 8), (0, 8, 21), (1, 0, 2), (1, 2, 15), (2, 0, 21)]


def _segment_reference(x: Tensor, d: Tensor) -> Tensor:
    """fp32 per-segment gradients [S, m, n] of the _SPANS segments, one matmul per segment."""
    return torch.stack([d[r, s:e].float().T @ x[r, s:e].float() for r, s, e in _SPANS])


def _segments(case: Case) -> Tensor:
    return torch.tensor(_SPANS, dtype=torch.int32, device=case.device)


def check_segment_instantiate(case: Case) -> None:
    """Packed segments, instantiate form, both LoRA orientations, several tiles."""
    for i, (n, m) in enumerate(((150, 5), (5, 150))):
        x, d = case.inputs(3, 21, n, m, seed=20 + i)
        got, _ = _kernels().linear_sq_norms(x, d, method="instantiate", segments=_segments(case), max_length=21)
        with _exact_fp32():
            ref = _segment_reference(x, d).square().sum(dim=(1, 2))
        compare(f"segment_instantiate n={n} m={m}", got, ref)


def check_segment_gram(case: Case) -> None:
    """Packed segments, Gram form over several token blocks (a segment starting inside a block)."""
    x, d = case.inputs(3, 21, 48, 40, seed=22)
    got, _ = _kernels().linear_sq_norms(x, d, method="gram", segments=_segments(case), max_length=21)
    with _exact_fp32():
        ref = _segment_reference(x, d).square().sum(dim=(1, 2))
    compare("segment_gram", got, ref)


def check_segment_grouped(case: Case) -> None:
    """Packed segments shared by three sites of two shapes, one launch per shape."""
    shapes = ((24, 4), (24, 4), (4, 40))
    pairs = [case.inputs(3, 21, n, m, seed=30 + i) for i, (n, m) in enumerate(shapes)]
    got = _kernels().grouped_linear_sq_norms([x for x, _ in pairs], [d for _, d in pairs],
                                             segments=_segments(case), max_length=21)
    with _exact_fp32():
        ref = torch.stack([_segment_reference(x, d).square().sum(dim=(1, 2)) for x, d in pairs])
    compare("segment_grouped", got, ref)


def check_segment_write_grads(case: Case) -> None:
    """Packed segments, instantiate with write_grads: each sequence's gradient and norm."""
    x, d = case.inputs(3, 21, 33, 6, seed=24)
    norms, grads = _kernels().linear_sq_norms(x, d, method="instantiate", write_grads=True,
                                              segments=_segments(case), max_length=21)
    with _exact_fp32():
        ref = _segment_reference(x, d)
    if grads is None:
        raise KernelMismatch("segment_write_grads: no gradients returned")
    compare("segment_write_grads gradients", grads, ref)
    compare("segment_write_grads norms", norms, ref.square().sum(dim=(1, 2)))


def _refs(case: Case, k: int, m: int, n: int, seed: int) -> Tensor:
    """fp32 references [K, m, n] on the device (drawn on the CPU)."""
    return torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed)).to(case.device)


def _check_dots(case: Case, segments: bool) -> None:
    """Norms and dots with K = 2 references: fused instantiate (LoRA-shaped site), Gram norm + project (square
    site), and the dots alone (project, and instantiate from K = 2), against the fp32 torch reference."""
    for i, (n, m, method) in enumerate(((150, 5, "instantiate"), (33, 40, "project"))):
        x, d = case.inputs(3, 21, n, m, seed=40 + i)
        refs = _refs(case, 2, m, n, seed=50 + i)
        if segments:
            where = dict(segments=_segments(case), max_length=21)
            with _exact_fp32():
                grads = _segment_reference(x, d)
        else:
            vr = case.ranges([(0, 21), (4, 21), (0, 13)])
            where = dict(valid_range=vr)
            with _exact_fp32():
                grads = linear_math.per_example_grads(_masked(x, vr), _masked(d, vr))
        with _exact_fp32():
            ref_sq, ref_dots = grads.square().sum(dim=(1, 2)), dot_math.grads_dots(grads, refs)
        name = f"{'segment_' if segments else ''}dots {method} n={n} m={m}"
        sq, dots = _kernels().linear_sq_norms_dots(x, d, refs, method=method, **where)
        compare(f"{name} norms", sq, ref_sq)
        compare(f"{name} dots", dots, ref_dots)
        compare(f"{name} dots alone", _kernels().linear_dots(x, d, refs, method=method, **where), ref_dots)


def _check_grouped_dots(case: Case, segments: bool) -> None:
    """Three sites of two shapes, one launch per shape: per-site norms and dots in order."""
    shapes = ((24, 4), (24, 4), (4, 40))
    pairs = [case.inputs(3, 21, n, m, seed=60 + i) for i, (n, m) in enumerate(shapes)]
    refs = [_refs(case, 2, m, n, seed=70 + i) for i, (n, m) in enumerate(shapes)]
    if segments:
        where = dict(segments=_segments(case), max_length=21)
        with _exact_fp32():
            grads = [_segment_reference(x, d) for x, d in pairs]
    else:
        vr = case.ranges([(0, 21), (5, 21), (0, 11)])
        where = dict(valid_range=vr)
        with _exact_fp32():
            grads = [linear_math.per_example_grads(_masked(x, vr), _masked(d, vr)) for x, d in pairs]
    sq, dots = _kernels().grouped_linear_sq_norms_dots([x for x, _ in pairs], [d for _, d in pairs], refs, **where)
    with _exact_fp32():
        compare("grouped_dots norms", sq, torch.stack([g.square().sum(dim=(1, 2)) for g in grads]))
        compare("grouped_dots dots", dots, torch.stack([dot_math.grads_dots(g, r) for g, r in zip(grads, refs,
                                                                                                 strict=True)]))


def check_dots(case: Case) -> None:
    _check_dots(case, segments=False)


def check_grouped_dots(case: Case) -> None:
    _check_grouped_dots(case, segments=False)


def check_segment_dots(case: Case) -> None:
    _check_dots(case, segments=True)


def check_segment_grouped_dots(case: Case) -> None:
    _check_grouped_dots(case, segments=True)


# family name -> check. Others add their family here (one entry) and ask `usable(family, ...)` before launching.
# The norm pass asks for 'segment_<form>' on packed batches, '<form>' on padded ones.
CHECKS: dict[str, Callable[[Case], None]] = {
    "instantiate": check_instantiate,
    "gram": check_gram,
    "outer": check_outer,
    "grouped": check_grouped,
    "write_grads": check_write_grads,
    "segment_instantiate": check_segment_instantiate,
    "segment_gram": check_segment_gram,
    "segment_grouped": check_segment_grouped,
    "segment_write_grads": check_segment_write_grads,
    "dots": check_dots,
    "grouped_dots": check_grouped_dots,
    "segment_dots": check_segment_dots,
    "segment_grouped_dots": check_segment_grouped_dots,
}

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


def reset() -> None:
    """Forget every result (tests; a new Triton cache)."""
    _RESULTS.clear()
