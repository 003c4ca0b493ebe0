"""Capture's call chains and the norm pass's weight-free backward: with LoRA-only targets the backward stops at
the lora_A outputs, computes no parameter gradient, and gives the same norms."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_same, full_finetune, lora, make_batch, make_packed, snapshot, tiny_model

import fastsel
from fastsel.engine.capture import Capture
from fastsel.engine.model_io import forward_losses, prepare_for
from fastsel.engine.targets import find_targets


def _chain(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    modules = {m for t in find_targets(model) for _, m, _ in t.owners}
    with Capture(modules, lambda *_: None) as capture:
        losses, _ = forward_losses(model, prepare_for(model, batch))  # the graph keeps the chain's tensors
        chain = capture.chain_inputs()
        del losses
        return chain


def test_lora_calls_chain_and_full_finetuning_does_not() -> None:
    model = lora(tiny_model(), r=2, targets=["q_proj", "down_proj"])
    chain = _chain(model, make_batch([5, 6]))
    assert chain is not None and len(chain) == 2 * 2  # one lora_A output per adapted module and layer
    assert all(t.shape[-1] == 2 for t in chain)  # rank-2 activations: the cheap stopping points
    assert _chain(full_finetune(tiny_model()), make_batch([5, 6])) is None


@pytest.mark.parametrize("packed", [False, True])
def test_weight_free_backward_same_norms_and_no_parameter_gradient(monkeypatch: pytest.MonkeyPatch,
                                                                   packed: bool) -> None:
    model = lora(tiny_model(), r=4)
    batch = make_packed([[5, 7], [6, 4]]) if packed else make_batch([6, 9, 4], side="left")
    calls: list[str] = []
    handles = [p.register_hook(lambda g, n=n: calls.append(n))
               for n, p in model.named_parameters() if p.requires_grad]
    before = snapshot(model)
    fast = fastsel.norm_pass(batch, model, backend="torch", keep_grads=True)
    assert calls == []  # autograd computed no parameter gradient
    monkeypatch.setattr(Capture, "chain_inputs", lambda self: None)  # the plain backward
    plain = fastsel.norm_pass(batch, model, backend="torch", keep_grads=True)
    assert calls  # that one does
    for h in handles:
        h.remove()
    assert_same(before, model)
    torch.testing.assert_close(fast.norms, plain.norms, rtol=1e-6, atol=0)
    for name, g in plain.per_example_grads.items():
        torch.testing.assert_close(fast.per_example_grads[name], g, rtol=1e-6, atol=1e-9)
