"""The reversion analysis: dots, cosines and TopK-Cosine against a naive one-example-at-a-time backward; the
correlations against numpy / scipy; the chosen weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fastsel.engine.losses import per_example_losses
from fastsel.experiments.controls.reversion import (
    correlation,
    layer_weights,
    reversion_direction,
    reversion_scores,
    top_k_mask,
)
from fastsel.integrations.models import tiny_random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A pretrained tiny Llama and an 'aligned' copy whose last layer's projections moved."""
    pretrained, aligned = tiny_random_model(seed=0), tiny_random_model(seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if ".layers.1." in name and name.endswith("proj.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pretrained, aligned


def _rows(n: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        length, prompt = 4 + (i * 3) % 11, 2 + i % 3
        ids = torch.randint(3, 262, (length,), generator=g).tolist()
        out.append({"id": f"row{i}", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_dots_and_cosines_equal_a_naive_per_example_loop() -> None:
    pretrained, aligned = _models()
    gamma_all = reversion_direction(pretrained, aligned)
    names = layer_weights(aligned, [-1], gamma_all)
    assert names and all(".layers.1." in n for n in names)
    for n, p in aligned.named_parameters():
        p.requires_grad_(n in names)
    gamma = {n: gamma_all[n] for n in names}
    rows = _rows()
    got = reversion_scores(aligned, rows, gamma, topk=50, batch_size=4, pad_token_id=0, backend="torch")
    masks = top_k_mask(gamma, 50)
    assert sum(int(m.sum()) for m in masks.values()) == 50
    params = dict(aligned.named_parameters())
    want_dot, want_cos, want_topk = [], [], []
    for row in rows:  # one example at a time: its own forward and backward
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        aligned.zero_grad(set_to_none=True)
        logits = aligned(input_ids=ids).logits
        per_example_losses(logits, labels).sum().backward()
        grads = {n: params[n].grad.detach().clone() for n in names}
        dot = sum(float((grads[n] * gamma[n]).sum()) for n in names)
        g_norm = math.sqrt(sum(float(grads[n].square().sum()) for n in names))
        gam_norm = math.sqrt(sum(float(gamma[n].square().sum()) for n in names))
        sub_dot = sum(float((grads[n] * gamma[n])[masks[n]].sum()) for n in names)
        sub_g = math.sqrt(sum(float(grads[n][masks[n]].square().sum()) for n in names))
        sub_gam = math.sqrt(sum(float(gamma[n][masks[n]].square().sum()) for n in names))
        want_dot.append(dot)
        want_cos.append(-dot / (g_norm * gam_norm))
        want_topk.append(-sub_dot / (sub_g * sub_gam))
    aligned.zero_grad(set_to_none=True)
    scale = max(abs(d) for d in want_dot)
    assert max(abs(a - b) for a, b in zip(got["dot"], want_dot, strict=True)) <= 1e-5 * scale
    np.testing.assert_allclose(got["cosine"], want_cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["topk_cosine"], want_topk, rtol=1e-4, atol=1e-6)
    assert got["id"] == [r["id"] for r in rows]
    assert all(p.grad is None for p in aligned.parameters())  # left as found


def test_correlations_equal_numpy_and_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    y[3] = y[4]  # a tie for the ranks
    pearson = correlation(x, y, method="pearson", n_boot=500)
    spearman = correlation(x, y, method="spearman", n_boot=500)
    assert pearson["r"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert spearman["r"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    for c in (pearson, spearman):
        assert c["ci95"][0] < c["r"] < c["ci95"][1] and c["n"] == 40
    with pytest.raises(ValueError, match="equal-length"):
        correlation([1.0, 2.0], [1.0, 2.0])


def test_unchanged_layers_are_refused_by_name() -> None:
    pretrained = tiny_random_model(seed=0)
    gamma = reversion_direction(pretrained, tiny_random_model(seed=0))
    with pytest.raises(ValueError, match=r"no weight of decoder layers \[0\] differs"):
        layer_weights(pretrained, [0], gamma)
