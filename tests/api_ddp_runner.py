"""Run under torchrun (2 CPU processes, gloo): a plain training loop of ``dnc.create_model`` (DNC head)
wrapped in DistributedDataParallel, each process on its half of every batch. Saves, per process, the
model's state and the losses to OUT/api_rank{R}.pt."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import dnc
from test_api import STEPS, batches

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every process (DDP also broadcasts the parameters)
    model = dnc.create_model("test_resnet", num_classes=3, num_subcentroids=2, momentum=0.5)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in batches():
        part = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        logits, parts = ddp(x[part], y[part])
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.save({"model": model.state_dict(), "losses": losses}, f"{out}/api_rank{rank}.pt")
    dist.destroy_process_group()
