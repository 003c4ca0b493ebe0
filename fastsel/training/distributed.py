"""torch.distributed helpers: global selection over all ranks' examples (DDP through torchrun or Accelerate).

Every rank gathers all per-example losses and norms in rank order, applies the same selection to the global batch,
and keeps its own slice; gradients of the selected examples are summed over ranks and divided by the global kept
count, so the update equals single-process selection on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(values: Tensor) -> tuple[Tensor, int]:
    """All ranks' 1-D `values` concatenated in rank order, and this rank's offset in the result."""
    if not is_distributed():
        return values, 0
    device = values.device if dist.get_backend() != "gloo" else torch.device("cpu")
    local = values.detach().float().to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.numel()], device=device))
    counts = [int(s) for s in sizes]
    width = max(counts)
    padded = torch.zeros(width, device=device)
    padded[: local.numel()] = local
    parts = [torch.zeros(width, device=device) for _ in counts]
    dist.all_gather(parts, padded)
    rank = dist.get_rank()
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(values.device), sum(counts[:rank])


def shared_seed(seed: int | None) -> int:
    """A seed every rank agrees on: the given one, else rank 0's draw."""
    if seed is not None:
        return seed
    drawn = torch.randint(0, 2**62, (1,))
    if is_distributed():
        drawn = drawn.to(_collective_device())
        dist.broadcast(drawn, src=0)
    return int(drawn.item())


def sum_over_ranks(tensors: list[Tensor]) -> None:
    """In-place all-reduce (sum) of each tensor when running distributed; a no-op otherwise."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's `values` (the same length on each), in rank order: [[values of rank 0], ...]. An int64
    all-gather, so that byte counts stay exact (no all-reduce: it stays reserved for gradients)."""
    if not is_distributed():
        return [list(values)]
    device = _collective_device()
    local = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [[int(v) for v in part.tolist()] for part in parts]


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on some rank; `flag` itself without torch.distributed."""
    return any(v[0] for v in gather_ints([int(flag)]))


def reduce_to_shard(total: Tensor, like: Tensor) -> Tensor:
    """This rank's part of the sum over ranks of the full-size `total`, laid out like the parameter `like`.

    `like` a DTensor (an FSDP2 parameter): its local shard, by one reduce-scatter (a reduce-scatter and an
    all-reduce for HSDP) over its device mesh; a plain tensor: the all-reduced sum.
    """
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(like, DTensor):
        mesh = like.device_mesh
        partial = DTensor.from_local(total, mesh, [Partial()] * mesh.ndim, run_check=False, shape=like.shape,
                                     stride=like.stride())
        return partial.redistribute(mesh, like.placements).to_local()
    total = total.clone()
    sum_over_ranks([total])
    return total


def world_size() -> int:
    """Number of ranks (1 without an initialized process group)."""
    return dist.get_world_size() if is_distributed() else 1
