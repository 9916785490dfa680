"""Scale-out over processes with torch.distributed (launched by `torchrun`): gloo on CPU, NCCL on GPU.

Prompts are sharded by rank (prompt i goes to rank i mod world), every rank counts its shard, the counts
are all-reduced (summed) and rank 0 writes the one Profile. Outside torchrun this is a world of one
and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch



@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a world of one
    owned: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (moved to the collective's device and back when needed)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        dev = self._comm_device()
        buf = t if t.device == dev else t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        return int(self.all_reduce_(t)[0])

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """hotcold.devices.resolve_device, a bare 'cuda' meaning this rank's GPU."""
    from hotcold.devices import resolve_device as resolve

    return resolve(device or "cpu", local_rank)


def init_distributed(device: str = "cpu") -> DistContext:
    """A DistContext for this process: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or
    a world of one. Initialises the process group when torchrun started us and nobody else has."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext(device=resolve_device(device))
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owned = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=float(os.environ.get("HOTCOLD_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
        owned = True
    else:
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend, owned=owned)
