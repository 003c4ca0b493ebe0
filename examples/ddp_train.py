"""A plain PyTorch DDP training loop where `loss.backward()` is replaced by `fastsel.selective_backward`.

    torchrun --nproc_per_node 2 examples/ddp_train.py              # CPU (gloo) or one GPU per process (nccl)

Each rank takes its shard of every global batch (DistributedSampler); selective_backward gathers all ranks' losses
and gradient norms, selects over the global batch, and sums the selected examples' gradients over ranks itself (the
local passes run under DDP's no_sync), so every rank ends with the same `.grad` and the same update as one process
on the whole batch. Rank 0 prints the kept example ids of each step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import fastsel
from fastsel.experiments.data import collate, load_task
from fastsel.integrations.models import add_lora


def byte_rows(max_length: int) -> list[dict]:
    """Dolly mini rows as byte tokens (pad 256, eos 257): loss on the response only."""
    rows = []
    for ex in load_task("dolly", split="train"):
        prompt, response = list(f"Q: {ex.prompt}\nA: ".encode()), list(ex.response.encode()) + [257]
        prompt = prompt[-max(8, max_length - len(response)):]
        rows.append({"id": ex.id, "input_ids": (prompt + response)[:max_length],
                     "labels": ([-100] * len(prompt) + response)[:max_length]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--strategy", default="moderate")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=256))
    model = DistributedDataParallel(add_lora(base, r=8).to(device), device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    rows = byte_rows(128)
    sampler = DistributedSampler(rows, shuffle=True, seed=0)
    loader = DataLoader(rows, batch_size=args.batch_size, sampler=sampler, collate_fn=lambda f: collate(f, 256))
    for step, batch in zip(range(args.steps), loader, strict=False):
        ids = batch.pop("ids")
        selection = fastsel.selective_backward(batch, model, ratio=args.ratio, strategy=args.strategy)  # not backward
        optimizer.step()
        optimizer.zero_grad()
        all_ids: list = [None] * dist.get_world_size()
        dist.all_gather_object(all_ids, ids)
        if rank == 0:
            flat = [i for part in all_ids for i in part]
            kept = [flat[i] for i in selection.indices.tolist()]
            loss = float(selection.losses[selection.indices].mean())
            print(f"step {step}: kept {kept} of {len(flat)} (kept loss {loss:.3f})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
