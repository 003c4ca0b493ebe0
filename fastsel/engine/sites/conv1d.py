"""transformers' `Conv1D` (GPT-2 and its kin, full fine-tuning): y = x W + b with W [in, out], so the weight's
per-example gradient is G_i = sum_t x_t delta_t^T (the transpose of a Linear's) and the bias's sum_t delta_t."""

from __future__ import annotations

from torch import Tensor, nn

from fastsel.engine.sites import Factors, Site, register

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a core dependency; without it there is no Conv1D to support
    Conv1D = None


if Conv1D is not None:

    @register(Conv1D)
    class Conv1DSite(Site):
        def roles(self, module: nn.Module) -> dict[str, str] | None:
            return {"weight": "weight", "bias": "bias"} if type(module).forward is Conv1D.forward else None

        def factors(self, module: nn.Module, role: str, inp: Tensor, grad_out: Tensor) -> Factors:
            return Factors(inp, grad_out) if role == "weight" else Factors(grad_out, None)
