"""`nn.Linear` (also PEFT's lora_A / lora_B): weight [out, in] with G_i = sum_t delta_t x_t^T, bias sum_t delta_t."""

from __future__ import annotations

from torch import Tensor, nn

from fastsel.engine.sites import Factors, Site, register


@register(nn.Linear)
class LinearSite(Site):
    def roles(self, module: nn.Module) -> dict[str, str] | None:
        return {"weight": "weight", "bias": "bias"} if type(module).forward is nn.Linear.forward else None

    def factors(self, module: nn.Module, role: str, inp: Tensor, grad_out: Tensor) -> Factors:
        return Factors(grad_out, inp) if role == "weight" else Factors(grad_out, None)
