"""selective_backward under FSDP2 (`fully_shard`, 2 CPU processes, gloo) equals one process on the concatenated batch.

One `torchrun --nproc_per_node 2 tests/training/fsdp_worker.py` run (module fixture, killed after TIMEOUT_S) executes
every case of `fsdp_worker.CASES` and the guard case. Per case: the same global selection on both ranks as in one
process, the same norms, losses and (reference strategies) gradient-dot scores, the full gradient gathered from the
shards equal to a plain backward of the selected examples' mean loss (summed over micro-batches with their scale)
and the same AdamW update (relative difference <= 1e-5); with accumulation, no gradient reduce-scatter (neither
fastsel's nor FSDP's) before the last micro-batch, one per trainable parameter on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsdp_worker as worker
import pytest
import torch
from torchrun import run_two_processes

import fastsel
from fastsel.engine.batch import prepare_batch
from fastsel.engine.losses import per_example_losses
from fastsel.engine.model_io import forward_logits

TIMEOUT_S = 180
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory) -> Path:
    """Run all cases in one 2-process torchrun job; fail fast (TIMEOUT_S) if it hangs."""
    out = tmp_path_factory.mktemp("fsdp")
    run_two_processes(Path(__file__).with_name("fsdp_worker.py"), [str(out)],
                      timeout_s=TIMEOUT_S, what="FSDP2")
    return out


def load(out: Path, name: str, rank: int) -> dict[str, Any]:
    return torch.load(out / f"{name}_rank{rank}.pt")


def rel(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor | None = None) -> float:
    ref = expected if base is None else expected - base
    return float((got - expected).norm() / ref.norm().clamp_min(1e-30))


def assert_rel(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
               base: dict[str, torch.Tensor] | None, what: str) -> None:
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        err = rel(got[name], e, None if base is None else base[name])
        assert err <= RTOL, f"{what} {name}: relative difference {err:.2e}"


def single_process(name: str) -> dict[str, Any]:
    """selective_backward on each concatenated micro-batch in one process, the plain-backward gradient of the
    selected rows' scaled mean losses, and the parameters after the same AdamW step."""
    model = worker.case_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=worker.LR)
    torch.manual_seed(worker.RNG_SEED)
    selections = [fastsel.selective_backward(worker.rank_batch(name, m, range(sum(case["sizes"]))), model,
                                             **worker.step_kwargs(name, m))
                  for m, case in enumerate(worker.CASES[name])]
    grads = {n: p.grad.clone() for n, p in params.items()}
    total = torch.zeros(())
    for m, selection in enumerate(selections):
        rows = selection.indices.tolist()
        prepared = prepare_batch({k: v[rows] for k, v in worker.micro_batch(name, m).items()})
        losses = per_example_losses(forward_logits(model, prepared), prepared["labels"])
        total = total + worker.step_kwargs(name, m)["scale"] * losses.mean()
    plain = dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))
    optimizer.step()
    return {"selections": selections, "grads": grads, "plain": plain, "before": before,
            "after": {n: p.detach().clone() for n, p in params.items()}}


@pytest.mark.parametrize("name", list(worker.CASES))
def test_fsdp_equals_single_process(fsdp_dir: Path, name: str) -> None:
    ranks = [load(fsdp_dir, name, r) for r in (0, 1)]
    ref = single_process(name)
    n_micro = len(worker.CASES[name])
    for m, selection in enumerate(ref["selections"]):
        kept = selection.indices.tolist()
        sizes = worker.CASES[name][m]["sizes"]
        for r, res in enumerate(ranks):
            got = res["micro"][m]
            assert got["indices"] == kept, f"rank {r} micro-batch {m}"
            start = sum(sizes[:r])
            assert got["local_indices"] == [i - start for i in kept if start <= i < start + sizes[r]]
            assert got["single_pass"] == selection.single_pass
            assert rel(got["losses"], selection.losses) <= RTOL
            if selection.strategy in ("moderate", "low", "high"):  # the norm pass under FSDP2 is exact
                assert rel(got["norms"], selection.grad_norms) <= RTOL
            if selection.scores is not None:  # and so are the reference strategies' gradient dots
                assert rel(got["scores"], selection.scores) <= RTOL
            last = m == n_micro - 1
            # no gradient communication before the window's last call, one reduce-scatter per parameter on it
            assert got["reduce_scatters"] == (res["n_trainable"] if last else 0)
            if not last:
                assert got["grad_zero_after"], "a sync=False call changed the sharded .grad"
    for r, res in enumerate(ranks):
        assert_rel(res["grads"], ref["plain"], None, f"rank {r} gradient vs plain backward")
        assert_rel(res["grads"], ref["grads"], None, f"rank {r} gradient vs one process")
        assert_rel(res["params"], ref["after"], ref["before"], f"rank {r} update")


def test_fsdp_budget_decision_is_global_and_said(fsdp_dir: Path) -> None:
    ranks = [load(fsdp_dir, "budget_disagrees", r)["micro"][0] for r in (0, 1)]
    assert ranks[0]["single_pass"] is ranks[1]["single_pass"] is False
    assert ranks[0]["pass_reason"] == ranks[1]["pass_reason"]  # the same words on every rank
    assert ranks[0]["pass_reason"].startswith("two pass (over budget): ")
    assert "over 2 ranks; tightest rank 1:" in ranks[0]["pass_reason"]
    assert "budget 10 B (memory_budget_bytes)" in ranks[0]["pass_reason"]
    single = [load(fsdp_dir, "moderate_single", r)["micro"][0]["pass_reason"] for r in (0, 1)]
    assert single[0] == single[1] and single[0].startswith("single pass: ")
    assert "row(s) in the loss band over 2 ranks" in single[0]


def test_fsdp_unreduced_step_is_refused_and_zero_grad_drops_the_window(fsdp_dir: Path) -> None:
    for r in (0, 1):
        res = load(fsdp_dir, "guard", r)
        for key in ("set_to_none=True", "set_to_none=False"):
            case = res[key]
            assert case["pending"] and not case["pending_after"], key
            assert "sync=True" in case["message"] and "never reduce-scattered" in case["message"], key
            assert case["params_unchanged"], key
            # the dropped window contributes nothing to the next sync=True call
            assert_rel(case["grads"], res["alone"], None, f"rank {r} {key}")
        assert "train is single-process" in res["train"] and "examples/fsdp_train.py" in res["train"]
