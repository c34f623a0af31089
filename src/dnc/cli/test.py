"""``dnc test [CONFIG] CHECKPOINT [--split NAME] [--out FILE] [--metrics M ...] [--ood DIR] [--ood-pixels]
[--knn K] [key=value ...]``."""
from __future__ import annotations

import json

from .inputs import add_checkpoint_inputs, split_inputs


def add_parser(sub) -> None:
    p = sub.add_parser("test", help="evaluate a checkpoint (per-class figures; --out for per-sample predictions)",
                       usage="dnc test [-h] [--split NAME] [--out FILE] [--metrics M ...] [CONFIG] CHECKPOINT "
                             "[key=value ...]")
    add_checkpoint_inputs(p, "a checkpoint of dnc train or dnc explain")
    p.add_argument("--split", default="val", metavar="NAME",
                   help="split of the data root to score (default val, with data.holdout the held-out training "
                        "images): test for an image folder's test/ or CIFAR's test batch, CamVid's or Cityscapes' "
                        "test/val, train")
    p.add_argument("--out", help="write metrics and per-sample predictions (.json or .pkl)")
    p.add_argument("--metrics", nargs="+", help="accuracy (classification) or mIoU (segmentation)")
    p.add_argument("--ood", action="append", metavar="DIR",
                   help="a folder of images of no known class (repeatable): AUROC, FPR at 95%% TPR and the threshold "
                        "of each open-set score")
    p.add_argument("--ood-pixels", action="store_true",
                   help="segmentation trained on some classes (data.dataset_kwargs.classes): the same figures per "
                        "pixel, the pixels of the classes left out against the known classes' pixels")
    p.add_argument("--knn", type=int, default=0, metavar="K",
                   help="with --ood or --ood-pixels, also the knn score (Sun et al. 2022): the cosine of the backbone "
                        "(segmentation: decoder) features to the K-th nearest of 20,000 training images (pixels)")
    p.set_defaults(func=run)


def _print_details(cfg, result: dict, classes: list) -> None:
    """Per-class figures (and a small confusion matrix) as a table on stdout."""
    names = classes or [str(i) for i in range(cfg.data.num_classes)]
    width = max(len(n) for n in names)
    fmt = lambda v: "    -" if v is None else f"{v:5.1f}"  # noqa: E731
    if cfg.task == "segmentation":
        print(f"{'class':<{width}}   IoU %  Acc %")
        for n, iou, acc in zip(names, result["IoU"], result["Acc"]):
            print(f"{n:<{width}}   {fmt(iou)}  {fmt(acc)}")
        return
    cm = result["confusion"]
    print(f"{'class':<{width}}  samples  top-1 %")
    for n, row, acc in zip(names, cm, result["per_class_accuracy"]):
        print(f"{n:<{width}}  {sum(row):7d}  {fmt(acc)}")
    if len(names) <= 20:
        cell = max(5, max(len(str(v)) for row in cm for v in row) + 1)
        print("confusion matrix (rows: label, columns: prediction, in the order above)")
        for n, row in zip(names, cm):
            print(f"{n:<{width}} " + "".join(f"{v:>{cell}d}" for v in row))


def run(args) -> dict:
    from ..runs import test
    config, checkpoint, overrides = split_inputs(args, "test")
    cfg, result, classes, info = test(config, checkpoint, overrides, args.split, args.metrics, args.ood, args.out,
                                       args.ood_pixels, args.knn)
    if info.is_main:
        _print_details(cfg, result, classes)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
    return result
