"""Lay out the evidence data sets from the shipped archives, with a test split nobody tunes on.

    python benchmarks/evidence_data.py --cifar CIFAR10_JPEG.tar.gz --camvid-train TRAIN.tar.gz \
        --camvid-val VAL.tar.gz --out DIR

CIFAR-10 (JPEG copy, 5,000 training images per class): ``DIR/cifar10/train/<class>`` keeps the first
4,500 files of each class (by name) and ``DIR/cifar10/test/<class>`` the last 500. The recipes carve
their validation set from ``train`` (``data.holdout=5000``: the last 500 of each class's 4,500), so
training, validation and test images are disjoint, and test is only scored at the end.

CamVid (367 training, 101 validation images; its test split is not shipped): ``DIR/camvid/train`` is the
first 300 training images by name, ``DIR/camvid/val`` the last 67 (a contiguous stretch of video, the
split that ablations may tune on), and ``DIR/camvid/test`` the official 101 validation images.
"""
from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path


def _extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")


def cifar(archive: Path, out: Path, test_per_class: int = 500) -> Path:
    root = out / "cifar10"
    if (root / "test").is_dir():
        return root
    tmp = Path(tempfile.mkdtemp(dir=out))
    _extract(archive, tmp)
    for cls in sorted(p for p in (tmp / "train").iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        (tmp / "test" / cls.name).mkdir(parents=True)
        for f in files[-test_per_class:]:
            f.rename(tmp / "test" / cls.name / f.name)
    tmp.rename(root)
    return root


def camvid(train_archive: Path, val_archive: Path, out: Path, val_images: int = 67) -> Path:
    root = out / "camvid"
    if (root / "test").is_dir():
        return root
    tmp = Path(tempfile.mkdtemp(dir=out))
    _extract(train_archive, tmp)
    _extract(val_archive, tmp)
    (tmp / "val").rename(tmp / "test")
    for sub in ("images", "labels"):
        (tmp / "val" / sub).mkdir(parents=True)
    for img in sorted((tmp / "train" / "images").iterdir())[-val_images:]:
        img.rename(tmp / "val" / "images" / img.name)
        label = tmp / "train" / "labels" / (img.stem + ".png")
        label.rename(tmp / "val" / "labels" / label.name)
    tmp.rename(root)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", type=Path)
    p.add_argument("--camvid-train", type=Path)
    p.add_argument("--camvid-val", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.cifar:
        print(cifar(a.cifar, a.out))
    if a.camvid_train and a.camvid_val:
        print(camvid(a.camvid_train, a.camvid_val, a.out))


if __name__ == "__main__":
    main()
