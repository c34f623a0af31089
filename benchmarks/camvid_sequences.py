#!/usr/bin/env python
"""Issue 20, segmentation across scenes: CamVid leave-one-sequence-out, DNC against its linear twin.

    python benchmarks/camvid_sequences.py TRAIN_ARCHIVE VAL_ARCHIVE --work-dir W [--seeds 0 1 2]
        [--folds 0001TP 0006R0 0016E5] [--jobs 2] [--out JSON] [key=value ...]

CamVid's shipped train and val images (``camvid-{train,val}-240x180.tar.gz``) come from three video
sequences: 0001TP (62 images), 0006R0 (101) and 0016E5 (305; the official val split is all 0016E5).
Each fold holds one sequence out as ``test`` and trains on the other two, by the shipped CPU recipes
as shipped (``configs/segmentation/camvid/fcn_effnet-lite0_cpu_camvid_{dnc,linear}.yaml``) through
``dnc train``, then scores ``last.pt`` once on the held-out sequence with ``dnc test --split test``.
Nothing is tuned here: ``val`` is the last 8 training images (a training-fit check, also trained on),
evaluated only at the end (``train.eval_interval`` = the recipe's iterations).

Layout: ``W/data/raw`` (the archives, extracted once) and ``W/data/<fold>/{train,val,test}/{images,labels}``
(links). Runs go to ``W/<fold>/<head>_seed<S>``; the DNC and linear twins of a fold and seed train side
by side (``--jobs 2``, ``train.threads=1`` each). Finished runs are skipped (the protocol resumes).
Output: per fold and head the mIoU over seeds, DNC minus linear per fold and over all folds, and the
per-class IoU difference (which classes carry the margin); ``--out`` holds every figure and command.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extract_once, write_json  # noqa: E402  (also puts this checkout's dnc first on the path)
from openset import run_dnc  # noqa: E402

from dnc.data.segmentation import CAMVID_CLASSES as CLASSES  # noqa: E402

CONFIG = "configs/segmentation/camvid/fcn_effnet-lite0_cpu_camvid_{head}.yaml"
SEQUENCES = ("0001TP", "0006R0", "0016E5")
ITERS, VAL_IMAGES = 300, 8


def lay_out(archives: list, work: Path, held_out: str) -> Path:
    """``W/data/<held_out>``: links to the held-out sequence's images as ``test``, the others' as ``train``."""
    raw = extract_once(archives, work / "data" / "raw")
    root = (work / "data" / held_out).resolve()
    if (root / "val").is_dir():
        return root
    images = sorted(f for f in raw.glob("*/images/*.jpg"))
    if not any(f.name.startswith(held_out) for f in images):
        raise SystemExit(f"error: no image of sequence {held_out!r} in {raw}")
    pool = [f for f in images if not f.name.startswith(held_out)]
    splits = {"test": [f for f in images if f.name.startswith(held_out)], "train": pool, "val": pool[-VAL_IMAGES:]}
    for split, files in splits.items():
        for f in files:
            for sub, src in (("images", f), ("labels", f.parent.parent / "labels" / (f.stem + ".png"))):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                (root / split / sub / src.name).symlink_to(src)
    return root


def train_and_test(root: Path, run_dir: Path, head: str, seed: int, overrides: list, log: Path) -> dict:
    """Train one run (unless finished) and score it on the held-out sequence; its record."""
    result = run_dir / "test.json"
    config = CONFIG.format(head=head)
    common = [f"data.root={root}", f"train.seed={seed}", "train.threads=1", "data.num_workers=1", *overrides]
    train = ["train", config, "--work-dir", run_dir, f"train.eval_interval={ITERS}", *common]
    test = ["test", config, run_dir / "last.pt", "--split", "test", "--out", result, *common]
    seconds = None
    if not result.is_file():
        if not (run_dir / "metrics.json").is_file():  # written when the training has finished
            start = time.time()
            run_dnc(*train, log=log)
            seconds = round(time.time() - start)
        run_dnc(*test, log=log)
    scores = json.loads(result.read_text())
    return {"mIoU": scores["mIoU"], "IoU": scores["IoU"], "train_seconds": seconds,
            "commands": ["dnc " + " ".join(map(str, c)) for c in (train, test)]}


def _mean_sd(values: list) -> tuple:
    """(mean, sd) rounded to 2 places of the finite values (NaN, NaN where there are none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return (float("nan"), float("nan"))
    return (round(statistics.mean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0)


def _class_diffs(pairs: list) -> dict:
    """Per class: the DNC-minus-linear IoU of each (dnc, linear) pair where both are defined (a class
    absent from a held-out sequence has no IoU)."""
    return {c: [a - b for a, b in ((d["IoU"][i], lin["IoU"][i]) for d, lin in pairs)
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
            for i, c in enumerate(CLASSES)}


def summarise(runs: dict, folds: list, seeds: list) -> dict:
    """Per fold and over all folds: mIoU mean ± sd of each head, of the seed-paired DNC-minus-linear
    difference, and of the per-class IoU difference (which classes carry the margin)."""
    def block(pairs: list) -> dict:
        return {"dnc": _mean_sd([d["mIoU"] for d, _ in pairs]),
                "linear": _mean_sd([lin["mIoU"] for _, lin in pairs]),
                "dnc_minus_linear": _mean_sd([d["mIoU"] - lin["mIoU"] for d, lin in pairs]), "pairs": len(pairs),
                "IoU_dnc_minus_linear": {c: _mean_sd(v) for c, v in _class_diffs(pairs).items()}}
    by_fold = {f: [(runs[f"{f}/dnc_seed{s}"], runs[f"{f}/linear_seed{s}"]) for s in seeds
                   if f"{f}/dnc_seed{s}" in runs and f"{f}/linear_seed{s}" in runs] for f in folds}
    out = {f: block(pairs) for f, pairs in by_fold.items()}
    out["all"] = block([p for pairs in by_fold.values() for p in pairs])
    return out


def table(summary: dict) -> str:
    """The summary as two markdown tables: mIoU per fold, and the per-class IoU difference."""
    rows = ["| held-out sequence | linear mIoU | DNC mIoU | DNC - linear (paired) | pairs |", "| --- | --- | --- | --- | --- |"]
    for fold, r in summary.items():
        cells = [f"{r[k][0]:.2f} ± {r[k][1]:.2f}" for k in ("linear", "dnc", "dnc_minus_linear")]
        rows.append(f"| {fold} | " + " | ".join(cells) + f" | {r['pairs']} |")
    rows += ["", "| class | " + " | ".join(summary) + " |", "| --- |" + " --- |" * len(summary)]
    for c in CLASSES:
        rows.append(f"| {c} | " + " | ".join(f"{r['IoU_dnc_minus_linear'][c][0]:+.2f}" for r in summary.values()) + " |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archives", type=Path, nargs=2, metavar="ARCHIVE", help="camvid-train and camvid-val archives")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", nargs="+", default=list(SEQUENCES), help="sequences to hold out, one at a time")
    ap.add_argument("--jobs", type=int, default=2, help="runs at the same time (each with train.threads=1)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log = args.work_dir / "commands.log"
    runs = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for seed in args.seeds:
            for fold in args.folds:
                root = lay_out(args.archives, args.work_dir, fold)
                jobs = {h: pool.submit(train_and_test, root, args.work_dir / fold / f"{h}_seed{seed}", h, seed,
                                       args.overrides, log) for h in ("dnc", "linear")}
                for h, job in jobs.items():
                    runs[f"{fold}/{h}_seed{seed}"] = r = job.result()
                    print(f"{fold} {h} seed {seed}: mIoU {r['mIoU']:.2f} (train {r['train_seconds']} s)", flush=True)
                if args.out:
                    write_json(args.out, {"seeds": args.seeds, "overrides": args.overrides, "runs": runs})
    summary = summarise(runs, args.folds, args.seeds)
    print(table(summary))
    out = {"seeds": args.seeds, "overrides": args.overrides, "summary": summary, "runs": runs}
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
