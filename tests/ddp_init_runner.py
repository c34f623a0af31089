"""Worker script of ``tests/test_ddp_init.py``, run as ``torchrun --nproc_per_node 2 ddp_init_runner.py OUT``.

Each process initialises the same randomly started :class:`~dnc.centroids.SubCentroids` from its own
shard of embeddings (:func:`shards`: class 3 lives on process 1 only) and saves the result to
``OUT/rank<r>.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

C, D, K = 4, 8, 3


def shards() -> tuple:
    """``([(z, labels) of process 0, of process 1], planted means (C, K, D))``: classes 0-2 on both
    processes (45 and 52 samples), class 3 only on process 1 (18 samples, six per sub-cluster)."""
    g = torch.Generator().manual_seed(0)
    means = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
    out = []
    for n, extra in ((45, 0), (52, 18)):
        labels = torch.cat([torch.randint(0, 3, (n,), generator=g), torch.full((extra,), 3)])
        sub = torch.cat([torch.randint(0, K, (n,), generator=g), torch.arange(extra) % K])
        perm = torch.randperm(len(labels), generator=g)
        labels, sub = labels[perm], sub[perm]
        out.append((F.normalize(means[labels, sub] + 0.05 * torch.randn(len(labels), D, generator=g), dim=1), labels))
    return out, means


def start():
    """The randomly started sub-centroids (identical on every process) and their init from this process's shard."""
    from dnc.centroids import SubCentroids
    torch.manual_seed(0)
    sc = SubCentroids(C, D, K)
    before = sc.centroids.clone()
    rank = dist.get_rank() if dist.is_initialized() else 0
    z, labels = shards()[0][rank]
    return sc, before, z, labels


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for iters in (0, 10):
        sc, before, z, labels = start()
        sc.init_from_embeddings(z, labels, iters=iters, generator=torch.Generator().manual_seed(1))
        results[iters] = {"start": before, "centroids": sc.centroids}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
