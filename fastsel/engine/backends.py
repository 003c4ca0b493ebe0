"""The norm backends as objects: the per-site math of one batch's examples (its `Segments`), in torch or Triton.

A `TorchMath` (backend 'torch') or `TritonMath` (backend 'triton') is made per batch by `math_for` and handed to
each parameter's accumulator (`engine.accumulate`): per-site squared norms, per-example gradients, fused norms and
reference dots, dots alone, and, where the backend launches many sites at once (`groups`), the grouped forms that
`resolve_deferred` calls after backward.

Triton: each kernel family is used only once it passed its first-use self-test on the tensors' device and dtypes
(`kernel_selftest.usable`); a family that failed falls back to the torch math (`strict` False, i.e. backend
'auto') or raises KernelSelfTestError (`strict`, an explicit backend='triton'). Packed batches use the segment
families ('segment_instantiate', 'segment_gram', ...), whose self-test covers several segments per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsel.engine import dot_math, kernel_selftest, linear_math
from fastsel.engine.segments import Segments


class TorchMath:
    """The torch math, bound to one batch's examples (padded rows, or packed sequences)."""

    name = "torch"
    groups = False  # no grouped launch: every site is computed when its call's gradient arrives

    def __init__(self, segments: Segments) -> None:
        self.segments = segments

    def sq_norms(self, x: Tensor, delta: Tensor) -> Tensor:
        """||G_i||^2 per example of one Linear call: x [R, T, n], delta [R, T, m] -> [B]."""
        if self.segments.packed:
            return linear_math.segment_sq_norms(x, delta, self.segments)
        return linear_math.sq_norms(x, delta)

    def grads(self, x: Tensor, delta: Tensor) -> Tensor:
        """The per-example gradients G_i [B, m, n] in fp32."""
        if self.segments.packed:
            return linear_math.segment_grads(x, delta, self.segments)
        return linear_math.per_example_grads(x, delta)

    def sq_norms_and_dots(self, x: Tensor, delta: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
        """||G_i||^2 [B] and <G_i, R_k> [B, K] in one go."""
        if self.segments.packed:
            return dot_math.sq_norms_and_dots(x, delta, refs, segments=self.segments)
        return dot_math.sq_norms_and_dots(x, delta, refs)

    def dots(self, x: Tensor, delta: Tensor, refs: Tensor) -> Tensor:
        """<G_i, R_k> [B, K] without the norms."""
        if self.segments.packed:
            return dot_math.linear_dots(x, delta, refs, self.segments)
        return dot_math.linear_dots(x, delta, refs)

    def grouped_sq_norms(self, xs: list[Tensor], deltas: list[Tensor]) -> Tensor:
        return torch.stack([self.sq_norms(x, d) for x, d in zip(xs, deltas, strict=True)])

    def grouped_sq_norms_dots(self, xs: list[Tensor], deltas: list[Tensor], refs: list[Tensor]
                              ) -> tuple[Tensor, Tensor]:
        parts = [self.sq_norms_and_dots(x, d, r) for x, d, r in zip(xs, deltas, refs, strict=True)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


class TritonMath(TorchMath):
    """The Triton kernels, each family after its first-use self-test (else the torch math, or an error when
    `strict`); the direct Linear sites wait for one grouped launch after backward."""

    name = "triton"
    groups = True

    def __init__(self, segments: Segments, *, strict: bool = True) -> None:
        super().__init__(segments)
        from fastsel import kernels

        if not kernels.available():
            raise RuntimeError("backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                               "use backend='torch'")
        self.kernels = kernels
        self.strict = strict
        self.seq_len = segments.width
        self.ranges = segments.ranges
        # the longest example bounds the Gram grid and decides the form (padded: the row width, known without a sync)
        self.length = segments.max_length if segments.packed else None

    def _ranged(self, t: int) -> Tensor | None:  # the segments apply only to sites over the batch's tokens
        return self.ranges if t == self.seq_len else None

    def _longest(self, t: int) -> int | None:
        return self.length if t == self.seq_len else None

    def _usable(self, name: str, x: Tensor, delta: Tensor) -> bool:
        family = f"segment_{name}" if self.segments.packed else name
        return kernel_selftest.usable(family, x.device, x.dtype, delta.dtype, strict=self.strict)

    def _method(self, x: Tensor, delta: Tensor) -> str:  # the kernels' own choice (packed: by the longest example)
        t = x.shape[1]
        return self.kernels.choose_method(self._longest(t) or t, delta.shape[2], x.shape[2])

    def sq_norms(self, x: Tensor, delta: Tensor) -> Tensor:
        t, method = x.shape[1], self._method(x, delta)
        if not self._usable(method, x, delta):
            return super().sq_norms(x, delta) if self.segments.packed else linear_math.sq_norms(x, delta, method)
        return self.kernels.linear_sq_norms(x, delta, method=method, segments=self._ranged(t),
                                            max_length=self._longest(t))[0]

    def grouped_sq_norms(self, xs: list[Tensor], deltas: list[Tensor]) -> Tensor:
        if len({x.shape[1] for x in xs}) != 1 or not all(
                self._usable("grouped", x, d) and self._usable(self._method(x, d), x, d)
                for x, d in zip(xs, deltas, strict=True)):
            return torch.stack([self.sq_norms(x, d) for x, d in zip(xs, deltas, strict=True)])
        t = xs[0].shape[1]
        return self.kernels.grouped_linear_sq_norms(xs, deltas, segments=self._ranged(t), max_length=self._longest(t))

    def grads(self, x: Tensor, delta: Tensor) -> Tensor:
        if not self._usable("write_grads", x, delta):
            return super().grads(x, delta)
        return self.kernels.linear_sq_norms(x, delta, method="instantiate", write_grads=True,
                                            segments=self._ranged(x.shape[1]))[1]

    def sq_norms_and_dots(self, x: Tensor, delta: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
        if not self._usable("dots", x, delta):
            return super().sq_norms_and_dots(x, delta, refs)
        t = x.shape[1]
        return self.kernels.linear_sq_norms_dots(x, delta, refs, segments=self._ranged(t),
                                                 max_length=self._longest(t))

    def grouped_sq_norms_dots(self, xs: list[Tensor], deltas: list[Tensor], refs: list[Tensor]
                              ) -> tuple[Tensor, Tensor]:
        if len({x.shape[1] for x in xs}) != 1 or not all(
                self._usable("grouped_dots", x, d) for x, d in zip(xs, deltas, strict=True)):
            parts = [self.sq_norms_and_dots(x, d, r) for x, d, r in zip(xs, deltas, refs, strict=True)]
            return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        t = xs[0].shape[1]
        return self.kernels.grouped_linear_sq_norms_dots(xs, deltas, refs, segments=self._ranged(t),
                                                         max_length=self._longest(t))

    def dots(self, x: Tensor, delta: Tensor, refs: Tensor) -> Tensor:
        if not self._usable("dots", x, delta):
            return super().dots(x, delta, refs)
        return self.kernels.linear_dots(x, delta, refs, segments=self._ranged(x.shape[1]))


def math_for(backend: str, segments: Segments, *, strict: bool = True) -> TorchMath:
    """The math of a resolved backend name ('torch' or 'triton') for one batch's examples."""
    if backend == "triton":
        return TritonMath(segments, strict=strict)
    if backend == "torch":
        return TorchMath(segments)
    raise ValueError(f"internal error: no batched math for backend {backend!r}")


__all__ = ["TorchMath", "TritonMath", "math_for"]
