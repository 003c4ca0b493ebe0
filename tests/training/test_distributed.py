"""selective_backward under DDP (2 CPU processes, gloo) equals one process on the concatenated batch.

One `torchrun --nproc_per_node 2 tests/training/ddp_worker.py` run (module fixture, killed after TIMEOUT_S) executes every
case of `ddp_worker.CASES`, one SelectiveTrainer step without and one with gradient accumulation, and an
accumulation window of `selective_backward` calls per sync pattern; each test compares a case's saved results with
`selective_backward` + the same AdamW step in this process: the same global selection on both ranks, the same
gradients and the same adapter update (relative difference <= 1e-5), and the same DDP collectives on both ranks.
With accumulation, gradients are all-reduced only on the micro-batch that passes sync=True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ddp_worker as worker
import pytest
import torch
from torchrun import run_two_processes

import fastsel
from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits

TIMEOUT_S = 120
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory) -> Path:
    """Run all cases in one 2-process torchrun job; fail fast (TIMEOUT_S) if it hangs."""
    out = tmp_path_factory.mktemp("ddp")
    run_two_processes(Path(__file__).with_name("ddp_worker.py"),
                      [str(out), *worker.CASES, "trainer", "accum", "trainer_accum"], timeout_s=TIMEOUT_S, what="DDP")
    return out


def load(ddp_dir: Path, name: str, rank: int) -> dict[str, Any]:
    return torch.load(ddp_dir / f"{name}_rank{rank}.pt")


def assert_rel(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None,
               what: str) -> None:
    """Per tensor: ||got - expected|| <= RTOL ||expected - base|| (base=None: relative to ||expected||)."""
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        ref = e if base is None else e - base[name]
        err = float((got[name] - e).norm() / ref.norm().clamp_min(1e-30))
        assert err <= RTOL, f"{what} {name}: relative difference {err:.2e}"


def single_process(name: str) -> tuple[fastsel.Selection, dict[str, torch.Tensor], dict[str, torch.Tensor],
                                       dict[str, torch.Tensor]]:
    """(selection, gradients, parameters after AdamW, parameters before) on the concatenated batch."""
    model = worker.case_model()
    before = worker.trainable_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=worker.LR)
    torch.manual_seed(worker.RNG_SEED)
    selection = fastsel.selective_backward(worker.case_batch(name), model, **worker.step_kwargs(name))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return selection, grads, worker.trainable_state(model), before


@pytest.mark.parametrize("name", list(worker.CASES))
def test_ddp_equals_single_process(ddp_dir: Path, name: str) -> None:
    ranks = [load(ddp_dir, name, r) for r in (0, 1)]
    selection, grads, params, before = single_process(name)
    kept = selection.indices.tolist()
    assert ranks[0]["indices"] == ranks[1]["indices"] == kept
    assert ranks[0]["single_pass"] == ranks[1]["single_pass"] == selection.single_pass
    sizes = worker.CASES[name]["sizes"]
    for r, res in enumerate(ranks):
        start = sum(sizes[:r])
        assert res["local_indices"] == [i - start for i in kept if start <= i < start + sizes[r]]
        assert_rel(res["grads"], grads, None, f"rank {r} gradient")
        assert_rel(res["params"], params, before, f"rank {r} update")


@pytest.mark.parametrize("name", list(worker.CASES))
def test_ranks_issue_the_same_ddp_collectives(ddp_dir: Path, name: str) -> None:
    """DDP broadcasts its buffers from rank 0 on a forward: a rank skipping a forward (no local rows selected)
    must not leave the ranks' collective sequences out of step."""
    counts = [load(ddp_dir, name, r)["buffer_broadcasts"] for r in (0, 1)]
    assert counts[0] == counts[1], counts


def _assert_trainer_step_matches_reference(ranks: list[dict], log: list[dict], scale: float) -> None:
    """One optimizer step in one process: selective_backward on each logged global micro-batch (scaled), clipping
    and AdamW; every rank's gradient and update must equal it, and each selection the logged one."""
    by_id = {r["id"]: r for r in worker.trainer_rows()}
    model = worker.case_model()
    before = worker.trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=worker.LR, weight_decay=0.0)
    for entry in log:
        batch = worker.pad_collator([by_id[i] for i in entry["ids"]])
        selection = fastsel.selective_backward(batch, model, ratio=0.25, scale=scale)
        assert selection.indices.tolist() == entry["kept_positions"]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for r, res in enumerate(ranks):
        assert_rel(res["grads"], grads, None, f"rank {r} gradient")
        assert_rel(res["params"], worker.trainable_state(model), before, f"rank {r} update")


def test_selective_trainer_under_ddp(ddp_dir: Path) -> None:
    """SelectiveTrainer under DDP (accelerate MULTI_CPU, 2 x 4 examples): global selection logged with the ids of
    both ranks, and the same update as selective_backward + clipping + AdamW on the concatenated batch."""
    ranks = [load(ddp_dir, "trainer", r) for r in (0, 1)]
    assert "MULTI_CPU" in ranks[0]["distributed_type"]
    log = ranks[0]["log"]
    assert log == ranks[1]["log"] and len(log) == 1
    entry = log[0]
    assert entry["batch_size"] == 8 and len(set(entry["ids"])) == 8 and len(entry["kept_ids"]) == 2
    _assert_trainer_step_matches_reference(ranks, log, scale=1.0)  # ids: rank 0's rows, then rank 1's
    lines = (ddp_dir / "trainer" / "fastsel_selection.jsonl").read_text().splitlines()
    assert len(lines) == 1  # process 0 only


# ------------------------------------------------------------------------------------------- gradient accumulation

EXPECTED_REDUCTIONS = {"every": [1, 1, 1], "deferred": [0, 0, 1], "mixed": [1, 0, 1], "empty_last": [0, 0, 1]}


def window_reference(pattern: str, indices: list[list[int]]) -> tuple[dict[str, torch.Tensor],
                                                                      dict[str, torch.Tensor]]:
    """One process, the concatenated micro-batches: (selective_backward's accumulated gradient, the autograd
    gradient of sum over micro-batches of 1/n x the mean loss of the rows `indices` selected under DDP)."""
    model = worker.case_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = torch.zeros(())
    for micro, rows in enumerate(indices):
        batch = worker.accum_batch(micro)
        kwargs = worker.accum_kwargs(pattern, micro)
        assert fastsel.selective_backward(batch, model, **kwargs).indices.tolist() == rows
        if rows:
            prepared = prepare_batch({k: v[rows] for k, v in batch.items()})
            losses = per_example_losses(forward_logits(model, prepared), prepared["labels"])
            total = total + kwargs["scale"] * losses.mean()
    expected = dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))
    return {n: p.grad.clone() for n, p in params.items()}, expected


@pytest.mark.parametrize("pattern", list(worker.ACCUM_SYNC))
def test_accumulation_reduces_gradients_once_per_window(ddp_dir: Path, pattern: str) -> None:
    """3 micro-batches (single pass, two pass, random): deferring with sync=False gives the gradient of syncing
    every micro-batch and of one process on the same global selections, and all-reduces only when sync=True -
    also when .grad already holds a reduced gradient ('mixed') or the syncing micro-batch keeps nothing."""
    ranks = [load(ddp_dir, "accum", r)[pattern] for r in (0, 1)]
    every = [load(ddp_dir, "accum", r)["every"] for r in (0, 1)]
    indices = ranks[0]["indices"]
    assert ranks[1]["indices"] == indices
    if pattern == "empty_last":
        assert indices[-1] == [] and indices[:-1] == every[0]["indices"][:-1]
    else:
        assert indices == every[0]["indices"]
    n_params = len(ranks[0]["grads"])
    for res in ranks:
        assert res["sum_over_ranks"] == EXPECTED_REDUCTIONS[pattern]
        assert res["all_reduce"] == [n * n_params for n in EXPECTED_REDUCTIONS[pattern]]
        assert not res["deferred_after"]
    grads, autograd = window_reference(pattern, indices)
    for r, res in enumerate(ranks):
        for name, g in ranks[0]["grads"].items():
            assert torch.equal(res["grads"][name], g), f"ranks differ: {name}"
        assert_rel(res["grads"], grads, None, f"rank {r} gradient vs one process")
        assert_rel(res["grads"], autograd, None, f"rank {r} gradient vs autograd")
        if pattern != "empty_last":
            assert_rel(res["grads"], every[r]["grads"], None, f"rank {r} gradient vs sync every micro-batch")


def test_step_with_unreduced_gradients_is_refused(ddp_dir: Path) -> None:
    for r in (0, 1):
        guard = load(ddp_dir, "accum", r)["guard"]
        assert "sync=True" in guard["message"] and "never averaged over ranks" in guard["message"]
        assert guard["params_unchanged"] and not guard["deferred_after_zero_grad"]


def test_selective_trainer_accumulation_under_ddp(ddp_dir: Path) -> None:
    """SelectiveTrainer, gradient_accumulation_steps=3 under DDP: one gradient all-reduce, on the window's last
    micro-step, and the update of selective_backward(scale=1/3) per global micro-batch + clipping + AdamW."""
    ranks = [load(ddp_dir, "trainer_accum", r) for r in (0, 1)]
    log = ranks[0]["log"]
    assert log == ranks[1]["log"]
    assert [(e["step"], e["micro_step"]) for e in log] == [(1, m) for m in range(worker.ACCUM_STEPS)]  # step 1: numbered as log_history
    for res in ranks:
        assert res["reduced_at"] == [worker.ACCUM_STEPS - 1]
    for entry in log:
        assert entry["batch_size"] == 4 and len(entry["kept_ids"]) == 1
    _assert_trainer_step_matches_reference(ranks, log, scale=1.0 / worker.ACCUM_STEPS)
