"""Worker of tests/test_distributed.py: one rank of a 2-process CPU (gloo) DDP run of `selective_backward`.

Run as `python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_worker.py OUT_DIR CASE [CASE ...]`. For every
case each rank wraps the same tiny LoRA model in DistributedDataParallel, takes its rows of the case's batch, calls
`selective_backward` and one AdamW step, and saves `OUT_DIR/<case>_rank<r>.pt` (selection, gradients, trainable
parameters). Case `trainer`: one step of fastsel.integrations.hf.SelectiveTrainer under DDP (accelerate MULTI_CPU); `accum`:
selective_backward over an accumulation window of ACCUM_MICRO micro-batches for each sync pattern of ACCUM_SYNC,
counting the gradient all-reduces per micro-batch; `trainer_accum`: one SelectiveTrainer step of ACCUM_STEPS
micro-batches.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny.py

from tiny import lora, make_batch, tiny_model  # noqa: E402
from torchrun import worker_main  # noqa: E402

import fastsel  # noqa: E402

# name -> options; `sizes` are the ranks' row counts (their sum is the global batch), `side` the padding side.
CASES: dict[str, dict[str, Any]] = {
    "moderate_single": dict(strategy="moderate", single_pass=True, sizes=(6, 6), ratio=0.25),
    "moderate_two_pass": dict(strategy="moderate", single_pass=False, sizes=(6, 6), ratio=0.25, side="left"),
    "random_seeded": dict(strategy="random", single_pass="auto", sizes=(6, 6), ratio=0.25, seed=123),
    "moderate_single_unequal": dict(strategy="moderate", single_pass=True, sizes=(7, 4), ratio=0.3, scale=0.5),
    "moderate_two_pass_unequal": dict(strategy="moderate", single_pass=False, sizes=(4, 7), ratio=0.3),
    "random_unseeded_unequal": dict(strategy="random", single_pass="auto", sizes=(8, 3), ratio=0.3, seed=None),
    # k = 1: one rank holds no selected row
    "moderate_single_k1": dict(strategy="moderate", single_pass=True, sizes=(5, 5), ratio=0.1),
    "moderate_two_pass_k1": dict(strategy="moderate", single_pass=False, sizes=(5, 5), ratio=0.1),
    # reference strategies: every rank passes the same reference; the dots are gathered like the norms
    "gradshield_unequal": dict(strategy="gradshield", single_pass=True, sizes=(7, 4), ratio=0.3),
    "harmful_similarity_two_pass": dict(strategy="harmful_similarity", single_pass=False, sizes=(5, 6), ratio=0.3),
}
# Accumulation window: per micro-batch the selective_backward options (every code path: single pass, two pass, no
# norms) and the ranks' row counts; `empty_last` keeps no example in the last (syncing) micro-batch (loss_band=0).
ACCUM_MICRO: list[dict[str, Any]] = [
    dict(strategy="moderate", single_pass=True, sizes=(5, 4), ratio=0.3),
    dict(strategy="moderate", single_pass=False, sizes=(4, 6), ratio=0.3),
    dict(strategy="random", single_pass="auto", sizes=(6, 6), ratio=0.25, seed=11),
]
ACCUM_SYNC: dict[str, tuple[bool, ...]] = {
    "every": (True, True, True),  # the non-deferred reference
    "deferred": (False, False, True),
    "mixed": (True, False, True),  # .grad already holds a reduced gradient when deferral starts
    "empty_last": (False, False, True),
}
ACCUM_STEPS = 3  # gradient_accumulation_steps of the `trainer_accum` case
LR = 1e-2
RNG_SEED = 1234  # torch.manual_seed right before the step (strategy 'random' without a seed draws from it)


def case_batch(name: str) -> dict[str, torch.Tensor]:
    """The case's global batch (all ranks' rows, in rank order)."""
    opts = CASES[name]
    total = sum(opts["sizes"])
    lengths = [5 + (3 * i + len(name)) % 8 for i in range(total)]
    return make_batch(lengths, side=opts.get("side", "right"), seed=len(name))


def case_model() -> torch.nn.Module:
    return lora(tiny_model("llama", seed=0), r=4)


def case_reference(strategy: str) -> Any:
    """The reference of a reference strategy, from the (deterministic) case model and fixed anchor batches."""
    if strategy == "gradshield":
        return fastsel.reference_gradient(make_batch([6, 8, 5], seed=40), case_model())
    if strategy == "harmful_similarity":
        return [fastsel.reference_gradient(make_batch([6, 8, 5], seed=s), case_model(), normalize=True)
                for s in (41, 42)]
    return None


def step_kwargs(name: str) -> dict[str, Any]:
    opts = CASES[name]
    return dict(ratio=opts["ratio"], strategy=opts["strategy"], single_pass=opts["single_pass"],
                seed=opts.get("seed"), scale=opts.get("scale", 1.0), backend="torch",
                reference=case_reference(opts["strategy"]))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, without DDP's `module.` prefix."""
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def count_buffer_broadcasts(model: torch.nn.parallel.DistributedDataParallel) -> dict[str, int]:
    """Count DDP's buffer broadcasts (one collective per DDP forward): every rank must issue the same number, or
    the ranks' collective sequences diverge (NCCL then hangs or mixes up tensors; gloo silently stops syncing)."""
    counter = {"n": 0}
    original = model._distributed_broadcast_coalesced

    def counting(*args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        return original(*args, **kwargs)

    model._distributed_broadcast_coalesced = counting  # type: ignore[method-assign]
    return counter


def run_case(name: str, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = CASES[name]["sizes"]
    assert len(sizes) == world, f"case {name} is for {len(sizes)} ranks"
    batch = case_batch(name)
    start = sum(sizes[:rank])
    shard = {k: v[start:start + sizes[rank]] for k, v in batch.items()}
    model = torch.nn.parallel.DistributedDataParallel(case_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    broadcasts = count_buffer_broadcasts(model)
    torch.manual_seed(RNG_SEED)
    selection = fastsel.selective_backward(shard, model, **step_kwargs(name))
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    torch.save({"indices": selection.indices.tolist(), "local_indices": selection.local_indices.tolist(),
                "single_pass": selection.single_pass, "params": trainable_state(model), "grads": grads,
                "buffer_broadcasts": broadcasts["n"]},
               os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    dist.barrier()


def accum_batch(micro: int) -> dict[str, torch.Tensor]:
    """Micro-batch `micro` of the accumulation window (all ranks' rows, in rank order)."""
    total = sum(ACCUM_MICRO[micro]["sizes"])
    return make_batch([5 + (5 * i + micro) % 8 for i in range(total)], side="right", seed=100 + micro)


def accum_kwargs(pattern: str, micro: int) -> dict[str, Any]:
    opts = ACCUM_MICRO[micro]
    band = 0.0 if pattern == "empty_last" and micro == len(ACCUM_MICRO) - 1 else 1.0
    return dict(ratio=opts["ratio"], strategy=opts["strategy"], single_pass=opts["single_pass"],
                seed=opts.get("seed"), scale=1.0 / len(ACCUM_MICRO), backend="torch", loss_band=band)


@contextlib.contextmanager
def count_gradient_reductions() -> Iterator[dict[str, int]]:
    """Count calls of fastsel.training.distributed.sum_over_ranks and of torch.distributed.all_reduce (patched meanwhile)."""
    from fastsel.training import distributed

    counter = {"sum_over_ranks": 0, "all_reduce": 0}
    sum_over_ranks, all_reduce = distributed.sum_over_ranks, dist.all_reduce

    def counting_sum(tensors: list[torch.Tensor]) -> None:
        counter["sum_over_ranks"] += 1
        sum_over_ranks(tensors)

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        counter["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    distributed.sum_over_ranks, dist.all_reduce = counting_sum, counting_all_reduce
    try:
        yield counter
    finally:
        distributed.sum_over_ranks, dist.all_reduce = sum_over_ranks, all_reduce


def accum_shard(micro: int, rank: int) -> dict[str, torch.Tensor]:
    sizes = ACCUM_MICRO[micro]["sizes"]
    start = sum(sizes[:rank])
    return {k: v[start:start + sizes[rank]] for k, v in accum_batch(micro).items()}


def run_accumulation(out_dir: str) -> None:
    """One accumulation window per ACCUM_SYNC pattern; then the misuse guard after a window left unreduced."""
    from fastsel.training.selective import UnreducedGradientError, has_deferred_gradients

    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(case_model())
    results: dict[str, Any] = {}
    with count_gradient_reductions() as counter:
        for pattern, syncs in ACCUM_SYNC.items():
            model.zero_grad(set_to_none=True)
            indices, reductions, all_reduces = [], [], []
            for micro, sync in enumerate(syncs):
                before = dict(counter)
                selection = fastsel.selective_backward(accum_shard(micro, rank), model, sync=sync,
                                                       **accum_kwargs(pattern, micro))
                indices.append(selection.indices.tolist())
                reductions.append(counter["sum_over_ranks"] - before["sum_over_ranks"])
                all_reduces.append(counter["all_reduce"] - before["all_reduce"])
            results[pattern] = {"indices": indices, "sum_over_ranks": reductions, "all_reduce": all_reduces,
                                "grads": {n.removeprefix("module."): p.grad.clone()
                                          for n, p in model.named_parameters() if p.requires_grad},
                                "deferred_after": has_deferred_gradients(model)}
    # misuse: an optimizer step after sync=False calls only must raise, not apply a rank-local gradient
    model.zero_grad(set_to_none=True)
    fastsel.selective_backward(accum_shard(0, rank), model, sync=False, **accum_kwargs("deferred", 0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    params_before = trainable_state(model)
    try:
        optimizer.step()
        message = "no error"
    except UnreducedGradientError as e:
        message = str(e)
    unchanged = all(torch.equal(p, params_before[n]) for n, p in trainable_state(model).items())
    model.zero_grad(set_to_none=True)  # drops the window: stepping is allowed again
    optimizer.step()
    results["guard"] = {"message": message, "params_unchanged": unchanged,
                        "deferred_after_zero_grad": has_deferred_gradients(model)}
    torch.save(results, os.path.join(out_dir, f"accum_rank{rank}.pt"))
    dist.barrier()


def trainer_rows() -> list[dict[str, Any]]:
    """16 examples with ids for the Trainer case."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(16):
        tokens = torch.randint(1, 97, (int(torch.randint(5, 13, (1,), generator=g)),), generator=g).tolist()
        rows.append({"id": f"ex{i}", "input_ids": tokens, "labels": [-100, -100] + tokens[2:]})
    return rows


def pad_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    from fastsel.experiments.data import collate

    batch = collate(features, 0)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def run_trainer(out_dir: str, accumulation: int = 1) -> None:
    """SelectiveTrainer under DDP (accelerate MULTI_CPU): one optimizer step of 2 ranks x 4 examples, or of
    `accumulation` micro-batches of 2 ranks x 2 examples (recording during which micro-step gradients are reduced)."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from fastsel.integrations.hf import SelectionConfig, SelectiveTrainer

    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            grads.update({n.removeprefix("module."): p.grad.clone()
                          for n, p in model.named_parameters() if p.requires_grad})

    from fastsel.training import distributed

    name = "trainer" if accumulation == 1 else "trainer_accum"
    model = case_model()
    args = TrainingArguments(output_dir=os.path.join(out_dir, name),
                             per_device_train_batch_size=4 if accumulation == 1 else 2,
                             gradient_accumulation_steps=accumulation,
                             max_steps=1, learning_rate=LR, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, optim="adamw_torch", seed=0, logging_steps=1)
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=Dataset.from_list(trainer_rows()),
                               data_collator=pad_collator, fastsel_config=SelectionConfig(ratio=0.25),
                               callbacks=[Capture()])
    reduced_at: list[int] = []  # micro-step of every gradient all-reduce: fastsel_log grows after each micro-step
    sum_over_ranks = distributed.sum_over_ranks

    def counting(tensors: list[torch.Tensor]) -> None:
        reduced_at.append(len(trainer.fastsel_log))
        sum_over_ranks(tensors)

    distributed.sum_over_ranks = counting
    try:
        trainer.train()
    finally:
        distributed.sum_over_ranks = sum_over_ranks
    torch.save({"log": trainer.fastsel_log, "grads": grads, "params": trainable_state(model),
                "distributed_type": str(trainer.accelerator.distributed_type), "reduced_at": reduced_at},
               os.path.join(out_dir, f"{name}_rank{dist.get_rank()}.pt"))
    dist.barrier()


def main(argv: list[str]) -> int:
    cases = {**{name: partial(run_case, name) for name in CASES}, "trainer": run_trainer,
             "trainer_accum": partial(run_trainer, accumulation=ACCUM_STEPS), "accum": run_accumulation}
    return worker_main(argv, cases, default=list(CASES))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
