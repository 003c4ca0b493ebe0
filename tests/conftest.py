"""Shared test setup.

TRITON_INTERPRET must be set before the first `@triton.jit` is imported, so it is set here, at collection start,
whenever no CUDA device is present: Triton kernels then run on the CPU interpreter (slow: tests use small shapes).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread (and far faster on a busy machine, where OpenMP threads
    spin-wait); restored after the module. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
