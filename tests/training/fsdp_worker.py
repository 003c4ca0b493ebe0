"""Worker of tests/training/test_fsdp.py: one rank of a 2-process CPU (gloo) FSDP2 run of `selective_backward`.

Run as `python -m torch.distributed.run --nproc_per_node 2 tests/training/fsdp_worker.py OUT_DIR`. Every case wraps
the same tiny LoRA Llama with `fully_shard` (each decoder layer, then the root), gives each rank its rows of the
case's global batch, runs `selective_backward` over the case's micro-batches (sync=False on all but the last),
gathers the full gradient from the shards, takes one AdamW step and saves `OUT_DIR/<case>_rank<r>.pt`. It also
records how many gradient reduce-scatters each call issued and what the sharded `.grad` held meanwhile. Case
`guard`: an optimizer step over an unreduced window must raise UnreducedGradientError; zero_grad drops it.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny.py

from tiny import lora, make_batch, tiny_model  # noqa: E402
from torchrun import worker_main  # noqa: E402

import fastsel  # noqa: E402

LR = 1e-2
RNG_SEED = 4321
# name -> micro-batches: per micro-batch the selective_backward options and the ranks' row counts. `budget` is a
# per-rank memory_budget_bytes (rank 0, rank 1).
CASES: dict[str, list[dict[str, Any]]] = {
    "moderate_single": [dict(strategy="moderate", single_pass=True, sizes=(6, 6), ratio=0.25)],
    "moderate_two_pass": [dict(strategy="moderate", single_pass=False, sizes=(6, 6), ratio=0.25, side="left")],
    "high_single_unequal": [dict(strategy="high", single_pass="auto", sizes=(7, 4), ratio=0.3, scale=0.5)],
    "random_seeded": [dict(strategy="random", single_pass="auto", sizes=(6, 6), ratio=0.25, seed=7)],
    "full": [dict(strategy="full", single_pass="auto", sizes=(5, 6), ratio=1.0)],
    # k = 1: one rank holds no selected row (it still runs the second pass, with weight 0)
    "moderate_two_pass_k1": [dict(strategy="moderate", single_pass=False, sizes=(5, 5), ratio=0.1)],
    # rank 1's budget is too small: both ranks take the two-pass step, and say why
    "budget_disagrees": [dict(strategy="moderate", single_pass="auto", sizes=(6, 6), ratio=0.25,
                              budget=(1 << 30, 10))],
    # transformers' non-reentrant activation checkpointing under FSDP2 (forward hooks fire again on recompute)
    "checkpointing": [dict(strategy="moderate", single_pass=True, sizes=(5, 6), ratio=0.3, checkpointing=True)],
    "accum_single": [dict(strategy="moderate", single_pass=True, sizes=(5, 4), ratio=0.3, scale=0.5),
                     dict(strategy="moderate", single_pass=True, sizes=(4, 6), ratio=0.3, scale=0.5)],
    "accum_two_pass": [dict(strategy="moderate", single_pass=False, sizes=(5, 5), ratio=0.3, scale=0.5),
                       dict(strategy="random", single_pass="auto", sizes=(6, 4), ratio=0.3, scale=0.5, seed=3)],
    # the reference strategies: every example's gradient dot with references computed on the unsharded model
    "gradshield_single": [dict(strategy="gradshield", single_pass=True, sizes=(6, 5), ratio=0.25)],
    "harmful_similarity_two_pass": [dict(strategy="harmful_similarity", single_pass=False, sizes=(5, 6),
                                         ratio=0.3)],
    # packed (padding-free) rows: each rank packs its own sequences; one process packs them all
    "packed_single": [dict(strategy="moderate", single_pass=True, sizes=(6, 5), ratio=0.3, packed=True)],
    "packed_accum": [dict(strategy="high", single_pass=False, sizes=(5, 5), ratio=0.3, scale=0.5, packed=True),
                     dict(strategy="moderate", single_pass="auto", sizes=(4, 6), ratio=0.3, scale=0.5,
                          packed=True)],
}


def micro_batch(name: str, micro: int) -> dict[str, torch.Tensor]:
    """Micro-batch `micro` of case `name`: all ranks' rows, in rank order."""
    opts = CASES[name][micro]
    total = sum(opts["sizes"])
    lengths = [5 + (3 * i + len(name) + micro) % 8 for i in range(total)]
    return make_batch(lengths, side=opts.get("side", "right"), seed=len(name) + 10 * micro)


def references(strategy: str) -> Any:
    """The reference strategies' references, from anchor batches on a fresh unsharded case model (the same on
    every rank and in the single-process run); None for the other strategies."""
    if strategy not in ("gradshield", "harmful_similarity"):
        return None
    model = case_model()
    safe = fastsel.reference_gradient(make_batch([6, 8, 5, 7], seed=101), model,
                                      normalize=strategy == "harmful_similarity", backend="torch")
    if strategy == "gradshield":
        return safe
    harm = fastsel.reference_gradient(make_batch([7, 5, 9], seed=202), model, normalize=True, backend="torch")
    return [harm, safe]


def rank_batch(name: str, micro: int, rows: range) -> dict[str, torch.Tensor]:
    """The examples `rows` of micro-batch `micro` as one rank (or, with all rows, one process) gets them: padded
    rows, or for a packed case the sequences packed into one padding-free row."""
    batch = micro_batch(name, micro)
    if not CASES[name][micro].get("packed"):
        return {k: v[rows.start:rows.stop] for k, v in batch.items()}
    from fastsel.engine.batch import pack

    keep = batch["attention_mask"].bool()
    return pack([{"input_ids": batch["input_ids"][i][keep[i]].tolist(), "labels": batch["labels"][i][keep[i]].tolist()}
                 for i in rows], pad_token_id=0)


def step_kwargs(name: str, micro: int, rank: int | None = None) -> dict[str, Any]:
    """selective_backward options of a micro-batch (the budget of `rank`; None: the single-process run's)."""
    opts = CASES[name][micro]
    budget = opts.get("budget")
    reference = references(opts["strategy"])
    return dict(ratio=opts["ratio"], strategy=opts["strategy"], single_pass=opts["single_pass"],
                seed=opts.get("seed"), scale=opts.get("scale", 1.0), backend="torch",
                memory_budget_bytes=None if budget is None else budget[-1 if rank is None else rank],
                **({} if reference is None else {"reference": reference}))


def case_model() -> torch.nn.Module:
    return lora(tiny_model("llama", seed=0), r=4)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def trainable_full(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Trainable parameters (or their gradients) by name, gathered from the shards (a collective)."""
    return {n: full(p.grad if grads else p).detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


class Counter:
    """Counts fastsel's reduce-scatters (distributed.reduce_to_shard) while installed."""

    def __init__(self) -> None:
        from fastsel.training import distributed

        self.module, self.original, self.n = distributed, distributed.reduce_to_shard, 0

        def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.n += 1
            return self.original(*args, **kwargs)

        distributed.reduce_to_shard = counting

    def close(self) -> None:
        self.module.reduce_to_shard = self.original


def run_case(name: str, out_dir: str) -> None:
    rank = dist.get_rank()
    model = case_model()
    if CASES[name][0].get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        assert model.base_model.model.is_gradient_checkpointing
    model = shard_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    counter = Counter()
    micro_results = []
    torch.manual_seed(RNG_SEED)
    try:
        for micro, opts in enumerate(CASES[name]):
            sizes = opts["sizes"]
            start = sum(sizes[:rank])
            batch = rank_batch(name, micro, range(start, start + sizes[rank]))
            before = counter.n
            last = micro == len(CASES[name]) - 1
            selection = fastsel.selective_backward(batch, model, sync=last, **step_kwargs(name, micro, rank))
            local_grads_zero = all(p.grad is None or not bool(p.grad.to_local().any())
                                   for p in model.parameters() if p.requires_grad)
            micro_results.append({"indices": selection.indices.tolist(),
                                  "local_indices": selection.local_indices.tolist(),
                                  "single_pass": selection.single_pass, "pass_reason": selection.pass_reason,
                                  "norms": selection.grad_norms.clone(), "losses": selection.losses.clone(),
                                  "scores": None if selection.scores is None else selection.scores.clone(),
                                  "reduce_scatters": counter.n - before, "grad_zero_after": local_grads_zero})
    finally:
        counter.close()
    grads = trainable_full(model, grads=True)
    optimizer.step()
    torch.save({"micro": micro_results, "grads": grads, "params": trainable_full(model),
                "n_trainable": sum(1 for p in model.parameters() if p.requires_grad)},
               os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    dist.barrier()


def run_guard(out_dir: str) -> None:
    """An optimizer step over an unreduced window raises; zero_grad (either kind) drops the window."""
    from fastsel.training.selective import UnreducedGradientError, has_deferred_gradients

    rank = dist.get_rank()
    model = shard_model(case_model())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = {k: v[rank * 5:(rank + 1) * 5] for k, v in micro_batch("accum_single", 0).items()}
    kwargs = dict(ratio=0.3, backend="torch")
    results: dict[str, Any] = {}
    for set_to_none in (True, False):
        fastsel.selective_backward(batch, model, sync=False, **kwargs)
        pending = has_deferred_gradients(model)
        params_before = trainable_full(model)
        try:
            optimizer.step()
            message = "no error"
        except UnreducedGradientError as e:
            message = str(e)
        unchanged = all(torch.equal(p, params_before[n]) for n, p in trainable_full(model).items())
        optimizer.zero_grad(set_to_none=set_to_none)
        optimizer.step()  # allowed again
        # a sync=True call after the dropped window reduces only its own contribution
        fastsel.selective_backward(batch, model, sync=True, **kwargs)
        results[f"set_to_none={set_to_none}"] = {
            "pending": pending, "message": message, "params_unchanged": unchanged,
            "pending_after": has_deferred_gradients(model), "grads": trainable_full(model, grads=True)}
        optimizer.zero_grad(set_to_none=True)
    # reference: the sync=True call alone
    fastsel.selective_backward(batch, model, sync=True, **kwargs)
    results["alone"] = trainable_full(model, grads=True)
    try:  # the minimal loop is single-process: refused, with where to go instead
        fastsel.train(model, [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 8, batch_size=8, progress=False)
        results["train"] = "no error"
    except NotImplementedError as e:
        results["train"] = str(e)
    torch.save(results, os.path.join(out_dir, f"guard_rank{rank}.pt"))
    dist.barrier()


def main(argv: list[str]) -> int:
    cases = {**{name: partial(run_case, name) for name in CASES}, "guard": run_guard}
    return worker_main(argv, cases, default=[*CASES, "guard"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
