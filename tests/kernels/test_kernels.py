"""Triton kernels (`fastsel.kernels`) against the pure-torch reference `fastsel.engine.linear_math`.

Without CUDA the kernels run on the CPU interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small;
block-size overrides make small shapes cross several tiles, token blocks and ragged edges. Tests that need real
Triton compilation (bf16 tensor-core dots, larger shapes) are marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from needs import need_kernels

from fastsel.engine import linear_math as LM

K = need_kernels()

LN = importlib.import_module(f"{K.__name__}.linear_norm")  # low-level launcher: block-size overrides

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(
    b: int, t: int, n: int, m: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, t, n, device=DEV).to(dtype), torch.randn(b, t, m, device=DEV).to(dtype)


def _assert_rel(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Elementwise |got - ref| <= rtol * |ref| (exact zeros must come back exactly zero)."""
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = (got.double() - ref.double()).abs()
    bound = rtol * ref.double().abs() + 1e-30
    assert bool((err <= bound).all()), (
        f"max rel err {(err / ref.double().abs().clamp_min(1e-30)).max().item():.3g}"
    )


def _masked(x: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """x with the tokens outside each example's [start, end) set to zero."""
    pos = torch.arange(x.shape[1], device=x.device)
    keep = (pos[None, :] >= ranges[:, :1]) & (pos[None, :] < ranges[:, 1:])
    return x * keep[:, :, None].to(x.dtype)


# (B, T, n, m): the small side r in {1, 8, 16, 64}, the large side up to 1024, sizes off block multiples, B = 1, T = 1,
# and both sides > 128 (2-D tiling).
SHAPES = [(2, 7, 1024, 16), (1, 5, 8, 300), (3, 40, 64, 1), (2, 3, 130, 64), (1, 1, 33, 17), (2, 19, 150, 140)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_instantiate_matches_reference(shape: tuple[int, int, int, int]) -> None:
    x, d = _inputs(*shape)
    norms, grads = K.linear_sq_norms(x, d, method="instantiate", write_grads=True)
    _assert_rel(norms, LM.sq_norms_instantiate(x, d))
    torch.testing.assert_close(grads, LM.per_example_grads(x, d), rtol=1e-5, atol=1e-5)
    norms2, none = K.linear_sq_norms(x, d, method="instantiate")
    assert none is None
    _assert_rel(norms2, norms, rtol=1e-6)


def test_instantiate_small_blocks_many_tiles() -> None:
    """Several m-tiles, n-tiles and token blocks, all ragged."""
    x, d = _inputs(2, 37, 70, 50)
    norms, grads = LN.linear_sq_norms(x, d, method="instantiate", write_grads=True, _blocks=(16, 16, 32))
    _assert_rel(norms, LM.sq_norms_instantiate(x, d))
    torch.testing.assert_close(grads, LM.per_example_grads(x, d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,blocks",
    [
        ((2, 20, 96, 80), None),
        ((2, 20, 96, 80), (16, 16)),  # 2 x 2 token blocks: one off-diagonal pair, counted twice
        ((1, 37, 200, 16), (16, 32)),  # 3 x 3 blocks, ragged last block, ragged feature chunks
        ((3, 5, 8, 1), None),
        ((1, 1, 33, 17), None),
        ((2, 19, 1024, 140), None),
    ],
)
def test_gram_matches_reference(shape: tuple[int, int, int, int], blocks: tuple[int, int] | None) -> None:
    x, d = _inputs(*shape)
    norms, grads = LN.linear_sq_norms(x, d, method="gram", _blocks=blocks)
    assert grads is None
    _assert_rel(norms, LM.sq_norms_gram(x, d))


@pytest.mark.parametrize("shape", [(3, 1, 1024, 8), (1, 1, 5, 300)])
def test_outer_matches_reference(shape: tuple[int, int, int, int]) -> None:
    x, d = _inputs(*shape)
    norms, _ = K.linear_sq_norms(x, d, method="outer")
    _assert_rel(norms, LM.sq_norms_outer(x, d))
    _assert_rel(norms, LM.sq_norms_instantiate(x, d))


def test_auto_rule_and_result() -> None:
    for t in (1, 2, 7, 64, 500):
        for m in (1, 16, 300, 4096):
            for n in (1, 64, 4096):
                assert K.choose_method(t, m, n) == LM.choose_method(t, m, n)
    for shape in [(2, 9, 256, 8), (2, 6, 300, 200), (2, 1, 40, 24)]:  # instantiate, gram, outer
        x, d = _inputs(*shape)
        norms, grads = K.linear_sq_norms(x, d)
        assert grads is None
        _assert_rel(norms, LM.sq_norms(x, d))
    x, d = _inputs(2, 1, 40, 24)
    # auto + write_grads -> instantiate, even at T == 1
    norms, grads = K.linear_sq_norms(x, d, write_grads=True)
    torch.testing.assert_close(grads, LM.per_example_grads(x, d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", ["zero_delta", "zero_both"])
@pytest.mark.parametrize("method", ["instantiate", "gram"])
def test_padded_tails_and_valid_range(method: str, pad: str) -> None:
    """Tail padding (delta = 0, x arbitrary or 0): exact with or without a range; the range also skips blocks."""
    b, t = 4, 23
    x, d = _inputs(b, t, 40, 24)
    lengths = torch.tensor([23, 10, 0, 17], device=DEV)
    ranges = torch.stack([torch.zeros_like(lengths), lengths], 1)
    d = _masked(d, ranges)
    if pad == "zero_both":
        x = _masked(x, ranges)
    ref = LM.sq_norms_instantiate(x, d)
    blocks = (16, 16, 16) if method == "instantiate" else (16, 16)
    for vr in (None, lengths, ranges, lengths.cpu().tolist()):
        norms, _ = LN.linear_sq_norms(x, d, method=method, valid_range=vr, _blocks=blocks)
        _assert_rel(norms, ref)
    assert norms[2].item() == 0.0


@pytest.mark.parametrize("method", ["instantiate", "gram"])
def test_valid_range_start_end(method: str) -> None:
    """[start, end) ranges with nonzero tokens outside: only the tokens inside count."""
    x, d = _inputs(3, 40, 33, 20)
    ranges = torch.tensor([[0, 40], [5, 27], [30, 30]], device=DEV)
    ref = LM.sq_norms_instantiate(_masked(x, ranges), _masked(d, ranges))
    blocks = (16, 16, 32) if method == "instantiate" else (16, 16)
    norms, grads = LN.linear_sq_norms(
        x, d, method=method, valid_range=ranges, write_grads=method == "instantiate", _blocks=blocks
    )
    _assert_rel(norms, ref)
    if grads is not None:
        ref_g = LM.per_example_grads(_masked(x, ranges), _masked(d, ranges))
        torch.testing.assert_close(grads, ref_g, rtol=1e-5, atol=1e-5)
    out_of_range = torch.tensor([[0, 50], [-3, 1], [1, 1]], device=DEV)  # clamped to [0, T]
    x1, d1 = _inputs(3, 1, 30, 12)
    norms1, _ = K.linear_sq_norms(x1, d1, method="outer", valid_range=out_of_range)
    _assert_rel(norms1, LM.sq_norms_outer(x1, d1) * torch.tensor([1.0, 1.0, 0.0], device=DEV))


def test_noncontiguous_inputs() -> None:
    x = torch.randn(2, 70, 12, device=DEV).transpose(1, 2)  # [2, 12, 70]: T = 12, n = 70, feature stride 12
    d = torch.randn(2, 24, 90, device=DEV)[:, ::2, 10:50]  # [2, 12, 40]: token stride 180, sliced features
    assert not x.is_contiguous() and not d.is_contiguous()
    ref = LM.sq_norms_instantiate(x, d)
    for method in ("instantiate", "gram"):
        norms, _ = K.linear_sq_norms(x, d, method=method)
        _assert_rel(norms, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_exact_products(dtype: torch.dtype) -> None:
    """16-bit inputs are loaded as they are and multiplied exactly in fp32: equal to the reference on the same values."""
    x, d = _inputs(2, 21, 70, 16, dtype)
    for method in ("instantiate", "gram"):
        norms, _ = LN.linear_sq_norms(
            x, d, method=method, _blocks=(16, 16, 32) if method == "instantiate" else None
        )
        _assert_rel(norms, LM.sq_norms_instantiate(x, d))
    norms, _ = K.linear_sq_norms(x.float(), d)  # mixed dtypes: both cast to fp32
    _assert_rel(norms, LM.sq_norms_instantiate(x, d))


def test_grouped_matches_per_site() -> None:
    b, t = 3, 9
    lengths = torch.tensor([9, 4, 7], device=DEV)
    sites = [_inputs(b, t, 64, 8) for _ in range(3)] + [_inputs(b, t, 8, 40) for _ in range(2)]
    sites.insert(2, _inputs(b, t, 300, 200))  # a lone site of its own shape (Gram by the cost rule)
    xs, ds = [s[0] for s in sites], [s[1] for s in sites]
    for vr in (None, lengths):
        got = K.grouped_linear_sq_norms(xs, ds, valid_range=vr)
        assert got.shape == (len(sites), b)
        for g, (x, d) in enumerate(sites):
            per_site, _ = K.linear_sq_norms(x, d, valid_range=vr)
            _assert_rel(got[g], per_site, rtol=1e-6)
            if vr is None:
                _assert_rel(got[g], LM.sq_norms(x, d))
    stacked = K.grouped_linear_sq_norms(torch.stack(xs[:2]), torch.stack(ds[:2]), method="gram")
    for g in range(2):
        _assert_rel(stacked[g], LM.sq_norms_gram(xs[g], ds[g]))


# Packed rows: several sequences per row (lengths 7, 2, 14 | 1, 17), row 1's last 5 tokens padding.
SPANS = [(0, 0, 7), (0, 7, 9), (0, 9, 23), (1, 0, 1), (1, 1, 18)]
CU_SEQLENS = [0, 7, 9, 23, 24, 41]  # the same spans as offsets over the flattened [2 * 23] tokens


@pytest.mark.parametrize("method", ["instantiate", "gram"])
def test_packed_segments_match_reference(method: str) -> None:
    """One result per sequence, from (row, start, end) segments or cu_seqlens, == the torch reference: the row's
    other sequences and its padding never count; small blocks cross several token blocks and tiles."""
    from fastsel.engine.segments import Segments

    x, d = _inputs(2, 23, 40, 24)
    segments = Segments.from_spans(SPANS, 2, 23, x.device)
    ref = LM.segment_sq_norms(x, d, segments)
    _assert_rel(ref, torch.stack([LM.sq_norms_instantiate(x[r:r + 1, s:e], d[r:r + 1, s:e])[0]
                                  for r, s, e in SPANS]))
    blocks = (16, 16, 16) if method == "instantiate" else (16, 16)
    write = method == "instantiate"
    norms, grads = LN.linear_sq_norms(x, d, method=method, segments=torch.tensor(SPANS, device=DEV), max_length=17,
                                      write_grads=write, _blocks=blocks)
    _assert_rel(norms, ref)
    if write:
        torch.testing.assert_close(grads, LM.segment_grads(x, d, segments), rtol=1e-5, atol=1e-5)
    norms, _ = LN.linear_sq_norms(x, d, method=method, cu_seqlens=torch.tensor(CU_SEQLENS, device=DEV),
                                  max_length=17, _blocks=blocks)
    _assert_rel(norms, ref)


def test_grouped_packed_segments() -> None:
    from fastsel.engine.segments import Segments

    sites = [_inputs(2, 23, 24, 8) for _ in range(2)] + [_inputs(2, 23, 8, 30)]
    segments = Segments.from_spans(SPANS, 2, 23, sites[0][0].device)
    got = K.grouped_linear_sq_norms([x for x, _ in sites], [d for _, d in sites],
                                    segments=torch.tensor(SPANS, device=DEV), max_length=17)
    assert got.shape == (3, len(SPANS))
    for g, (x, d) in enumerate(sites):
        _assert_rel(got[g], LM.segment_sq_norms(x, d, segments))


def test_empty_inputs() -> None:
    norms, grads = K.linear_sq_norms(
        torch.zeros(0, 3, 4, device=DEV), torch.zeros(0, 3, 5, device=DEV), write_grads=True
    )
    assert norms.shape == (0,) and grads is not None and grads.shape == (0, 5, 4)
    norms, _ = K.linear_sq_norms(torch.zeros(2, 0, 4, device=DEV), torch.zeros(2, 0, 5, device=DEV))
    assert norms.tolist() == [0.0, 0.0]


def test_bad_arguments() -> None:
    x, d = _inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="expected x"):
        K.linear_sq_norms(x[0], d)
    with pytest.raises(ValueError, match="expected x"):
        K.linear_sq_norms(x, d[:, :2])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        K.linear_sq_norms(x.double(), d)
    with pytest.raises(ValueError, match="unknown method"):
        K.linear_sq_norms(x, d, method="fast")
    with pytest.raises(ValueError, match="write_grads"):
        K.linear_sq_norms(x, d, method="gram", write_grads=True)
    with pytest.raises(ValueError, match="T == 1"):
        K.linear_sq_norms(x, d, method="outer")
    with pytest.raises(ValueError, match="valid_range"):
        K.linear_sq_norms(x, d, valid_range=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        K.linear_sq_norms(x, d, valid_range=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch size"):
        K.grouped_linear_sq_norms([x, x[:1]], [d, d[:1]])
    with pytest.raises(ValueError, match="as many"):
        K.grouped_linear_sq_norms([x, x], [d])


def test_package_imports_without_triton() -> None:
    """`import fastsel.kernels` works without triton: available() is False and a kernel call raises ImportError."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        f"import {K.__name__} as K\n"
        "assert not K.available()\n"
        "assert K.choose_method(1, 4, 4) == 'outer'\n"
        "import torch\n"
        "try:\n"
        "    K.linear_sq_norms(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))\n"
        "except ImportError as e:\n"
        "    assert 'needs triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- real GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,method",
    [((4, 300, 4096, 16), "instantiate"), ((3, 200, 64, 2048), "instantiate"), ((2, 96, 2048, 1536), "gram")],
)
def test_gpu_16bit(dtype: torch.dtype, shape: tuple[int, int, int, int], method: str) -> None:
    x32, d32 = _inputs(*shape)
    x, d = x32.to(dtype), d32.to(dtype)
    norms, _ = K.linear_sq_norms(x, d, method=method)
    _assert_rel(norms, LM.sq_norms_instantiate(x32, d32), rtol=1e-2)  # vs the fp32 data before rounding
    _assert_rel(norms, LM.sq_norms_instantiate(x, d), rtol=1e-4)  # vs the same 16-bit values: exact products


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fp32_large() -> None:
    x, d = _inputs(8, 512, 4096, 16)
    ref = LM.sq_norms_instantiate(x.double(), d.double()).float()
    norms, grads = K.linear_sq_norms(x, d, method="instantiate", write_grads=True)
    _assert_rel(norms, ref)
    torch.testing.assert_close(
        grads, LM.per_example_grads(x.double(), d.double()).float(), rtol=1e-4, atol=1e-3
    )
    x, d = _inputs(2, 300, 1536, 2048)
    lengths = torch.tensor([300, 77], device=DEV)
    d = _masked(d, torch.stack([torch.zeros_like(lengths), lengths], 1))
    ref = LM.sq_norms_gram(x.double(), d.double()).float()
    for method in ("gram", "instantiate"):
        norms, _ = K.linear_sq_norms(x, d, method=method, valid_range=lengths)
        _assert_rel(norms, ref)
    got = K.grouped_linear_sq_norms([x, x], [d, d], valid_range=lengths)
    _assert_rel(got[1], ref)
