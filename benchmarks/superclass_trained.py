#!/usr/bin/env python
"""Issue 20, where sub-centroids pay (trained): CIFAR-10 as 2 superclasses, DNC K=1/4/8 against linear.

    python benchmarks/superclass_trained.py ARCHIVE --work-dir W [--seeds 0 1 2] [--heads K1 K4 K8 linear]
        [--threads 2] [--out JSON] [key=value ...]

Vehicles (airplane, automobile, ship, truck) against animals (bird, cat, deer, dog, frog, horse): each
superclass is a class with several modes, the case sub-centroids are meant for. Every head is trained
by the CIFAR CPU recipe (``configs/cifar10_jpeg/effnet-lite0_cpu_{dnc,linear}.yaml``, ImageNet
Lite0) through ``dnc train``, with ``key=value`` overrides for all heads (the issue-20 runs use
``data.train_subset=3000 train.epochs=2``). DNC heads differ only in ``model.dnc.num_subcentroids``.

Data (``evidence_data.py``'s carving, nothing else): ``W/data/super2/{train,val}/<superclass>/<fine
class>/`` are links to the files of each fine class: ``train`` its first 4,000 files (the recipe's
class-balanced ``data.train_subset`` draws from them, so vehicles and animals get equal shares),
``val`` the last 300 of its 500 held-out files (validation during training and the choice of K);
the carved test split (500 per class) is scored once per model at the end.

Per seed and head: validation top-1 (the run's ``metrics.json``), 2-way test top-1, per fine class
test top-1, and for DNC heads the purity of each sub-centroid's 20 nearest training images in the
head's embedding against the fine labels (what ``dnc explain`` shows), with the number of fine classes
that lead a sub-centroid. Finished runs are skipped (the protocol resumes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402  (also puts this checkout's dnc first on the path)
from evidence_data import cifar as carve_cifar  # noqa: E402
from openset import CIFAR10, load_run, run_dnc  # noqa: E402
from superclass import VEHICLES, purity  # noqa: E402

CONFIGS = {"dnc": "configs/cifar10_jpeg/effnet-lite0_cpu_dnc.yaml",
           "linear": "configs/cifar10_jpeg/effnet-lite0_cpu_linear.yaml"}
HEADS = {"K1": ("dnc", ["model.dnc.num_subcentroids=1"]), "K4": ("dnc", ["model.dnc.num_subcentroids=4"]),
         "K8": ("dnc", ["model.dnc.num_subcentroids=8"]), "linear": ("linear", [])}
POOL, VAL = 4000, 300


def superclass(fine: str) -> str:
    return "vehicles" if fine in VEHICLES else "animals"


def lay_out(archive: Path, work: Path) -> Path:
    """``W/data/super2`` (links to the carved files, see the module docstring); the carved root is made once."""
    carved = work / "data" / "cifar10"
    root = carved.resolve() if (carved / "test").is_dir() else carve_cifar(archive, (work / "data").resolve())
    tree = (work / "data" / "super2").resolve()
    for split, part in (("train", slice(None, POOL)), ("val", slice(-VAL, None))):
        for c in CIFAR10:
            folder = tree / split / superclass(c) / c
            if folder.is_dir():
                continue
            folder.mkdir(parents=True)
            for f in sorted((root / "train" / c).iterdir())[part]:
                (folder / f.name).symlink_to(f)
    return tree


@torch.no_grad()
def score(run_dir: Path, test_root: Path, threads: int) -> dict:
    """Test top-1 (2-way and per fine class) and, for a DNC head, sub-centroid purity, of ``run_dir/last.pt``."""
    from torch.utils.data import DataLoader

    from dnc.data.classification import collate
    from dnc.data.images import ImageList
    from dnc.embedding import head_of
    from dnc.tasks import build_cls_split, eval_transform, training_subset
    torch.set_num_threads(threads)
    cfg, model, ckpt = load_run(run_dir)
    classes = ckpt["classes"]
    tf = eval_transform(cfg)
    test = [(f, CIFAR10.index(c)) for c in CIFAR10 for f in sorted((test_root / c).iterdir())]
    preds = torch.cat([model(x).argmax(1) for x, *_ in DataLoader(
        ImageList([str(f) for f, _ in test], tf), batch_size=250, num_workers=1, collate_fn=collate)])
    fine = torch.tensor([y for _, y in test])
    coarse = torch.tensor([classes.index(superclass(CIFAR10[y])) for y in fine.tolist()])
    hit = (preds == coarse).double()
    out = {"test_top1": round(100 * float(hit.mean()), 2),
           "test_top1_per_fine_class": {c: round(100 * float(hit[fine == i].mean()), 1) for i, c in enumerate(CIFAR10)}}
    head = head_of(model)
    if hasattr(head, "centroids"):
        bank = training_subset(cfg, build_cls_split(cfg, "train", tf))
        z = torch.cat([head.embed(model.features(x)).float()
                       for x, *_ in DataLoader(bank, batch_size=250, num_workers=1, collate_fn=collate)])
        bank_fine = torch.tensor([CIFAR10.index(Path(bank.sample_name(i)).parent.name) for i in range(len(bank))])
        share, led = purity(head.centroids.centroids.float(), z, bank_fine)
        out.update(purity=round(100 * share, 1), fine_classes_led=led)
    return out


def summarise(runs: dict, heads: list, seeds: list) -> dict:
    summary = {}
    for h in heads:
        rows = [runs[f"{h}_seed{s}"] for s in seeds if f"{h}_seed{s}" in runs]
        summary[h] = {m: (round(statistics.mean(r[m] for r in rows), 2),
                          round(statistics.stdev(r[m] for r in rows), 2) if len(rows) > 1 else 0.0)
                      for m in ("val_top1", "test_top1", "purity", "fine_classes_led") if m in rows[0]}
        summary[h]["seeds"] = len(rows)
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    tree = lay_out(args.archive, args.work_dir)
    test_root = (args.work_dir / "data" / "cifar10" / "test").resolve()
    common = [f"data.root={tree}", "data.holdout=0", "data.num_classes=2", f"train.threads={args.threads}",
              "data.num_workers=1", *args.overrides]
    runs = {}
    for seed in args.seeds:
        for h in args.heads:
            config, extra = HEADS[h]
            run_dir = args.work_dir / f"super2_{h}_seed{seed}"
            result = run_dir / "superclass.json"
            if not result.is_file():
                if not (run_dir / "metrics.json").is_file():  # written when the training has finished
                    t = time.time()
                    run_dnc("train", CONFIGS[config], "--work-dir", run_dir, *common, f"train.seed={seed}", *extra,
                            log=args.work_dir / "commands.log")
                    print(f"  trained in {time.time() - t:.0f} s", flush=True)
                val = json.loads((run_dir / "metrics.json").read_text())["top1"]
                write_json(result, {"val_top1": round(val, 2), **score(run_dir, test_root, args.threads)})
            runs[f"{h}_seed{seed}"] = json.loads(result.read_text())
            print(f"{h} seed {seed}: {json.dumps(runs[f'{h}_seed{seed}'])}", flush=True)
    summary = summarise(runs, args.heads, args.seeds)
    print("| head | val top-1 % | 2-way test top-1 % | purity % | fine classes leading a sub-centroid |")
    print("| --- | --- | --- | --- | --- |")
    for h, r in summary.items():
        cells = [f"{r[m][0]:.2f} ± {r[m][1]:.2f}" if m in r else "" for m in ("val_top1", "test_top1", "purity", "fine_classes_led")]
        print(f"| {h} | " + " | ".join(cells) + " |")
    out = {"seeds": args.seeds, "overrides": args.overrides, "summary": summary, "runs": runs}
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
