"""Shared test setup.

TRITON_INTERPRET must be set before the first `@triton.jit` is imported, so it is set here, at collection start,
whenever no CUDA device is present: Triton kernels then run on the CPU interpreter (slow: tests use small shapes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
