"""Worker of ``tests/test_heads.py``: ``torchrun --nproc_per_node 2 ddp_buffers_runner.py OUT``.

Each process trains a tiny model whose DNC head keeps a sub-centroid memory, wrapped in
``DistributedDataParallel`` with ``broadcast_buffers=True`` (the default, which replaces each process's
memory shard by process 0's before every forward) and then ``False``, for four steps each, on its own
data (process r sees class r only). It writes ``OUT/rank<r>.json``: per setting, "ok" or the error
message, and the labels its memory ended with.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        from dnc.heads import DNCHead
        self.body = nn.Linear(6, 8)
        self.head = DNCHead(8, 3, num_subcentroids=2, memory_size=8, update_interval=2)

    def forward(self, x, y):
        return self.head(self.body(x), y)


def run(broadcast_buffers: bool, rank: int) -> dict:
    torch.manual_seed(0)
    net = Net()
    ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=broadcast_buffers)
    g = torch.Generator().manual_seed(rank)
    try:
        for _ in range(4):
            y = torch.full((4,), rank)
            logits, _ = ddp(torch.randn(4, 6, generator=g), y)
            F.cross_entropy(logits, y).backward()
        result = "ok"
    except RuntimeError as e:
        result = str(e)
    return {"result": result, "memory_y": net.head.centroids.memory_y.tolist()}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    result = {str(b): run(b, rank) for b in (True, False)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
