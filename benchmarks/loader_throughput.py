#!/usr/bin/env python
"""CPU cost per training sample of the CIFAR-10 input pipeline, in one process (as one loader worker).

    python benchmarks/loader_throughput.py JPEG_ROOT [--pickle-root DIR] [--samples 300] [--rounds 5]

``JPEG_ROOT`` is the extracted JPEG copy (``JPEG_ROOT/train/<class>/*.jpg``); ``--pickle-root`` the same
images pre-decoded by ``benchmarks/cifar_jpeg_to_batches.py``. Measures, interleaved over rounds (median,
microseconds per sample, one torch thread as in a DataLoader worker): the whole training path of
``dnc train`` (``SeededDataset`` seeding + decode + ``cifar`` train transform + collate) from the image
folder and from the pre-decoded copy, and its parts: the JPEG decode alone, the transform alone, and the
per-sample seeding (``torch.random.fork_rng`` + ``torch.manual_seed``, as ``dnc.engine.SeededDataset``
does, against seeding only the CPU generator). Sizing the GPU runs: an epoch of 45,000 images costs
``45,000 x us_per_sample / workers`` of wall time at best.
"""
from __future__ import annotations

import statistics
import sys
import time

import common
import torch
from torchvision import tv_tensors  # noqa: E402

from dnc.data.classification import build_cls_dataset, collate  # noqa: E402
from dnc.data.transforms import build_cls_transform  # noqa: E402
from dnc.engine import SeededDataset  # noqa: E402


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("jpeg_root")
    ap.add_argument("--pickle-root")
    ap.add_argument("--samples", type=int, default=300, help="samples per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tf = build_cls_transform("cifar", True)
    jpeg = build_cls_dataset("imagefolder", args.jpeg_root, "train", tf, holdout=5000)
    raw = build_cls_dataset("imagefolder", args.jpeg_root, "train", None, holdout=5000)
    seeded_jpeg = SeededDataset(jpeg, 0)
    seeded_pkl = SeededDataset(build_cls_dataset("cifar10", args.pickle_root, "train", tf, holdout=5000), 0) \
        if args.pickle_root else None
    images = [tv_tensors.Image(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)) for _ in range(args.samples)]

    def fork_seed(i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)

    def cpu_seed(i):
        state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(i)
        torch.default_generator.set_state(state)

    n = args.samples
    variants = {
        "pipeline_imagefolder": lambda s: collate([seeded_jpeg[(0, i)] for i in range(s, s + n)]),
        "decode_only": lambda s: [raw[i] for i in range(s, s + n)],
        "transform_only": lambda s: [tf(img) for img in images],
        "seed_fork_rng_manual_seed": lambda s: [fork_seed(i) for i in range(s, s + n)],
        "seed_cpu_generator_only": lambda s: [cpu_seed(i) for i in range(s, s + n)],
    }
    if seeded_pkl is not None:
        variants["pipeline_predecoded"] = lambda s: collate([seeded_pkl[(0, i)] for i in range(s, s + n)])
    times = {k: [] for k in variants}
    for r in range(args.rounds + 1):  # the first round warms up
        for name, fn in variants.items():
            t = time.perf_counter()
            fn(r * n)
            if r:
                times[name].append((time.perf_counter() - t) / n * 1e6)
    res = {"us_per_sample": {k: statistics.median(v) for k, v in times.items()}}
    if seeded_pkl is not None:
        res["imagefolder_over_predecoded"] = statistics.median(
            a / b for a, b in zip(times["pipeline_imagefolder"], times["pipeline_predecoded"]))
    for k, v in res["us_per_sample"].items():
        print(f"  {k:<28}{v:9.1f} us/sample")
    if "imagefolder_over_predecoded" in res:
        print(f"  image folder / pre-decoded: x{res['imagefolder_over_predecoded']:.2f}")
    if args.out:
        common.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
