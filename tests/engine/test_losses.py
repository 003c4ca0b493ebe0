"""Per-example losses: the chunked cross-entropy against torch's, and logits computed only at the supervised
columns against the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import full_finetune, lora, make_batch, make_packed, tiny_model

from fastsel.engine import losses as L
from fastsel.engine.batch import prepare_batch
from fastsel.engine.model_io import forward_logits, forward_losses, supervised_columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 63, 64, 65, 150])  # around the chunk size
def test_token_cross_entropy_equals_torch(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    logits = (3 * torch.randn(rows, 301)).to(dtype).requires_grad_()
    targets = torch.randint(0, 301, (rows,))
    targets[::5] = -100
    weights = torch.randn(rows)
    got = L.token_cross_entropy(logits, targets)
    (got * weights).sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    (expected * weights).sum().backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got_grad.float(), logits.grad.float(), rtol=tol, atol=tol)
    assert got_grad.dtype == dtype and bool((got[targets == -100] == 0).all())


def test_a_row_does_not_depend_on_its_chunk_neighbours() -> None:
    """The same position alone or inside a full chunk gives the same bits (FSDP ranks see other rows)."""
    torch.manual_seed(0)
    logits, targets = torch.randn(100, 4099), torch.randint(0, 4099, (100,))
    whole = L.token_cross_entropy(logits, targets)
    for i in (0, 63, 64, 99):
        assert torch.equal(L.token_cross_entropy(logits[i:i + 1], targets[i:i + 1]), whole[i:i + 1])


@pytest.mark.parametrize("layout", ["padded-left", "padded-right", "packed"])
def test_supervised_columns_give_the_full_logits_losses_and_gradients(layout: str) -> None:
    model = lora(tiny_model(), r=4)
    batch = (make_packed([[5, 7], [6, 4]], prompt=3) if layout == "packed"
             else make_batch([6, 9, 4], side=layout.split("-")[1], prompt=3))
    prepared = prepare_batch(batch)
    columns = supervised_columns(model, prepared["labels"])
    assert columns is not None and 0 < columns.numel() < prepared["labels"].shape[1] - 1
    full = L.per_example_losses(forward_logits(model, prepared), prepared["labels"], prepared["segments"])
    full_grads = torch.autograd.grad(full.sum(), [p for p in model.parameters() if p.requires_grad])
    kept, stats = forward_losses(model, prepared, token_stats=True)
    kept_grads = torch.autograd.grad(kept.sum(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(kept_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    expected = L.token_statistics(forward_logits(model, prepared).detach(), prepared["labels"],
                                  prepared["segments"])
    for key, value in expected.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-5, atol=1e-5)


def test_a_trained_output_layer_keeps_every_position() -> None:
    """fastsel hooks a trainable LM head (or tied embedding) and reads all its positions: no column restriction."""
    batch = prepare_batch(make_batch([5, 7]))
    assert supervised_columns(full_finetune(tiny_model(tie=True)), batch["labels"]) is None
    assert supervised_columns(lora(tiny_model()), batch["labels"]) is not None
