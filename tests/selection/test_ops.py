"""Selection ops (fastsel.selection.ops): the active implementation (C++ when built) and the pure-torch fallback
against a plain-Python reference on Python floats, bit for bit, ties included; input validation; loading.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from needs import IN_CI

from fastsel.selection import ops as select_ops

# --------------------------------------------------------------------------------------------------------------
# Plain-Python reference
# --------------------------------------------------------------------------------------------------------------


def ref_median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def ref_closest_k(xs: list[float], target: float, k: int) -> list[int]:
    order = sorted(range(len(xs)), key=lambda i: (abs(xs[i] - target), i))
    return sorted(order[:k])


def ref_extreme_k(xs: list[float], k: int, largest: bool) -> list[int]:
    order = sorted(range(len(xs)), key=lambda i: (-xs[i] if largest else xs[i], i))
    return sorted(order[:k])


def ref_loss_band(xs: list[float], c: float) -> list[bool]:
    n = len(xs)
    if n == 0:
        return []
    acc = 0.0
    for v in xs:
        acc += v
    mean = acc / n
    ss = 0.0
    for v in xs:
        d = v - mean
        ss += d * d
    threshold = c * math.sqrt(ss / n)
    return [abs(v - mean) <= threshold for v in xs]


# --------------------------------------------------------------------------------------------------------------
# Implementations under test: the active one (what users get) and the torch fallback
# --------------------------------------------------------------------------------------------------------------

IMPLS = {
    "active": (select_ops.median, select_ops.closest_k, select_ops.extreme_k, select_ops.loss_band),
    "fallback": (
        select_ops._torch_median,
        select_ops._torch_closest_k,
        select_ops._torch_extreme_k,
        select_ops._torch_loss_band,
    ),
}
impl_names = pytest.mark.parametrize("impl", list(IMPLS))

# Values from a small set force ties and duplicates (-0.0 == 0.0 is a tie too).
SMALL = [-3.0, -2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0, 3.0]


@st.composite
def tensors(draw: st.DrawFn, min_size: int = 0, max_size: int = 40) -> torch.Tensor:
    """1-D float32/float64 tensors: arbitrary finite values, few distinct values, or all equal."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    width = 32 if dtype == torch.float32 else 64
    any_float = st.floats(allow_nan=False, allow_infinity=False, width=width)
    kind = draw(st.sampled_from(["any", "moderate", "small", "equal"]))
    if kind == "equal":
        n = draw(st.integers(min_size, max_size))
        xs = [draw(st.sampled_from(SMALL) | any_float)] * n
    else:
        elem = {
            "any": any_float,
            "moderate": st.floats(-1e6, 1e6, width=width),
            "small": st.sampled_from(SMALL),
        }[kind]
        xs = draw(st.lists(elem, min_size=min_size, max_size=max_size))
    return torch.tensor(xs, dtype=dtype)


@st.composite
def tensor_and_k(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    x = draw(tensors())
    n = x.numel()
    k = draw(st.sampled_from(sorted({0, min(1, n), n})) | st.integers(0, n))
    return x, k


FAST = settings(max_examples=150, deadline=None)


@impl_names
@FAST
@given(x=tensors(min_size=1))
def test_median_matches_reference(impl: str, x: torch.Tensor) -> None:
    got = IMPLS[impl][0](x)
    assert isinstance(got, float)
    assert got == ref_median(x.tolist())


@impl_names
@FAST
@given(xk=tensor_and_k(), target=st.sampled_from(SMALL) | st.floats(allow_nan=False, allow_infinity=False))
def test_closest_k_matches_reference(impl: str, xk: tuple[torch.Tensor, int], target: float) -> None:
    x, k = xk
    got = IMPLS[impl][1](x, target, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == ref_closest_k(x.tolist(), target, k)


@impl_names
@FAST
@given(xk=tensor_and_k(), largest=st.booleans())
def test_extreme_k_matches_reference(impl: str, xk: tuple[torch.Tensor, int], largest: bool) -> None:
    x, k = xk
    got = IMPLS[impl][2](x, k, largest)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == ref_extreme_k(x.tolist(), k, largest)


@impl_names
@FAST
@given(x=tensors(), c=st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0.0, 1e3))
def test_loss_band_matches_reference(impl: str, x: torch.Tensor, c: float) -> None:
    got = IMPLS[impl][3](x, c)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert got.tolist() == ref_loss_band(x.tolist(), c)


def test_active_equals_fallback_on_large_inputs_with_ties() -> None:
    """Selection on larger inputs (nth_element vs stable sort paths), many ties, float32 and float64."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for x in (
            torch.randn(5001, generator=gen, dtype=dtype),
            torch.randint(-5, 6, (5000,), generator=gen),
        ):
            x = x.to(dtype)
            n = x.numel()
            assert select_ops.median(x) == select_ops._torch_median(x) == ref_median(x.tolist())
            for k in (0, 1, 7, n // 2, n - 1, n):
                assert torch.equal(select_ops.closest_k(x, 0.25, k), select_ops._torch_closest_k(x, 0.25, k))
                for largest in (False, True):
                    assert torch.equal(
                        select_ops.extreme_k(x, k, largest), select_ops._torch_extreme_k(x, k, largest)
                    )
            for c in (0.0, 0.3, 1.0, 2.5):
                got = select_ops.loss_band(x, c)
                assert torch.equal(got, select_ops._torch_loss_band(x, c))
                assert got.tolist() == ref_loss_band(x.tolist(), c)


def test_small_examples() -> None:
    assert select_ops.median([3.0, 1.0, 2.0]) == 2.0
    assert select_ops.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert select_ops.median(torch.tensor([7.0])) == 7.0
    # |v - 2| = [1, 1, 0, 1]: index 2, then the ties 0 and 1 (lower indices first).
    assert select_ops.closest_k([1.0, 3.0, 2.0, 1.0], 2.0, 3).tolist() == [0, 1, 2]
    assert select_ops.extreme_k([5.0, 1.0, 5.0, 1.0], 1, largest=True).tolist() == [0]
    assert select_ops.extreme_k([5.0, 1.0, 5.0, 1.0], 3, largest=False).tolist() == [0, 1, 3]
    # mean 4, std sqrt(12.5) ~ 3.54: only 10 lies outside one std.
    assert select_ops.loss_band([1.0, 2.0, 3.0, 10.0], 1.0).tolist() == [True, True, True, False]
    assert select_ops.loss_band([2.0, 2.0, 2.0], 0.0).tolist() == [True, True, True]


# --------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------

CALLS: dict[str, Callable[[tuple, torch.Tensor], object]] = {
    "median": lambda f, x: f[0](x),
    "closest_k": lambda f, x: f[1](x, 0.0, 1),
    "extreme_k": lambda f, x: f[2](x, 1, True),
    "loss_band": lambda f, x: f[3](x, 1.0),
}
op_names = pytest.mark.parametrize("op", list(CALLS))


@impl_names
@op_names
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_positions_are_named(impl: str, op: str, dtype: torch.dtype) -> None:
    x = torch.tensor([0.0, 1.0, 2.0, math.nan, 4.0, 5.0, 6.0, math.inf, -1.0], dtype=dtype)
    with pytest.raises(ValueError, match=rf"^{op}: non-finite values at positions \[3, 7\]$"):
        CALLS[op](IMPLS[impl], x)
    with pytest.raises(ValueError, match=r"positions \[0\]$"):
        CALLS[op](IMPLS[impl], torch.tensor([-math.inf, 1.0], dtype=dtype))


@op_names
def test_non_finite_message_truncated_and_identical(op: str) -> None:
    x = torch.zeros(60, dtype=torch.float64)
    x[5:30] = math.nan
    messages = []
    for impl in IMPLS:
        with pytest.raises(ValueError) as info:
            CALLS[op](IMPLS[impl], x)
        messages.append(str(info.value))
    listed = ", ".join(str(i) for i in range(5, 25))
    assert messages[0] == messages[1] == f"{op}: non-finite values at positions [{listed}, ...] (25 in total)"


@impl_names
@pytest.mark.parametrize("k", [-1, 4, 100])
def test_bad_k(impl: str, k: int) -> None:
    _, closest, extreme, _ = IMPLS[impl]
    x = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=rf"^closest_k: k must be in \[0, 3\], got {k}$"):
        closest(x, 2.0, k)
    with pytest.raises(ValueError, match=rf"^extreme_k: k must be in \[0, 3\], got {k}$"):
        extreme(x, k, False)


@impl_names
def test_bad_scalars_and_shapes(impl: str) -> None:
    med, closest, extreme, band = IMPLS[impl]
    x = torch.tensor([1.0, 2.0, 3.0])
    for c in (-1.0, -1e-300, math.nan):
        with pytest.raises(ValueError, match="^loss_band: c must be >= 0"):
            band(x, c)
    for target in (math.nan, math.inf):
        with pytest.raises(ValueError, match="^closest_k: target must be finite"):
            closest(x, target, 1)
    with pytest.raises(ValueError, match="^median: empty input$"):
        med(torch.zeros(0))
    with pytest.raises(ValueError, match="1-D"):
        med(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="float32 or float64"):
        extreme(torch.arange(3), 1, True)
    assert closest(torch.zeros(0), 0.0, 0).tolist() == []
    assert band(torch.zeros(0), 1.0).tolist() == []


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def test_no_silent_fallback_when_a_compiler_is_present() -> None:
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the torch fallback is expected")
    assert select_ops.implementation() in ("cpp", "cpp-jit"), (
        "a C++ compiler is present but the selection ops use the torch fallback: fastsel._C is not built "
        "(pip install --no-build-isolation -e .) and the JIT build failed"
    )
    import fastsel

    assert fastsel.backends()["selection"] == select_ops.implementation()


def test_fallback_warns_once_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_extension() -> None:
        raise ImportError("simulated")

    monkeypatch.setattr(select_ops, "_state", None)
    monkeypatch.setattr(select_ops, "_import_built", no_extension)
    monkeypatch.setattr(select_ops, "_find_compiler", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_ops.implementation() == "torch-fallback"
        assert select_ops.median([1.0, 5.0]) == 3.0
        assert select_ops.extreme_k([1.0, 5.0, 5.0], 1, True).tolist() == [1]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "pure-torch fallback" in message and "simulated" in message and "no C++ compiler" in message
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        select_ops.loss_band([1.0, math.nan], 1.0)


@pytest.mark.skipif(
    not (IN_CI or os.environ.get("FASTSEL_TEST_JIT") == "1") or not (shutil.which("c++") or shutil.which("g++")),
    reason="JIT compilation takes ~30 s on a fresh machine: runs under CI, or set FASTSEL_TEST_JIT=1",
)
def test_jit_build_coexists_with_built_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JIT copy registers torch.ops.fastsel_jit, so it loads next to a built fastsel._C without clashing."""
    src = select_ops._source_path()
    assert src is not None
    jit = select_ops._build_jit(src)
    x = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert jit.median(x) == 2.0
    monkeypatch.setattr(select_ops, "_state", ("cpp-jit", jit))
    assert select_ops.closest_k(x, 2.0, 2).tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"positions \[0\]"):
        select_ops.median(torch.tensor([math.nan]))
