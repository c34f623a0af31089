"""Data loading for training and evaluation: this process's share of the samples, each sample's random
transforms seeded from (seed, epoch, index), unreadable samples counted, workers deaf to stop signals."""
from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler is registered before ours (ours runs first)
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import DistInfo

__all__ = ["EpochSampler", "SeededDataset", "IndexedCollate", "ignore_stop_signals", "make_loader"]


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for this process.

    Training: a permutation drawn from (seed, epoch), cut to a multiple of the number of processes and
    dealt round-robin, so every process has the same number of samples. Evaluation (``shuffle=False``):
    samples ``rank, rank + world, ...`` without padding, so every sample is counted exactly once.
    ``start`` skips the first samples of this process's share (resuming inside an epoch).
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def _indices(self) -> list:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)[: self.size - self.size % self.world]
        return perm[self.rank:: self.world].tolist()

    def __iter__(self) -> Iterator:
        return iter([(self.epoch, i) for i in self._indices()[self.start:]])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


class SeededDataset(Dataset):
    """Seeds the random transforms of each sample from (seed, epoch, index): augmentations do not
    depend on worker count, worker order or where a run was resumed.

    Returns ``(index, sample)``; with ``on_bad="skip"`` an unreadable sample (a ``ValueError`` naming
    its file, or ``None`` from the dataset) is ``(index, None)``, which :class:`IndexedCollate` drops.
    """

    def __init__(self, dataset: Dataset, seed: int, on_bad: str = "error"):
        self.dataset, self.seed, self.on_bad = dataset, seed, on_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what the transforms draw from): torch.manual_seed would also
            # seed CUDA lazily, which costs more than loading a small image.
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63))
            try:
                return index, self.dataset[index]
            except ValueError:
                if self.on_bad != "skip":
                    raise
                return index, None


class IndexedCollate:
    """Batches as ``(images, targets, number of skipped samples, dataset indices of the kept ones)``:
    ``collate_fn`` (returning ``(images, targets, skipped)``) sees the readable samples only. A batch
    whose samples were all skipped has empty ``images`` and ``targets``: callers skip it."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        kept = [(i, s) for i, s in batch if s is not None]
        if not kept:
            return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch), torch.empty(0, dtype=torch.long)
        images, targets, skipped = self.collate_fn([s for _, s in kept])
        return images, targets, len(batch) - len(kept) + skipped, torch.tensor([i for i, _ in kept])


def ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    """``worker_init_fn`` of every loader: a DataLoader worker ignores SIGINT/SIGTERM, so that a signal sent
    to the whole process group (a cluster scheduler, Ctrl-C) leaves stopping and saving to the main
    process instead of killing the workers under it. Deaf to those, a worker still ends with its parent:
    the parent's death kills it (Linux: ``PR_SET_PDEATHSIG``), and so does the parent's exit
    (:func:`_kill_workers_at_exit`). ``then``: a ``worker_init_fn`` of the caller's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if then is not None:
        then(worker_id)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


@atexit.register
def _kill_workers_at_exit() -> None:
    """At the interpreter's exit, SIGKILL the daemonic children still alive (DataLoader workers whose
    iterator outlived the program, e.g. kept by a traceback). ``multiprocessing`` would send them SIGTERM,
    which they ignore, and then wait for them forever. Registered after ``multiprocessing``'s own exit
    handler, it runs before it."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for each killed worker
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, info: DistInfo, seed: int, num_workers: int,
                collate_fn: Callable, worker_init_fn: Optional[Callable[[int], None]] = None,
                on_bad: str = "error") -> DataLoader:
    """Batches ``(images, targets, skipped, indices)`` (:class:`IndexedCollate`) of this process's share."""
    sampler = EpochSampler(len(dataset), shuffle, seed, info.rank, info.world)
    return DataLoader(SeededDataset(dataset, seed, on_bad), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=IndexedCollate(collate_fn), drop_last=shuffle,
                      pin_memory=info.device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=functools.partial(ignore_stop_signals, then=worker_init_fn))
