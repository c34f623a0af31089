"""Ablation of the DNC head's options on a recipe's VALIDATION split (never the test split).

    python benchmarks/ablation.py --recipe cifar|camvid --data DIR [--only NAME ...] [--seeds S ...]
                                  [--jobs N] [--out DIR] [--set key=value ...]

``DIR`` is laid out by ``benchmarks/evidence_data.py``. Each variant is the recipe's DNC config with a
few overrides (the linear twin is the reference row); the figure is the final validation metric of
``dnc train`` (``metrics.json``), so the test split stays untouched for ``benchmarks/evidence.py``.
The variants are relative to the recipe's current defaults (the 2026-11-27 H100 results in
``benchmarks/results/`` were made when the CamVid recipe still had momentum 0.99, since changed to 0.9).
Results are appended to ``OUT/<recipe>.jsonl`` (one line per run, with its command). ``--jobs N`` runs N
trainings at once (on a GPU, small runs leave it mostly idle; not for timing).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evidence import RECIPES

VARIANTS = {
    "cifar": {
        "linear": ["model.head=linear"],
        "dnc": [],
        "init=random": ["model.dnc.init=random"],
        "momentum=0.9": ["model.dnc.momentum=0.9"],
        "momentum=0.999": ["model.dnc.momentum=0.999"],
        "calibration=layernorm": ["model.dnc.calibration=layernorm"],
        "temperature=0.05": ["model.dnc.temperature=0.05"],
        "correct_only=false": ["model.dnc.correct_only=false"],
        "feat_norm=false": ["model.dnc.feat_norm=false"],
        "K=1": ["model.dnc.num_subcentroids=1"],
        "memory 1024 / 8 steps": ["model.dnc.memory_size=1024", "model.dnc.update_interval=8"],
    },
    "camvid": {
        "linear": ["model.head=linear"],
        "dnc": [],
        "init=random": ["model.dnc.init=random"],
        "momentum=0.99": ["model.dnc.momentum=0.99"],
        "momentum=0.999": ["model.dnc.momentum=0.999"],
        "no contrast/compact": ["model.dnc.contrast_weight=0.0", "model.dnc.compact_weight=0.0"],
        "calibration=layernorm": ["model.dnc.calibration=layernorm"],
        "K=4": ["model.dnc.num_subcentroids=4"],
    },
}


def run(recipe: str, name: str, overrides: list, seed: int, data: Path, out: Path, extra: list) -> dict:
    spec = RECIPES[recipe]
    work = out / recipe / name.replace(" ", "_").replace("/", "-") / f"seed{seed}"
    args = ["train", spec["config"].format(head="dnc"), "--work-dir", str(work), f"data.root={data / spec['data']}",
            f"train.seed={seed}", *overrides, *extra]
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "train.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "dnc", *args], stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    metrics = json.loads((work / "metrics.json").read_text()) if rc == 0 else {}
    evals = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()] if rc == 0 else []
    record = {"variant": name, "seed": seed, "val": metrics.get(spec["metric"]), "rc": rc,
              "val_per_eval": [r.get(spec["metric"]) for r in evals if r.get("mode") == "val"],
              "seconds": round(seconds, 1), "command": "dnc " + " ".join(args)}
    with open(out / f"{recipe}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{recipe} {name:24} seed {seed}: val {record['val']}  per eval {record['val_per_eval']}  "
          f"{seconds:.0f} s{'' if rc == 0 else f'  FAILED (exit {rc}, see {work}/train.log)'}", flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=list(VARIANTS), required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("work_dirs/ablation"))
    p.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--set", dest="extra", nargs="*", default=[], metavar="key=value")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    todo = [(name, ov, seed) for seed in a.seeds for name, ov in VARIANTS[a.recipe].items()
            if not a.only or name in a.only]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda t: run(a.recipe, *t, a.data, a.out, a.extra), todo))


if __name__ == "__main__":
    main()
