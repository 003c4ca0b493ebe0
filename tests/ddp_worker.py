"""Worker of tests/test_distributed.py: one rank of a 2-process CPU (gloo) DDP run of `selective_backward`.

Run as `python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR CASE [CASE ...]`. For every
case each rank wraps the same tiny LoRA model in DistributedDataParallel, takes its rows of the case's batch, calls
`selective_backward` and one AdamW step, and saves `OUT_DIR/<case>_rank<r>.pt` (selection, gradients, trainable
parameters). Case `trainer`: one step of fastsel.hf.SelectiveTrainer under DDP (accelerate MULTI_CPU).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny import lora, make_batch, tiny_model  # noqa: E402

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
}
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


def step_kwargs(name: str) -> dict[str, Any]:
    opts = CASES[name]
    return dict(ratio=opts["ratio"], strategy=opts["strategy"], single_pass=opts["single_pass"],
                seed=opts.get("seed"), scale=opts.get("scale", 1.0), backend="torch")


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


def trainer_rows() -> list[dict[str, Any]]:
    """16 examples with ids for the Trainer case."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(16):
        tokens = torch.randint(1, 97, (int(torch.randint(5, 13, (1,), generator=g)),), generator=g).tolist()
        rows.append({"id": f"ex{i}", "input_ids": tokens, "labels": [-100, -100] + tokens[2:]})
    return rows


def pad_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    from fastsel.data import collate

    batch = collate(features, 0)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def run_trainer(out_dir: str) -> None:
    """SelectiveTrainer under DDP (accelerate MULTI_CPU): one optimizer step of 2 ranks x 4 examples."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from fastsel.hf import SelectionConfig, SelectiveTrainer

    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            grads.update({n.removeprefix("module."): p.grad.clone()
                          for n, p in model.named_parameters() if p.requires_grad})

    model = case_model()
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=4,
                             max_steps=1, learning_rate=LR, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, optim="adamw_torch", seed=0, logging_steps=1)
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=Dataset.from_list(trainer_rows()),
                               data_collator=pad_collator, fastsel_config=SelectionConfig(ratio=0.25),
                               callbacks=[Capture()])
    trainer.train()
    torch.save({"log": trainer.fastsel_log, "grads": grads, "params": trainable_state(model),
                "distributed_type": str(trainer.accelerator.distributed_type)},
               os.path.join(out_dir, f"trainer_rank{dist.get_rank()}.pt"))
    dist.barrier()


def main(argv: list[str]) -> int:
    out_dir, names = argv[0], argv[1:] or list(CASES)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        for name in names:
            if name == "trainer":
                run_trainer(out_dir)
            else:
                run_case(name, out_dir)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
