"""A plain PyTorch FSDP2 (`fully_shard`) loop with gradient accumulation, `loss.backward()` replaced by fastsel.

    torchrun --nproc_per_node 2 examples/fsdp_train.py                  # CPU (gloo), tiny random Llama + LoRA
    torchrun --nproc_per_node 8 examples/fsdp_train.py --bf16           # one GPU per process (nccl)

Each rank takes its shard of every global micro-batch (DistributedSampler). `selective_backward` gathers all ranks'
losses and gradient norms, selects over the global micro-batch (the same ids on every rank), and adds to the sharded
`.grad` the shard of the selected examples' mean-loss gradient: the micro-batches before the last of an optimizer
step pass `sync=False` (no gradient communication), the last `sync=True` (one reduce-scatter per parameter for the
whole window). Clipping and AdamW work on the sharded gradients as usual. Rank 0 prints the kept example ids and
which step (single or two pass) ran, and why. The data: Dolly mini as byte tokens (`ddp_train.byte_rows`).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from ddp_train import byte_rows  # examples/ is on sys.path when this file runs
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, DistributedSampler

import fastsel
from fastsel.experiments.data import collate
from fastsel.integrations.models import add_lora, llama_config, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank and micro-batch")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--strategy", default="moderate")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="GPU: bf16 unsharded parameters, fp32 reduction")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    config = llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=258, pad_token_id=256)
    model = add_lora(random_model(config, seed=0, device=device), r=8)  # the same initial weights on every rank
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else \
        MixedPrecisionPolicy()
    for layer in model.base_model.model.model.layers:  # one FSDP unit per decoder layer, then the root
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    rows = byte_rows(128)
    sampler = DistributedSampler(rows, shuffle=True, seed=0)
    loader = DataLoader(rows, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=lambda f: collate(f, 256))

    def micro_batches():  # epoch after epoch
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    batches = micro_batches()
    for step in range(args.steps):
        for micro in range(args.accum):
            batch = next(batches)
            ids = batch.pop("ids")
            batch = {k: v.to(device) for k, v in batch.items()}
            last = micro == args.accum - 1
            selection = fastsel.selective_backward(batch, model, ratio=args.ratio, strategy=args.strategy,
                                                   scale=1.0 / args.accum, sync=last)  # instead of backward
            all_ids: list = [None] * world
            dist.all_gather_object(all_ids, ids)
            if rank == 0:
                flat = [i for part in all_ids for i in part]
                kept = [flat[i] for i in selection.indices.tolist()]
                print(f"step {step} micro {micro}: kept {kept} of {len(flat)}; {selection.pass_reason}", flush=True)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # over the sharded gradients (DTensor)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: update with gradient norm {float(grad_norm.full_tensor()):.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
