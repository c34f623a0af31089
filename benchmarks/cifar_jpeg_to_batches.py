#!/usr/bin/env python
"""Pre-decode the CIFAR-10 JPEG copy (an image folder) into the CIFAR python-batch layout, once.

The training loop then reads uint8 arrays from memory instead of opening and decoding a JPEG per sample
(``data.dataset=cifar10``), with the *same* images, labels and split as the image folder::

    python benchmarks/cifar_jpeg_to_batches.py SRC DST [--holdout 5000] [--workers N] [--verify 500]

``SRC`` is the image folder (``SRC/train/<class>/*.jpg`` or ``SRC/<class>/*.jpg``). Every image is decoded
exactly as ``dnc.data.classification.ImageFolder`` decodes it (PIL, ``convert("RGB")``). The batches hold
the ``holdout`` split's training images first, in the image folder's order, then its validation images
(the last ``holdout / 10`` files of each class), so that ``data.dataset=cifar10 data.holdout=5000`` on
``DST`` gives sample for sample the split that ``data.dataset=imagefolder data.holdout=5000`` gives on
``SRC``. ``--verify`` compares that many random samples of each split, pixel for pixel, after writing.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import common  # noqa: F401  (this checkout's dnc first on the path)
import numpy as np

from dnc.data.classification import CIFAR, ImageFolder, holdout  # noqa: E402

_FOLDER = None


def _init(root):
    global _FOLDER
    _FOLDER = ImageFolder(root)


def _decode(indices):
    return np.stack([np.asarray(_FOLDER[i][0]) for i in indices])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--holdout", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--verify", type=int, default=500, help="random samples per split to compare (0: none)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    src = Path(args.src)
    root = src / "train" if (src / "train").is_dir() else src
    folder = ImageFolder(root)
    train, val = holdout(folder, args.holdout, per_class=True)
    order = list(train.indices) + list(val.indices)
    chunks = [order[i:i + 1000] for i in range(0, len(order), 1000)]
    with Pool(args.workers, initializer=_init, initargs=(str(root),)) as pool:
        images = np.concatenate(pool.map(_decode, chunks))
    if images.shape[1:] != (3, 32, 32) or images.dtype != np.uint8:
        raise SystemExit(f"{root}: expected 32x32 RGB images, got {images.dtype} {images.shape[1:]}")
    labels = [folder.targets[i] for i in order]

    out = Path(args.dst) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    n = len(order)
    per = -(-n // 5)
    for b in range(5):
        sl = slice(b * per, min(n, (b + 1) * per))
        with open(out / f"data_batch_{b + 1}", "wb") as f:
            # protocol 4 (not 5): arrays pickle through numpy's _reconstruct, which dnc's safe loader accepts
            pickle.dump({"data": images[sl].reshape(-1, 3 * 32 * 32), "labels": labels[sl],
                         "batch_label": f"cifar10-jpeg {b + 1} of 5"}, f, protocol=4)
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(folder.classes), "num_cases_per_batch": per}, f, protocol=4)

    checked = 0
    if args.verify:
        ctrain, cval = holdout(CIFAR(args.dst, train=True), args.holdout)
        assert ctrain.targets == train.targets and cval.targets == val.targets, "labels differ"
        rng = np.random.default_rng(0)
        for a, b in ((ctrain, train), (cval, val)):
            for i in rng.choice(len(a), min(args.verify, len(a)), replace=False):
                if not np.array_equal(np.asarray(a[int(i)][0]), np.asarray(b[int(i)][0])):
                    raise SystemExit(f"sample {i} differs between {args.dst} and {args.src}")
                checked += 1
    print(f"wrote {n} images ({len(train)} train + {len(val)} val, {len(folder.classes)} classes) to {out} "
          f"in {time.perf_counter() - t0:.1f} s; {checked} samples verified pixel for pixel", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
