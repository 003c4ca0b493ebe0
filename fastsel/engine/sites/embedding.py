"""`nn.Embedding`: weight [V, d] whose row v gets sum of delta_t over the positions holding token v.

Positions holding `padding_idx` give no gradient (torch's own rule), so their output-grads are zeroed. Embeddings
with max_norm, scale_grad_by_freq or sparse gradients change that rule and are not supported.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastsel.engine.sites import Factors, Site, register


@register(nn.Embedding)
class EmbeddingSite(Site):
    def roles(self, module: nn.Module) -> dict[str, str] | None:
        if type(module).forward is not nn.Embedding.forward:
            return None
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return None
        return {"weight": "weight"}

    def factors(self, module: nn.Module, role: str, inp: Tensor, grad_out: Tensor) -> Factors:
        if module.padding_idx is not None:
            grad_out = grad_out.masked_fill((inp == module.padding_idx)[..., None], 0.0)
        return Factors(inp, grad_out)
