"""KL to the adapter-disabled reference, EWC penalty, O-LoRA penalty, diagonal Fisher: each against a plain
computation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import VOCAB, lora, make_batch, tiny_model

from fastsel.engine.batch import collate, prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits
from fastsel.training.regularizers import (
    anchor_parameters,
    check_ewc_state,
    check_olora_state,
    diagonal_fisher,
    ewc_penalty,
    kl_per_example,
    kl_to_reference_loss,
    lora_a_weights,
    olora_penalty,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_is_zero_when_the_adapter_is_zero() -> None:
    model = lora(tiny_model())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    kl = kl_to_reference_loss(model, make_batch([5, 8, 6], side="left"))
    assert abs(float(kl.detach())) < 1e-7


def test_kl_equals_hand_computed_value_and_trains_only_the_adapter() -> None:
    model = lora(tiny_model("qwen2"))
    batch = make_batch([4, 6], seed=3)  # right padded; the first 2 tokens of each row are unsupervised
    per_example = kl_per_example(model, batch)
    prepared = prepare_batch(batch)
    with torch.no_grad():
        logits = forward_logits(model, prepared).double()
        with model.disable_adapter():
            ref = forward_logits(model, prepared).double()
    expected = []
    for i in range(2):
        terms = []
        for t in range(prepared["labels"].shape[1] - 1):
            if prepared["labels"][i, t + 1] == -100:
                continue
            p_ref = ref[i, t].softmax(-1)
            p = logits[i, t].softmax(-1)
            terms.append(sum(float(p_ref[v]) * (math.log(float(p_ref[v])) - math.log(float(p[v])))
                             for v in range(VOCAB)))
        expected.append(sum(terms) / len(terms))
    assert len(expected) == 2 and min(expected) > 0
    torch.testing.assert_close(per_example.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4,
                               atol=1e-8)
    loss = kl_to_reference_loss(model, batch)
    assert float(loss.detach()) == pytest.approx(sum(expected) / 2, rel=1e-4)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)


def test_kl_with_an_explicit_reference_and_non_peft_refusal() -> None:
    model = lora(tiny_model())
    batch = make_batch([5, 7])
    base = tiny_model()  # the same weights as the adapter-disabled model
    torch.testing.assert_close(kl_per_example(model, batch, reference=base), kl_per_example(model, batch))
    with pytest.raises(TypeError, match="disable_adapter"):
        kl_to_reference_loss(tiny_model(), batch)


def test_ewc_penalty_by_hand() -> None:
    model = lora(tiny_model(), r=2)
    g = torch.Generator().manual_seed(0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)[:3]
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in names}
    anchor = {n: torch.randn(params[n].shape, generator=g) for n in names}
    penalty = ewc_penalty(model, fisher, anchor)
    expected = 0.0
    for n in names:
        for f, p, a in zip(fisher[n].flatten().tolist(), params[n].detach().flatten().tolist(),
                           anchor[n].flatten().tolist(), strict=True):
            expected += 0.5 * f * (p - a) ** 2
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for n in names:  # d/dtheta of 1/2 F (theta - theta*)^2 = F (theta - theta*)
        torch.testing.assert_close(params[n].grad, fisher[n] * (params[n].detach() - anchor[n]))
    at_anchor = {n: anchor_parameters(model)[n] for n in names}
    assert float(ewc_penalty(model, fisher, at_anchor).detach()) == 0.0


def test_ewc_state_is_checked() -> None:
    model = lora(tiny_model(), r=2)
    anchor = anchor_parameters(model)
    fisher = {n: torch.ones_like(t) for n, t in anchor.items()}
    check_ewc_state(model, fisher, anchor)
    with pytest.raises(ValueError, match="different parameters"):
        check_ewc_state(model, fisher, dict(list(anchor.items())[1:]))
    name = next(iter(anchor))
    with pytest.raises(ValueError, match="shape"):
        check_ewc_state(model, {**fisher, name: torch.ones(2)}, anchor)
    with pytest.raises(ValueError, match="not a parameter"):
        check_ewc_state(model, {"nope": torch.ones(1)}, {"nope": torch.ones(1)})


def _rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(9)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def test_diagonal_fisher_equals_naive_per_example_loop() -> None:
    model = lora(tiny_model(), r=2, dropout=0.1)  # dropout: the Fisher is taken in eval mode
    model.train()
    rows = _rows(7)
    fisher = diagonal_fisher(model, rows, batch_size=3)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in rows:
        single = prepare_batch(collate([row], 0))
        loss = per_example_losses(forward_logits(model, single), single["labels"])[0]
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            expected[n] += g.square() / len(rows)
    assert fisher.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)
    from_batches = diagonal_fisher(model, [collate(rows[:4], 0), collate(rows[4:], 0)])
    for n in expected:
        torch.testing.assert_close(from_batches[n], expected[n], rtol=1e-4, atol=1e-10)


def _lora_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n}


def test_olora_penalty_by_hand() -> None:
    """lambda_1 * sum |A_new A_old^T| over the sites + lambda_2 * sum of the LoRA parameters' L2 norms, value and
    gradient, entry by entry."""
    model = lora(tiny_model(), r=2)
    g = torch.Generator().manual_seed(1)
    sites = _lora_a(model)
    names = list(sites)[:2]
    previous = {n: torch.randn(3, sites[n].shape[1], generator=g) for n in names}  # 3 earlier rows per site
    penalty = olora_penalty(model, previous, orth_coef=0.5, l2_coef=0.0)
    expected = 0.0
    for n in names:
        new = sites[n].detach().tolist()
        for row in new:
            for old in previous[n].tolist():
                expected += 0.5 * abs(sum(a * b for a, b in zip(row, old, strict=True)))
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for n in names:  # d/dA sum |A O^T| = sign(A O^T) O
        torch.testing.assert_close(sites[n].grad, 0.5 * torch.sign(sites[n].detach() @ previous[n].T) @ previous[n])
    lora_params = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    l2 = olora_penalty(model, None, orth_coef=0.5, l2_coef=0.25)
    norms = sum(math.sqrt(sum(v * v for v in p.detach().flatten().tolist())) for p in lora_params)
    assert float(l2.detach()) == pytest.approx(0.25 * norms, rel=1e-5)


def test_olora_state_is_checked() -> None:
    model = lora(tiny_model(), r=2)
    name, a = next(iter(_lora_a(model).items()))
    check_olora_state(model, {name: torch.zeros(4, a.shape[1])})
    with pytest.raises(ValueError, match=r"must be \[r_old, "):
        check_olora_state(model, {name: torch.zeros(4, a.shape[1] + 1)})
    with pytest.raises(ValueError, match="is not a lora_A weight"):
        check_olora_state(model, {name.replace("lora_A", "lora_B"): torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="no trainable lora_A"):
        lora_a_weights(tiny_model())
    snapshot = lora_a_weights(model)
    assert set(snapshot) == set(_lora_a(model)) and all(not t.requires_grad for t in snapshot.values())
