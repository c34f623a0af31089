#!/usr/bin/env python
"""Open-set protocol: CIFAR-10 with 6 known and 4 unknown classes, DNC against its linear twin.

    python benchmarks/openset.py ARCHIVE --work-dir DIR [--config CFG] [--linear-config CFG]
        [--seeds 0 1 2] [--known 0,1,2,4,5,9] [--per-class N] [--val-per-class 500] [--device cpu|cuda]
        [key=value ...]

``ARCHIVE`` is the CIFAR-10 JPEG archive (``train/<class>/<n>.jpg``, 5,000 images per class). The
last ``--val-per-class`` images of each class are held out (the split of ``data.holdout=5000``);
the known classes' other images (the first ``--per-class`` of them, all by default) are the training
set, their held-out images the validation set, and the unknown classes' held-out images the open set.
The default split is the first of the five standard CIFAR-10 6/4 splits of the open-set literature
(known classes 0, 1, 2, 4, 5, 9: airplane, automobile, bird, deer, dog, truck); ``--known`` takes
others, by index or name.

For every seed and head the script runs the real commands: ``dnc train CONFIG`` on the known classes,
then ``dnc test CONFIG CKPT --ood UNKNOWN``, and gathers closed-set top-1 and, per score (DNC: max
sub-centroid cosine, max softmax, energy; linear: max softmax, energy), AUROC and FPR at 95% TPR.
It writes ``DIR/openset.json`` and prints a Markdown table (mean +- std over seeds). The configs
default to the CIFAR-10 JPEG recipes; any config works, with ``key=value`` overrides for both heads
(e.g. a tiny CPU run: ``model.backbone=tiny_cnn train.epochs=1 data.batch_size=32``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROOT = Path(__file__).resolve().parents[1]


def class_names(spec: str) -> list:
    """``"0,1,cat"`` -> CIFAR-10 class names (indices or names)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        name = CIFAR10[int(item)] if item.isdigit() else item
        if name not in CIFAR10:
            raise SystemExit(f"error: unknown CIFAR-10 class {item!r}")
        out.append(name)
    return out


def extract_subset(archive: Path, dest: Path, layout: dict, per_class: int, val_per_class: int) -> dict:
    """Write the images of ``archive`` that ``layout`` asks for under ``dest``.

    ``layout`` maps a class name to ``{"train": folder or None, "val": folder or None}``: the class's
    training images (the first ``per_class``, 0 = all) go to ``dest/<train folder>/<class>/``, its
    held-out images (the last ``val_per_class``) to ``dest/<val folder>/<class>/``. Returns the number
    of files per folder. Files already there are kept (the extraction is resumable)."""
    if not archive.is_file():
        raise SystemExit(f"error: {archive}: archive not found")
    counts: dict = {}
    with tarfile.open(archive) as tar:
        members = {}
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 2 and parts[-2] in layout:
                members.setdefault(parts[-2], []).append(m)
        for name, where in layout.items():
            files = sorted(members.get(name, []), key=lambda m: m.name)
            if len(files) <= val_per_class:
                raise SystemExit(f"error: {archive}: class {name} has {len(files)} images, not more than {val_per_class}")
            train, val = files[:-val_per_class], files[-val_per_class:]
            if per_class:
                train = train[:per_class]
            for split, chosen in (("train", train), ("val", val)):
                if where.get(split) is None:
                    continue
                folder = dest / where[split] / name
                folder.mkdir(parents=True, exist_ok=True)
                for m in chosen:
                    target = folder / Path(m.name).name
                    if not target.exists():
                        tmp = target.with_name("." + target.name)
                        tmp.write_bytes(tar.extractfile(m).read())
                        os.replace(tmp, target)
                counts[f"{where[split]}/{name}"] = len(chosen)
    return counts


def run_dnc(*args, log: Path) -> str:
    """Run ``python -m dnc ARGS`` (this checkout's package); its output is appended to ``log`` and returned."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "dnc", *map(str, args)]
    print("$ dnc " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "a") as f:
        f.write("$ dnc " + " ".join(map(str, args)) + "\n" + done.stdout)
    if done.returncode:
        tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: dnc {args[0]} failed (exit {done.returncode}): {tail[0]}; see {log}")
    return done.stdout


def load_run(run_dir: Path) -> tuple:
    """``(cfg, model, checkpoint)`` of a finished run: ``run_dir/last.pt`` loaded as the commands load it,
    the model in evaluation mode."""
    from dnc.engine import load_checkpoint
    from dnc.runconfig import checkpoint_config
    from dnc.tasks import load_trained_model
    ckpt = load_checkpoint(run_dir / "last.pt")
    cfg = checkpoint_config(ckpt, run_dir / "last.pt")
    return cfg, load_trained_model(cfg, ckpt, run_dir / "last.pt").eval(), ckpt


def mean_std(values: list) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def protocol_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the CIFAR-10 protocols (this one and ``class_addition.py``): the archive, the work dir,
    the DNC and linear configs."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--config", default="configs/cifar10_jpeg/effnet-lite0_cpu_dnc.yaml")
    ap.add_argument("--linear-config", default="configs/cifar10_jpeg/effnet-lite0_cpu_linear.yaml")
    return ap


def main(argv=None) -> dict:
    ap = protocol_parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--known", default="0,1,2,4,5,9", help="known classes (indices or names); the others are unknown")
    ap.add_argument("--per-class", type=int, default=0, help="training images per known class (0: all)")
    ap.add_argument("--val-per-class", type=int, default=500, help="held-out images per class")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)

    known = class_names(args.known)
    unknown = [c for c in CIFAR10 if c not in known]
    work = args.work_dir
    data = work / "data"
    layout = {c: {"train": "known/train", "val": "known/val"} for c in known}
    layout.update({c: {"train": None, "val": "unknown"} for c in unknown})
    counts = extract_subset(args.archive, data, layout, args.per_class, args.val_per_class)
    common = [f"data.root={data / 'known'}", "data.dataset=imagefolder", "data.holdout=0",
              f"data.num_classes={len(known)}", *(["train.device=" + args.device] if args.device else []),
              *args.overrides]
    log = work / "commands.log"
    runs = []
    for seed in args.seeds:
        for head, config in (("dnc", args.config), ("linear", args.linear_config)):
            run_dir = work / f"{head}_seed{seed}"
            over = common + [f"train.seed={seed}"]
            run_dnc("train", config, "--work-dir", run_dir, *over, log=log)
            run_dnc("test", config, run_dir / "last.pt", "--ood", data / "unknown", "--out", run_dir / "openset.json",
                    *over, log=log)
            result = json.loads((run_dir / "openset.json").read_text())
            ood = result["ood"][str(data / "unknown")]
            runs.append({"seed": seed, "head": head, "top1": result["top1"], "unknown_images": ood["images"],
                         "scores": {k: v for k, v in ood.items() if k != "images"}})
            print(json.dumps(runs[-1]), flush=True)  # each run as it ends: a cut-off protocol keeps its figures
            summary = {"known": known, "unknown": unknown, "images": counts, "config": args.config,
                       "linear_config": args.linear_config, "overrides": args.overrides, "runs": runs}
            (work / "openset.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = ["| head | score | closed-set top-1 % | AUROC % | FPR at 95% TPR % |", "| --- | --- | --- | --- | --- |"]
    for head in ("dnc", "linear"):
        mine = [r for r in runs if r["head"] == head]
        for kind in mine[0]["scores"]:
            lines.append(f"| {head} | {kind} | {mean_std([r['top1'] for r in mine])} | "
                         f"{mean_std([r['scores'][kind]['auroc'] for r in mine])} | "
                         f"{mean_std([r['scores'][kind]['fpr95'] for r in mine])} |")
    print(f"\nknown: {', '.join(known)}; unknown: {', '.join(unknown)}; seeds {args.seeds}")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
