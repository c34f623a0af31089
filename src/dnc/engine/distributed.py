"""Processes: one per device, under ``torchrun`` a process group from the environment (NCCL on GPUs, gloo
on CPUs), and the small host-side agreements between them."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "setup_distributed", "check_one_process", "setup_one_process", "unwrap", "host_group",
           "all_reduce_max", "gather_objects"]


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment when it names several processes."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, dev)


def check_one_process(command: str) -> None:
    """Raise ``ValueError`` when started as one of several processes (torchrun): ``command`` runs in one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError(f"{command} runs in one process; start it without torchrun")


def setup_one_process(command: str, device: str = "auto") -> DistInfo:
    """:func:`setup_distributed` for a command that runs in one process (:func:`check_one_process`)."""
    check_one_process(command)
    return setup_distributed(device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def host_group():
    """A process group for small host-side agreements (stop flag, empty batch): the default group under
    gloo, a gloo group beside NCCL otherwise, so that agreeing never waits on the GPU. A collective:
    every process calls it at the same point."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def all_reduce_max(flag: bool, group=None) -> bool:
    """Whether any process's ``flag`` is set (a CPU tensor: no host-device synchronisation)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def gather_objects(items: list) -> list:
    """``items`` of every process, concatenated in rank order (``items`` itself with one process)."""
    if not dist.is_initialized():
        return items
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]
