"""pytest-benchmark comparisons at small shapes: the same methods as `fastsel bench`, checked equal first.

Run: `pytest benchmarks/bench_norms.py` (not collected by `make test`, which runs `pytest tests`).
Add `--benchmark-json out.json` to keep the numbers, `--benchmark-compare` to compare with a saved run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsel.bench import suite as bench

SHAPES = [  # (model, B, T, r): tiny random HF Llama and one synthetic LoRA Linear
    ("synthetic", 8, 64, 16),
    ("smollm2", 8, 32, 8),  # tiny random Llama of the same architecture (ModelCache tiny=True)
]
CACHE = bench.ModelCache("cpu", tiny=True)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}-r{s[3]}")
def setup(request) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Model and batch, with every method's norms checked equal before anything is timed."""
    name, b, t, r = request.param
    model = CACHE.get(name, r, "float32")
    batch = bench.bench_batch(b, t, CACHE.vocab[name])
    norms, rows = {}, {}
    for method in bench.NORM_METHODS:
        try:
            norms[method] = bench.METHOD_FNS[method](batch, model).detach().float().cpu()
            rows[method] = list(range(b))
        except bench.Unavailable:
            continue
    bench.check_agreement(norms, rows, bench.TOLERANCE["float32"])
    return batch, model


@pytest.mark.parametrize("method", bench.METHODS)
def test_norm_methods(benchmark, setup, method: str) -> None:
    batch, model = setup
    fn = bench.METHOD_FNS[method]
    try:
        fn(batch, model)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"norms {batch['input_ids'].shape[0]}x{batch['input_ids'].shape[1]}"
    benchmark(fn, batch, model)


@pytest.mark.parametrize("single_pass", [True, False], ids=["single_pass", "two_pass"])
def test_selective_backward_step(benchmark, single_pass: bool) -> None:
    from fastsel.training.selective import selective_backward

    model = CACHE.get("smollm2", 8, "float32")
    batch = bench.bench_batch(8, 32, CACHE.vocab["smollm2"])

    def step() -> None:
        selective_backward(batch, model, strategy="moderate", ratio=0.2, single_pass=single_pass)
        for p in model.parameters():
            p.grad = None

    benchmark.group = "selective_backward step"
    benchmark(step)


@pytest.mark.parametrize("strategy", ["moderate", "full"])
def test_epoch(benchmark, strategy: str) -> None:
    from fastsel.training.selective import selective_backward

    model = CACHE.get("smollm2", 8, "float32")
    batches = [bench.bench_batch(8, 32, CACHE.vocab["smollm2"], seed=s) for s in range(4)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def epoch() -> None:
        for b in batches:
            selective_backward(b, model, strategy=strategy, ratio=0.2)
            opt.step()
            opt.zero_grad(set_to_none=True)

    benchmark.group = "epoch of 4 steps"
    benchmark(epoch)
