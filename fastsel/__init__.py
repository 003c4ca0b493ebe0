"""fastsel: exact per-example gradient norms in one batched backward, and gradient-based sample selection
(Moderate-G, Bach et al. 2026) for keeping LLMs safe while they are fine-tuned.

Public API: `grad_norms`, `select`, `Selection`, `backends`; gradient alignment: `reference_gradient`,
`grad_dots`, `norm_pass(..., reference=R)`; training: `selective_backward`, `train`.
Nothing registers itself as an import side effect; heavy modules load on first use. The one exception: two
messages of installed packages addressed to their authors are silenced (`fastsel.foreign_noise`).
"""

from __future__ import annotations

from typing import Any

from fastsel import foreign_noise

__version__ = "0.1.0"
foreign_noise.silence()

_LAZY = {
    "grad_norms": ("fastsel.engine.norms", "grad_norms"),
    "norm_pass": ("fastsel.engine.norms", "norm_pass"),
    "grad_dots": ("fastsel.engine.alignment", "grad_dots"),
    "reference_gradient": ("fastsel.engine.alignment", "reference_gradient"),
    "register_packed_attention": ("fastsel.engine.packed_attention", "register"),
    "packed_attention": ("fastsel.engine.packed_attention", "packed_attention"),
    "select": ("fastsel.selection.rules", "select"),
    "select_indices": ("fastsel.selection.rules", "select_indices"),
    "Selection": ("fastsel.selection.rules", "Selection"),
    "selective_backward": ("fastsel.training.selective", "selective_backward"),
    "train": ("fastsel.training.loop", "train"),
    "TrainConfig": ("fastsel.training.loop", "TrainConfig"),
    "TrainResult": ("fastsel.training.loop", "TrainResult"),
    "CheckpointError": ("fastsel.training.checkpoint", "CheckpointError"),
    "UnreducedGradientError": ("fastsel.training.selective", "UnreducedGradientError"),
    "SelectiveStep": ("fastsel.training.selective", "SelectiveStep"),
    "score_dataset": ("fastsel.experiments.scoring.run", "score_dataset"),  # needs the [experiments] extra
}

__all__ = ["backends", "__version__", *_LAZY]


_SUBMODULES = ("hf",)  # `fastsel.hf` works after `import fastsel`, imported on first use


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fastsel.{name}")
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'fastsel' has no attribute {name!r}")


def backends(run_selftest: bool = False) -> dict[str, Any]:
    """Which implementations are active: selection ops ('cpp', 'cpp-jit' or 'torch-fallback'), the norm backend
    'auto' picks here, and the Triton kernels' first-use self-test results ({'cuda:0 bfloat16 gram': 'passed
    (0.4 s)' or 'FAILED, torch used: ...'}; empty until a Triton norm pass ran on CUDA).

    `run_selftest=True` first self-tests every kernel family on the current CUDA device in fp32, bf16 and fp16
    (nothing without CUDA), instead of waiting for the first norm pass.
    """
    import importlib

    import torch

    # the package root is a lazy facade: it imports its layers only when called (so no layer depends on it)
    kernels = importlib.import_module("fastsel.kernels")
    select_ops = importlib.import_module("fastsel.selection.ops")
    selftest = importlib.import_module("fastsel.engine.kernel_selftest")

    cuda_triton = torch.cuda.is_available() and kernels.available()
    if run_selftest and cuda_triton:
        selftest.run_all(torch.device("cuda", torch.cuda.current_device()))
    norms_auto = "triton" if cuda_triton else "torch"
    if cuda_triton and selftest.failed():
        norms_auto += f" (torch math for the kernels that failed their self-test: {', '.join(selftest.failed())})"
    return {
        "selection": select_ops.implementation(),
        "norms_auto": norms_auto,
        "triton_kernels": "available" if kernels.available() else "unavailable",
        "triton_selftest": selftest.report(),
    }
