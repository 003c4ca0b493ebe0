"""Triton dot kernels (`fastsel.kernels.linear_dot`) against the torch reference `fastsel.engine.dot_math`.

CPU interpreter without CUDA (conftest): tiny shapes; block overrides make them cross several tiles and token
blocks with ragged edges.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from needs import need_kernels

from fastsel.engine import dot_math as DM
from fastsel.engine import linear_math as LM

K = need_kernels()

LD = importlib.import_module(f"{K.__name__}.linear_dot")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(b: int, t: int, n: int, m: int, k: int, dtype: torch.dtype = torch.float32):
    return (torch.randn(b, t, n, device=DEV).to(dtype), torch.randn(b, t, m, device=DEV).to(dtype),
            torch.randn(k, m, n, device=DEV))


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
    assert err <= tol, err


def _masked(x: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.shape[1], device=x.device)
    keep = (pos[None, :] >= ranges[:, :1]) & (pos[None, :] < ranges[:, 1:])
    return x * keep[:, :, None].to(x.dtype)


# (B, T, n, m, K): LoRA A (m = r small) and B (n = r small) sites, ragged sizes, T == 1, K = 1..3
SHAPES = [(2, 7, 70, 8, 2), (2, 9, 8, 70, 1), (1, 5, 33, 17, 3), (2, 1, 24, 40, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["auto", "instantiate", "project"])
def test_norms_and_dots_match_reference(shape, method: str) -> None:
    x, d, r = _inputs(*shape)
    norms, dots = K.linear_sq_norms_dots(x, d, r, method=method)
    _close(dots, DM.linear_dots(x, d, r))
    _close(norms, LM.sq_norms_instantiate(x, d))
    _close(K.linear_dots(x, d, r, method=method), DM.linear_dots(x, d, r))


@pytest.mark.parametrize("method", ["instantiate", "project"])
def test_small_blocks_valid_range_and_strides(method: str) -> None:
    """Several tiles and token blocks, ranges with tokens outside them, non-contiguous inputs."""
    x = torch.randn(3, 50, 37, device=DEV).transpose(1, 2)  # [3, 37, 50]: feature stride 37
    d = torch.randn(3, 74, 40, device=DEV)[:, ::2, 3:37]  # [3, 37, 34]
    r = torch.randn(2, 34, 50, device=DEV)
    ranges = torch.tensor([[0, 37], [5, 27], [30, 30]], device=DEV)
    norms, dots = LD.linear_sq_norms_dots(x, d, r, valid_range=ranges, method=method, _blocks=(16, 16, 16))
    _close(dots, DM.linear_dots(_masked(x, ranges), _masked(d, ranges), r))
    assert dots[2].abs().max().item() == 0.0
    _close(norms, LM.sq_norms_instantiate(_masked(x, ranges), _masked(d, ranges)))


def test_16bit_inputs_against_the_same_values_in_fp32() -> None:
    x, d, r = _inputs(2, 21, 70, 16, 2, torch.float16)
    for method in ("instantiate", "project"):
        _close(K.linear_dots(x, d, r, method=method), DM.linear_dots(x.float(), d.float(), r))


def test_grouped_matches_per_site_with_ranges() -> None:
    b, t, k = 3, 9, 2
    lengths = torch.tensor([9, 4, 7], device=DEV)
    shapes = [(40, 8)] * 3 + [(8, 30)] * 2 + [(30, 300)]  # two groups and a lone Gram site
    xs = [torch.randn(b, t, n, device=DEV) for n, _ in shapes]
    ds = [torch.randn(b, t, m, device=DEV) for _, m in shapes]
    rs = [torch.randn(k, m, n, device=DEV) for n, m in shapes]
    ranges = torch.stack([torch.zeros_like(lengths), lengths], 1)
    norms, dots = K.grouped_linear_sq_norms_dots(xs, ds, rs, valid_range=lengths)
    assert norms.shape == (6, b) and dots.shape == (6, b, k)
    for i in range(6):
        x, d = _masked(xs[i], ranges), _masked(ds[i], ranges)
        _close(dots[i], DM.linear_dots(x, d, rs[i]))
        _close(norms[i], LM.sq_norms_instantiate(x, d))


def test_bad_references() -> None:
    x, d, r = _inputs(2, 5, 12, 4, 2)
    with pytest.raises(ValueError, match="references"):
        K.linear_dots(x, d, r.transpose(1, 2))
    with pytest.raises(ValueError, match="unknown method"):
        K.linear_dots(x, d, r, method="gram")
    with pytest.raises(ValueError, match="same number K"):
        K.grouped_linear_sq_norms_dots([x, x], [d, d], [r, r[:1]])


# packed rows: several sequences per row, a 1-token and a 2-token one, trailing padding (row 1)
SPANS = [(0, 0, 7), (0, 7, 8), (0, 8, 21), (1, 0, 2), (1, 2, 15), (2, 0, 21)]


def _segment_grads(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.stack([d[r, s:e].double().T @ x[r, s:e].double() for r, s, e in SPANS])


@pytest.mark.parametrize("method", ["auto", "instantiate", "project"])
@pytest.mark.parametrize(("n", "m"), [(70, 8), (8, 70), (33, 17)])
def test_segments_norms_and_dots_match_per_sequence_reference(method: str, n: int, m: int) -> None:
    x, d, r = _inputs(3, 21, n, m, 2)
    seg = torch.tensor(SPANS, dtype=torch.int32, device=DEV)
    grads = _segment_grads(x, d)
    expected = grads.flatten(1) @ r.double().flatten(1).T
    norms, dots = K.linear_sq_norms_dots(x, d, r, segments=seg, max_length=21, method=method, _blocks=(16, 16, 16))
    _close(norms, grads.square().sum(dim=(1, 2)))
    _close(dots, expected)
    _close(K.linear_dots(x, d, r, segments=seg, max_length=21, method=method), expected)


def test_grouped_segments_match_per_site() -> None:
    shapes = [(24, 4), (24, 4), (4, 40)]
    xs, ds, rs = zip(*[_inputs(3, 21, n, m, 2) for n, m in shapes], strict=True)
    seg = torch.tensor(SPANS, dtype=torch.int32, device=DEV)
    norms, dots = K.grouped_linear_sq_norms_dots(list(xs), list(ds), list(rs), segments=seg, max_length=21)
    assert norms.shape == (3, 6) and dots.shape == (3, 6, 2)
    for g, (x, d, r) in enumerate(zip(xs, ds, rs, strict=True)):
        grads = _segment_grads(x, d)
        _close(norms[g], grads.square().sum(dim=(1, 2)))
        _close(dots[g], grads.flatten(1) @ r.double().flatten(1).T)
