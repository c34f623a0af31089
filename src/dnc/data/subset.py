"""``data.train_subset``: a fixed, class-balanced random subset of a training set, to size a run."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from .classification import LabeledSubset

__all__ = ["balanced_subset"]


def balanced_subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` samples of ``dataset``, as equally many of each class as the classes allow.

    Classes are read from ``dataset.targets`` (classification); a dataset without targets
    (segmentation) gives ``n`` samples drawn uniformly. The choice depends on ``seed`` only (not on
    the training seed), so that runs with different seeds train on the same images. The subset keeps
    the dataset order.
    """
    size = len(dataset)
    if not 0 < n <= size:
        raise ValueError(f"data.train_subset={n}: must be in [1, {size}] (the training set has {size} samples)")
    rng = np.random.default_rng(seed)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        keep = rng.permutation(size)[:n]
    else:
        # Rank every sample inside its class in a random order, then take the n lowest ranks: the
        # first of each class, then the second of each class, and so on (random among equal ranks).
        targets = np.asarray(targets)
        order = rng.permutation(size)
        by_class = order[np.argsort(targets[order], kind="stable")]
        starts = np.searchsorted(targets[by_class], targets[by_class], side="left")
        rank = np.empty(size, dtype=np.int64)
        rank[by_class] = np.arange(size) - starts
        keep = np.lexsort((rng.random(size), rank))[:n]
    keep = np.sort(keep)
    if targets is not None:
        return LabeledSubset(dataset, keep)
    from torch.utils.data import Subset
    sub = Subset(dataset, keep.tolist())
    for attr in ("classes", "num_classes", "ignore_index"):
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    return sub
