"""Data-parallel training under torchrun: `torchrun --nproc_per_node N -m runs.train ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `start(device)` joins the process group
(NCCL on CUDA, gloo on CPU) and picks this rank's device. Every rank holds the whole split
on its device and takes a disjoint slice of each global batch, so N ranks see each sample
once per epoch and DDP's gradient average equals one process on the same global batch.
Rank 0 alone writes checkpoints, metrics and results. BatchNorm becomes SyncBatchNorm on
CUDA (statistics over the global batch); on CPU (gloo, tests) statistics stay per rank.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from runs.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (no-op for one process)."""
    world = from_env()
    if not world.active:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the (prepared) model; identity for one process."""
    if not world.active:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_slice(batch_size: int, world: World) -> slice:
    """This rank's part of a global batch: contiguous and equal-sized."""
    if batch_size % world.size:
        raise UserError(f"--batch-size {batch_size} must be divisible by the {world.size} "
                        f"processes of torchrun")
    per_rank = batch_size // world.size
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


def mean(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The average of `tensor` over ranks (itself for one process)."""
    if not world.active:
        return tensor
    out = tensor.detach().clone().float()
    dist.all_reduce(out)
    return out / world.size


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def finish(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
