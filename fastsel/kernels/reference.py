"""The naive torch reference every kernel's self-test case is checked against, and the comparison it uses.

Every kernel computes something of the per-example weight gradient G_i = sum_t delta_t x_t^T over example i's
tokens [start, end) of one row: its squared norm, its dots with reference gradients, or G_i itself. The reference
builds G_i the plainest way (one fp32 matmul per example) so that a kernel is never checked against another
optimisation. A padded example is the segment (row, start, end) of its valid tokens; a packed row holds several.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

RTOL = 1e-3  # fp32 summation order moves the last bits (~1e-6); a wrong tile or a missed block moves far more

Span = tuple[int, int, int]  # (row, start, end): one example's tokens

# one example per row: a full row, a left-padded and a right-padded one ([start, end) of 21 tokens)
PADDED_BOUNDS: tuple[tuple[int, int], ...] = ((0, 21), (4, 21), (0, 13))
# packed rows (several examples per row, trailing padding, a 1-token and a 2-token sequence)
PACKED_SPANS: tuple[Span, ...] = ((0, 0, 7), (0, 7, 8), (0, 8, 21), (1, 0, 2), (1, 2, 15), (2, 0, 21))


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

    def refs(self, k: int, m: int, n: int, seed: int) -> Tensor:
        """fp32 reference gradients [K, m, n] on the device (drawn on the CPU)."""
        return torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def ranges(self, bounds: Sequence[tuple[int, int]]) -> Tensor:
        """[B, 2] [start, end) token ranges (left / right padded examples) on the device."""
        return torch.tensor(list(bounds), dtype=torch.long, device=self.device)

    def segments(self, spans: Sequence[Span] = PACKED_SPANS) -> Tensor:
        """[S, 3] (row, start, end) int32 segments on the device."""
        return torch.tensor(list(spans), dtype=torch.int32, device=self.device)


def ops() -> ModuleType:
    """The package `fastsel.kernels`: a self-test case calls the public entry points there, as the engine does."""
    return importlib.import_module(__package__ or "fastsel.kernels")


def padded_spans(bounds: Sequence[tuple[int, int]]) -> list[Span]:
    """One example per row: row b's [start, end) as the span (b, start, end)."""
    return [(b, s, e) for b, (s, e) in enumerate(bounds)]


@contextmanager
def exact_fp32() -> Iterator[None]:
    """The torch reference in true fp32 (no TF32), whatever the user set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def example_grads(x: Tensor, delta: Tensor, spans: Sequence[Span]) -> Tensor:
    """fp32 per-example gradients [S, m, n]: delta[row, s:e]^T @ x[row, s:e], one matmul per example."""
    with exact_fp32():
        return torch.stack([delta[r, s:e].float().T @ x[r, s:e].float() for r, s, e in spans])


def grad_sq_norms(grads: Tensor) -> Tensor:
    """||G_i||_F^2 [S] of per-example gradients [S, m, n]."""
    return grads.square().sum(dim=(1, 2))


def grad_dots(grads: Tensor, refs: Tensor) -> Tensor:
    """<G_i, R_k> [S, K] of per-example gradients [S, m, n] with references [K, m, n]."""
    with exact_fp32():
        return grads.flatten(1) @ refs.float().flatten(1).T


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


__all__ = ["PACKED_SPANS", "PADDED_BOUNDS", "RTOL", "Case", "KernelMismatch", "compare", "example_grads", "exact_fp32", "grad_dots",
           "grad_sq_norms", "ops", "padded_spans"]
