"""Shared by the open-set / extend / export tests: scikit-learn's digits as image folders, and a tiny
recipe that trains on some digits in seconds (the others are the unknown or the new classes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dnc.cli import main
from dnc.config import PACKAGE_CONFIGS

DNC_CFG = str(PACKAGE_CONFIGS / "demo" / "digits_dnc.yaml")
LINEAR_CFG = str(PACKAGE_CONFIGS / "demo" / "digits_linear.yaml")


def write_digits(root: Path, known=tuple("012345"), train_per_class: int = 50, val_per_class: int = 20) -> Path:
    """``root/known/{train,val}/<digit>/*.png`` for the ``known`` digits and ``root/unknown/<digit>/``
    (``val_per_class`` images) and ``root/new/<digit>/`` (``train_per_class``) for the others."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for d in range(10):
        images = np.rint(digits.images[digits.target == d] * 255 / 16).astype(np.uint8)
        name = str(d)
        if name in known:
            parts = {"known/train": images[:train_per_class],
                     "known/val": images[train_per_class:train_per_class + val_per_class]}
        else:
            parts = {"new": images[:train_per_class], "unknown": images[train_per_class:train_per_class + val_per_class]}
        for part, imgs in parts.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(folder / f"{name}_{i:03d}.png")
    return root


def overrides(root: Path, num_classes: int = 6, iters: int = 60) -> list:
    return [f"data.root={root / 'known'}", "data.dataset=imagefolder", f"data.num_classes={num_classes}",
            "model.backbone_kwargs.width=8", "model.backbone_kwargs.num_features=16", "data.batch_size=32",
            "model.dnc.init_samples=300", "sched.warmup_iters=5", "train.epochs=0", f"train.iters={iters}",
            f"train.eval_interval={iters}", "train.log_interval=20"]


def train(config: str, work: Path, root: Path, extra=()) -> Path:
    assert main(["train", config, "--work-dir", str(work), *overrides(root), *extra]) == 0
    return work / "last.pt"
