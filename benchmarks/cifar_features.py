#!/usr/bin/env python
"""Issue 20: train the CIFAR-10 6-known-class twins once per seed and embed every split once (fp32).

    python benchmarks/cifar_features.py ARCHIVE --work-dir W [--seeds 0 1 2] [--variant NAME=key=v,key=v ...]
        [--threads 2] [key=value ...]

The offline protocols (``openset_posthoc.py``, ``fewshot_addition.py``) read what this writes. Data
(``evidence_data.py``'s carving, nothing else): per class, ``test`` = the last 500 of 5,000 files (by
name), validation = the 500 before them (``data.holdout=3000`` over the 6 known classes), training =
the first 4,000 (``data.train_subset`` draws from them). Known classes 0,1,2,4,5,9 (airplane, automobile,
bird, deer, dog, truck; the first standard 6/4 split), unknown: cat, frog, horse, ship.

Per seed and model (``dnc``, ``linear``, and each ``--variant``, a DNC run with extra overrides) it runs
``dnc train CONFIG`` on the known classes, then embeds with the trained network, in fp32, the backbone
features (before the head) of: ``bank`` (the training subset, evaluation transform), ``val_known``,
``val_unknown`` (the last 300 of each class's 500 held-out images: the 2-core machine's budget),
``test_known``, ``test_unknown`` (all 500 per class) and ``pool`` (150 random training images of each
unknown class, seed 0: the shots of class addition are drawn from them). Labels are 10-way indices in
the order known + unknown (the class order ``dnc extend`` gives). Writes ``W/<model>_seed<S>/feats.pt``.
Finished steps are skipped (the protocol resumes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from evidence_data import cifar as carve_cifar  # noqa: E402
from openset import CIFAR10, class_names, load_run, run_dnc  # noqa: E402

KNOWN = "0,1,2,4,5,9"
CONFIGS = {"dnc": "configs/cifar10_jpeg/effnet-lite0_cpu_dnc.yaml",
           "linear": "configs/cifar10_jpeg/effnet-lite0_cpu_linear.yaml"}
HOLDOUT, VAL_PER_CLASS, POOL_PER_CLASS = 500, 300, 150


def lay_out(archive: Path, work: Path, known: list) -> tuple:
    """``(known_root, {split: [(file, label)]})``: the carved data set, the known classes' training
    tree (links) and the file lists of the held-out splits and the shot pool."""
    root = carve_cifar(archive, (work / "data").resolve()) if not (work / "data" / "cifar10" / "test").is_dir() \
        else (work / "data" / "cifar10").resolve()
    unknown = [c for c in CIFAR10 if c not in known]
    tree = work.resolve() / "data" / "known6"
    for split in ("train", "test"):
        for c in known:
            link = tree / split / c
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(root / split / c, target_is_directory=True)
    order = known + unknown
    files = {}
    for name, split, classes in (("val_known", "train", known), ("val_unknown", "train", unknown),
                                 ("test_known", "test", known), ("test_unknown", "test", unknown)):
        files[name] = [(str(f), order.index(c)) for c in classes
                       for f in (sorted((root / split / c).iterdir())[-VAL_PER_CLASS:] if split == "train"
                                 else sorted((root / split / c).iterdir()))]  # val: the last 300 of the 500 held out
    rng = np.random.default_rng(0)
    files["pool"] = [(str(f), order.index(c)) for c in unknown
                     for f in np.array(sorted((root / "train" / c).iterdir())[:-HOLDOUT])[
                         np.sort(rng.choice(4500 - HOLDOUT, POOL_PER_CLASS, replace=False))]]
    return tree, files, order


@torch.no_grad()
def embed(run_dir: Path, files: dict, threads: int) -> dict:
    """Backbone features (fp32, before the head) and labels of every split, with the trained network."""
    from torch.utils.data import DataLoader

    from dnc.data.classification import collate
    from dnc.data.images import ImageList
    from dnc.tasks import build_cls_split, cls_transform, eval_transform, training_subset
    torch.set_num_threads(threads)
    cfg, model, _ = load_run(run_dir)
    sets = {"bank": training_subset(cfg, build_cls_split(cfg, "train", cls_transform(cfg, False)))}
    tf = eval_transform(cfg)
    for name, items in files.items():
        sets[name] = ImageList([f for f, _ in items], tf)
    out = {}
    for name, ds in sets.items():
        feats = [model.features(x).float() for x, *_ in DataLoader(ds, batch_size=250, num_workers=1, collate_fn=collate)]
        labels = torch.tensor(ds.targets if name == "bank" else [y for _, y in files[name]])
        out[name] = (torch.cat(feats), labels)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["dnc", "linear"])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=key=v,key=v",
                    help="a DNC model with extra overrides, e.g. contrast=model.dnc.contrast_weight=0.1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    known = class_names(KNOWN)
    tree, files, _ = lay_out(args.archive, args.work_dir, known)
    models = {m: (CONFIGS[m], []) for m in args.models}
    for v in args.variant:
        name, _, over = v.partition("=")
        models[name] = (CONFIGS["dnc"], over.split(","))
    common = [f"data.root={tree}", "data.holdout=3000", f"data.num_classes={len(known)}",
              f"train.threads={args.threads}", "data.num_workers=1", *args.overrides]
    for seed in args.seeds:
        for name, (config, extra) in models.items():
            run_dir = args.work_dir / f"{name}_seed{seed}"
            if (run_dir / "feats.pt").is_file():
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            try:  # several copies of this script may share the work dir: one run each
                os.close(os.open(run_dir / ".taken", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                print(f"  {run_dir}: taken by another process, skipped", flush=True)
                continue
            if not (run_dir / "metrics.json").is_file():  # written when the training has finished
                t = time.time()
                run_dnc("train", config, "--work-dir", run_dir, *common, f"train.seed={seed}", *extra,
                        log=args.work_dir / "commands.log")
                print(f"  trained in {time.time() - t:.0f} s", flush=True)
            if not (run_dir / "feats.pt").is_file():
                t = time.time()
                torch.save(embed(run_dir, files, args.threads), run_dir / "feats.pt")
                print(f"  embedded {run_dir} in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
