#!/usr/bin/env python
"""Issue 20, where sub-centroids pay (a frozen-feature proxy): CIFAR-10 as 2 superclasses, K=1/4/8 against linear.

    python benchmarks/superclass.py ARCHIVE --work-dir W [--seeds 0 1 2] [--train-per-class 200]
        [--test-per-class 300] [--out JSON]

Vehicles (airplane, automobile, ship, truck) against animals (bird, cat, deer, dog, frog, horse). No
network is trained here (the 2-core machine could not train 4 more models in the session): the images
are embedded once by the ImageNet-pretrained EfficientNet-Lite0 of the CIFAR CPU recipe through a
freshly built DNC head (its LayerNorm at initialisation, then L2), i.e. the embedding that the recipe's
k-means++ start clusters. Per seed, ``--train-per-class`` training images of each fine class (drawn
from the first 4,000, ``evidence_data.py``'s carving) are the training set; the carved test images
(the first ``--test-per-class`` of each class's 500) are scored. Heads compared on the same features:

* nearest sub-centroid with K = 1, 4, 8 per superclass: ``dnc.extend.fit_subcentroids`` (k-means++
  and spherical k-means, what ``dnc extend`` and the k-means++ start do);
* linear: class-balanced logistic regression on the same unit embeddings (C=1).

Reported: 2-way test top-1, and the purity of each sub-centroid's 20 nearest training images against
the fine labels (the share of its majority fine class; what ``dnc explain`` shows a user), with the
number of fine classes that are the majority of at least one sub-centroid.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402  (also puts this checkout's dnc first on the path)
from evidence_data import cifar as carve_cifar  # noqa: E402
from openset import CIFAR10  # noqa: E402

VEHICLES = ("airplane", "automobile", "ship", "truck")
CONFIG = "configs/cifar10_jpeg/effnet-lite0_cpu_dnc.yaml"


@torch.no_grad()
def embed(files: list, threads: int) -> torch.Tensor:
    from torch.utils.data import DataLoader

    from dnc.config import load_config
    from dnc.data.classification import collate
    from dnc.data.images import ImageList
    from dnc.tasks import build_model, eval_transform
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, ("data.num_classes=2",))
    model = build_model(cfg).eval()
    loader = DataLoader(ImageList(files, eval_transform(cfg)), batch_size=250, num_workers=1, collate_fn=collate)
    return torch.cat([model.embeddings(x)[0].float() for x, *_ in loader])


def purity(p: torch.Tensor, z: torch.Tensor, fine: torch.Tensor, top: int = 20) -> tuple:
    """Mean share of the majority fine class among each sub-centroid's ``top`` nearest training images,
    and the number of distinct majority classes."""
    near = (p.flatten(0, 1) @ z.t()).topk(top, dim=1).indices  # (C*K, top)
    labels = fine[near]
    majority = labels.mode(1).values
    share = (labels == majority[:, None]).float().mean(1)
    return float(share.mean()), len(set(majority.tolist()))


def main(argv=None) -> dict:
    from sklearn.linear_model import LogisticRegression

    from dnc.extend import fit_subcentroids
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    root = carve_cifar(args.archive, (args.work_dir / "data").resolve()) \
        if not (args.work_dir / "data" / "cifar10" / "test").is_dir() else (args.work_dir / "data" / "cifar10").resolve()
    cache = args.work_dir / f"superclass_feats_{args.train_per_class}_{args.test_per_class}.pt"
    if cache.is_file():
        feats = torch.load(cache)
    else:
        pick = {}
        for s in args.seeds:  # the training images of every seed, embedded once
            rng = np.random.default_rng(s)
            for c in CIFAR10:
                files = sorted((root / "train" / c).iterdir())[:4000]
                pick.update({str(files[i]): CIFAR10.index(c) for i in rng.choice(4000, args.train_per_class, replace=False)})
        test = {str(f): CIFAR10.index(c) for c in CIFAR10 for f in sorted((root / "test" / c).iterdir())[:args.test_per_class]}
        files = sorted(pick) + sorted(test)
        z = embed(files, args.threads)
        feats = {"files": files, "z": z, "fine": torch.tensor([{**pick, **test}[f] for f in files]),
                 "test": torch.tensor([f in test for f in files])}
        torch.save(feats, cache)
    z, fine, is_test = feats["z"], feats["fine"], feats["test"]
    index = {f: i for i, f in enumerate(feats["files"])}
    coarse = torch.tensor([int(CIFAR10[y] in VEHICLES) for y in fine.tolist()])
    zt, yt = z[is_test], coarse[is_test]
    runs = []
    for s in args.seeds:
        rng = np.random.default_rng(s)
        tr = []
        for c in CIFAR10:
            files = sorted((root / "train" / c).iterdir())[:4000]
            tr += [index[str(files[i])] for i in rng.choice(4000, args.train_per_class, replace=False)]
        tr = torch.tensor(sorted(tr))
        run = {"seed": s}
        for k in (1, 4, 8):
            p = fit_subcentroids(z[tr], coarse[tr], 2, k, generator=torch.Generator().manual_seed(s))
            pred = torch.einsum("nd,ckd->nck", zt, p).amax(-1).argmax(1)
            pur, distinct = purity(p, z[tr], fine[tr])
            run[f"K={k}"] = {"top1": round(100 * float((pred == yt).double().mean()), 2), "purity": round(100 * pur, 1),
                             "fine_classes_covered": distinct}
        clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=500).fit(z[tr].numpy(), coarse[tr].numpy())
        run["linear"] = {"top1": round(100 * float((torch.as_tensor(clf.predict(zt.numpy())) == yt).double().mean()), 2)}
        runs.append(run)
        print(json.dumps(run), flush=True)
    heads = [k for k in runs[0] if k != "seed"]
    summary = {h: {m: round(statistics.mean(r[h][m] for r in runs), 2) for m in runs[0][h]} for h in heads}
    for h in heads:
        summary[h]["top1_sd"] = round(statistics.stdev(r[h]["top1"] for r in runs), 2) if len(runs) > 1 else 0.0
    print("| head | 2-way test top-1 % | sub-centroid purity (20 nearest, fine labels) % | fine classes that lead a sub-centroid |")
    print("| --- | --- | --- | --- |")
    for h, r in summary.items():
        print(f"| {h} | {r['top1']:.2f} ± {r['top1_sd']:.2f} | {r.get('purity', '-')} | {r.get('fine_classes_covered', '-')} |")
    out = {"seeds": args.seeds, "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
           "summary": summary, "runs": runs}
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
