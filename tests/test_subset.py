"""data.train_subset: a fixed, class-balanced subset of the training set."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dnc.data.subset import balanced_subset


class _Labels(Dataset):
    def __init__(self, targets):
        self.targets, self.classes = list(targets), [str(i) for i in range(max(targets) + 1)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(1), self.targets[i]


def test_balanced_fixed_and_in_order():
    targets = [0] * 500 + [1] * 300 + [2] * 40  # skewed
    ds = _Labels(targets)
    sub = balanced_subset(ds, 300)
    counts = np.bincount(sub.targets, minlength=3)
    assert counts.tolist() == [130, 130, 40]  # the small class whole, the others equal
    assert sub.indices == sorted(sub.indices) and len(set(sub.indices)) == 300
    assert sub.indices == balanced_subset(ds, 300).indices  # fixed
    assert sub.indices != balanced_subset(ds, 300, seed=1).indices
    even = balanced_subset(_Labels([0, 1, 2] * 100), 30)
    assert np.bincount(even.targets).tolist() == [10, 10, 10]


def test_bad_size_is_one_line():
    with pytest.raises(ValueError, match=r"data.train_subset=50: must be in \[1, 10\]"):
        balanced_subset(_Labels([0, 1] * 5), 50)


def test_train_subset_through_the_config():
    from dnc.config import load_config
    from dnc.tasks import build_datasets
    cfg = load_config("configs/demo/digits_dnc.yaml", ("data.train_subset=100",))
    datasets, _ = build_datasets(cfg)
    assert len(datasets["train"]) == 100 and np.bincount(datasets["train"].targets).tolist() == [10] * 10
