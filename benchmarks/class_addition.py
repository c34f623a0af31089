#!/usr/bin/env python
"""Class-addition protocol: CIFAR-10 trained on 8 classes, the other 2 added from 1/5/20/100/all images.

    python benchmarks/class_addition.py ARCHIVE --work-dir DIR [--config CFG] [--linear-config CFG]
        [--new 8,9] [--shots 1 5 20 100 all] [--seed 0] [--per-class N] [--val-per-class 500]
        [--early-iters N] [--device cpu|cuda] [key=value ...]

The data come from the CIFAR-10 JPEG archive as in ``openset.py`` (the last ``--val-per-class``
images of each class held out). Steps, with the real commands:

1. ``dnc train CONFIG`` (DNC) and ``dnc train LINEAR_CONFIG`` on the 8 old classes;
2. for every shot count n: ``dnc extend CONFIG CKPT --add NEW=<first n training images> ... --val``,
   then ``dnc test`` of the extended model on the held-out images of all 10 classes: top-1 on old
   and on new classes (10-way predictions);
3. the baseline: a linear probe on the frozen features of the linear twin, its 10 rows (the old
   ones started from the trained classifier) retrained with a class-balanced cross-entropy on the
   old classes' training images and the same n images of each new class;
4. with ``--early-iters N``: the same addition on a DNC model trained only N iterations (an
   under-trained embedding), which shows the collapse of the old classes and the cosines behind it
   (``dnc extend --val`` prints them: old images' mean cosine to their own class and to the new ones);
5. with ``--refit``: the same additions with ``dnc extend --refit-old`` (old classes re-fitted on the
   current embedding too), on the trained and on the under-trained model.

Writes ``DIR/class_addition.json`` and prints a Markdown table.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import common  # noqa: E402,F401  (this checkout's dnc first on the path)
from openset import CIFAR10, class_names, extract_subset, protocol_parser, run_dnc  # noqa: E402

_EXTEND_LINE = re.compile(r"top-1 ([\d.]+)% before, ([\d.]+)% after; ([\d.]+)% now predicted as a new class; "
                          r"mean cosine to their own class ([-\d.]+), to the nearest new class ([-\d.]+)")


def old_new_accuracy(result_file: Path, num_old: int) -> dict:
    preds = json.loads(result_file.read_text())["predictions"]
    out = {}
    for name, keep in (("old", lambda y: y < num_old), ("new", lambda y: y >= num_old), ("all", lambda y: True)):
        sel = [p for p in preds if keep(p["label"])]
        out[name] = round(100.0 * sum(p["pred"] == p["label"] for p in sel) / max(len(sel), 1), 4)
    return out


def extend_and_test(config, ckpt, out_dir: Path, new: list, shot_dir: Path, over: list, all_root: Path, log: Path,
                    refit: bool = False) -> dict:
    out = out_dir / "extended.pt"
    text = run_dnc("extend", config, ckpt, *[a for n in new for a in ("--add", f"{n}={shot_dir / n}")], "--val",
                   *(["--refit-old"] if refit else []), "--out", out, *over, log=log)
    m = _EXTEND_LINE.search(text)
    diag = dict(zip(("old_top1_before", "old_top1_after", "old_taken_by_new", "cos_own", "cos_new"),
                    map(float, m.groups()))) if m else {}
    # dnc test on all classes: the extended config, its data.root pointed at the 10-class folders
    run_dnc("test", out.with_suffix(".yaml"), out, "--out", out_dir / "test.json", f"data.root={all_root}",
            *[o for o in over if not o.startswith(("data.root=", "data.num_classes="))], log=log)
    return {**old_new_accuracy(out_dir / "test.json", 10 - len(new)), "extend": diag}


@torch.no_grad()
def _features(model, folder_dataset, device, batch: int = 256) -> tuple:
    from torch.utils.data import DataLoader

    from dnc.data.classification import collate
    feats, labels = [], []
    for images, y, _ in DataLoader(folder_dataset, batch_size=batch, collate_fn=collate):
        feats.append(model.features(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(config: str, ckpt: Path, overrides: list, old_root: Path, shot_dir: Path, val_root: Path,
                 old: list, new: list, device: str, steps: int = 200) -> dict:
    """The baseline: the linear twin's frozen features, a 10-way linear layer retrained (old rows from
    the trained classifier) on the old classes' training images and the shot images, class-balanced."""
    from dnc.config import load_config
    from dnc.data.classification import ImageFolder
    from dnc.engine import load_checkpoint
    from dnc.tasks import cls_transform, load_trained_model

    cfg = load_config(config, tuple(overrides))
    dev = torch.device("cuda" if device == "cuda" or (device in (None, "auto") and torch.cuda.is_available()) else "cpu")
    model = load_trained_model(cfg, load_checkpoint(ckpt), ckpt).to(dev).eval()
    tf = cls_transform(cfg, False)  # the evaluation transform, normalised as the weights expect
    classes = old + new
    x_old, y_old = _features(model, ImageFolder(old_root / "train", tf, classes=old), dev)
    x_new, y_new = _features(model, ImageFolder(shot_dir, tf, classes=new), dev)
    x_val, y_val = _features(model, ImageFolder(val_root, tf, classes=classes), dev)
    x, y = torch.cat([x_old, x_new]), torch.cat([y_old, y_new + len(old)])
    fc = model.head.fc
    weight = torch.cat([fc.weight.detach().cpu(), torch.zeros(len(new), fc.in_features)]).requires_grad_()
    bias = torch.cat([fc.bias.detach().cpu(), torch.zeros(len(new))]).requires_grad_()
    counts = torch.bincount(y, minlength=len(classes)).float()
    class_weight = counts.sum() / (len(classes) * counts.clamp_min(1))
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.t() + bias, y, weight=class_weight) + 1e-4 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    pred = (x_val @ weight.t() + bias).argmax(1)
    out = {}
    for name, keep in (("old", y_val < len(old)), ("new", y_val >= len(old)), ("all", torch.ones_like(y_val, dtype=torch.bool))):
        out[name] = round(100.0 * float((pred[keep] == y_val[keep]).float().mean()), 4)
    return out


def main(argv=None) -> dict:
    ap = protocol_parser(__doc__)
    ap.add_argument("--new", default="8,9", help="the 2 classes added later (indices or names)")
    ap.add_argument("--shots", nargs="+", default=["1", "5", "20", "100", "all"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=0, help="training images per class (0: all)")
    ap.add_argument("--val-per-class", type=int, default=500)
    ap.add_argument("--early-iters", type=int, default=0, help="also add to a DNC model trained only this many iterations")
    ap.add_argument("--refit", action="store_true", help="also add with dnc extend --refit-old")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)

    new = class_names(args.new)
    old = [c for c in CIFAR10 if c not in new]
    work, data = args.work_dir, args.work_dir / "data"
    layout = {c: {"train": "base/train", "val": "base/val"} for c in old}
    layout.update({c: {"train": "newpool", "val": "newval"} for c in new})
    counts = extract_subset(args.archive, data, layout, args.per_class, args.val_per_class)
    # all ten classes: old folders and new ones side by side (links), for dnc test of the extended model
    for split, src in (("train", {"base/train": old, "newpool": new}), ("val", {"base/val": old, "newval": new})):
        for folder, names in src.items():
            for n in names:
                link = data / "all" / split / n
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(data / folder / n, target_is_directory=True)
    pool = {n: sorted((data / "newpool" / n).iterdir()) for n in new}
    shots = {}
    for s in args.shots:
        k = min(len(p) for p in pool.values()) if s == "all" else int(s)
        shot_dir = data / f"shots_{s}"
        for n in new:
            (shot_dir / n).mkdir(parents=True, exist_ok=True)
            for f in pool[n][:k]:
                if not (shot_dir / n / f.name).exists():
                    (shot_dir / n / f.name).symlink_to(f)
        shots[s] = (k, shot_dir)

    device = ["train.device=" + args.device] if args.device else []
    over = [f"data.root={data / 'base'}", "data.dataset=imagefolder", "data.holdout=0", f"data.num_classes={len(old)}",
            f"train.seed={args.seed}", *device, *args.overrides]
    log = work / "commands.log"
    models = {"dnc": (args.config, work / "dnc_base"), "linear": (args.linear_config, work / "linear_base")}
    if args.early_iters:
        models["dnc_early"] = (args.config, work / "dnc_early")
    base = {}
    for name, (config, run_dir) in models.items():
        extra = ["train.epochs=0", f"train.iters={args.early_iters}", f"train.eval_interval={args.early_iters}"] \
            if name == "dnc_early" else []
        run_dnc("train", config, "--work-dir", run_dir, *over, *extra, log=log)
        base[name] = json.loads((run_dir / "metrics.json").read_text())["top1"]

    rows = []
    for s, (k, shot_dir) in shots.items():
        row = {"shots": s, "images_per_new_class": k}
        for name in [m for m in models if m != "linear"]:
            for refit in (False, True) if args.refit else (False,):
                key = name + ("_refit" if refit else "")
                row[key] = extend_and_test(args.config, models[name][1] / "last.pt", work / f"{key}_add_{s}", new,
                                           shot_dir, over, data / "all", log, refit)
        row["linear_probe"] = linear_probe(args.linear_config, models["linear"][1] / "last.pt", over, data / "base",
                                           shot_dir, data / "all" / "val", old, new, args.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"old": old, "new": new, "images": counts, "base_top1_old_classes": base, "rows": rows,
               "config": args.config, "linear_config": args.linear_config, "overrides": args.overrides}
    (work / "class_addition.json").write_text(json.dumps(summary, indent=2) + "\n")

    heads = [k for k in rows[0] if k not in ("shots", "images_per_new_class", "linear_probe")] + ["linear_probe"]
    print(f"\nold: {', '.join(old)} (8-way top-1 before: " + ", ".join(f"{k} {v:.2f}%" for k, v in base.items())
          + f"); new: {', '.join(new)}")
    print("| images per new class | " + " | ".join(f"{h} old / new / all %" for h in heads) + " |")
    print("| --- |" + " --- |" * len(heads))
    for r in rows:
        print(f"| {r['shots']} ({r['images_per_new_class']}) | " + " | ".join(
            f"{r[h]['old']:.2f} / {r[h]['new']:.2f} / {r[h]['all']:.2f}" for h in heads) + " |")
    if args.early_iters:
        print("\nunder-trained DNC (old-class images' mean cosine to their own class / to the nearest new class):")
        for r in rows:
            e = r["dnc_early"]["extend"]
            if e:
                print(f"  {r['shots']}: old top-1 {e['old_top1_before']:.2f}% -> {e['old_top1_after']:.2f}%, "
                      f"{e['old_taken_by_new']:.2f}% taken by the new classes; cosine own {e['cos_own']:.3f}, "
                      f"new {e['cos_new']:.3f}")
    return summary


if __name__ == "__main__":
    main()
