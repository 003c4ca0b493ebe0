"""fastsel: exact per-example gradient norms in one batched backward, and gradient-based sample selection
(Moderate-G, Bach et al. 2026) for keeping LLMs safe while they are fine-tuned.

Public API: `grad_norms`, `select`, `Selection`, `backends`; training: `selective_backward`, `train`.
Nothing registers itself as an import side effect; heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "grad_norms": ("fastsel.norms", "grad_norms"),
    "norm_pass": ("fastsel.norms", "norm_pass"),
    "select": ("fastsel.selection", "select"),
    "select_indices": ("fastsel.selection", "select_indices"),
    "Selection": ("fastsel.selection", "Selection"),
    "selective_backward": ("fastsel.step", "selective_backward"),
    "train": ("fastsel.train", "train"),
    "TrainConfig": ("fastsel.train", "TrainConfig"),
    "TrainResult": ("fastsel.train", "TrainResult"),
    "CheckpointError": ("fastsel.checkpoint", "CheckpointError"),
    "UnreducedGradientError": ("fastsel.step", "UnreducedGradientError"),
}

__all__ = ["backends", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'fastsel' has no attribute {name!r}")


def backends() -> dict[str, str]:
    """Which implementations are active: selection ops ('cpp', 'cpp-jit' or 'torch-fallback') and norms."""
    import torch

    from fastsel import kernels, select_ops

    return {
        "selection": select_ops.implementation(),
        "norms_auto": "triton" if torch.cuda.is_available() and kernels.available() else "torch",
        "triton_kernels": "available" if kernels.available() else "unavailable",
    }
