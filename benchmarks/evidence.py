"""Evidence: DNC against its linear twin with an ImageNet-pretrained backbone, several seeds, held-out test.

    python benchmarks/evidence.py --data DIR [--seeds 0 1 2] [--recipes cifar camvid] [--out DIR]
                                  [--device auto|cpu|cuda] [--set key=value ...]

``DIR`` is laid out by ``benchmarks/evidence_data.py`` (``DIR/cifar10`` and ``DIR/camvid``, each with a
``test`` split that no recipe trains or tunes on). For every recipe, seed and head this runs the real
commands, as a user would:

    dnc train CONFIG data.root=... train.seed=S --work-dir OUT/<recipe>/<head>/seed<S>
    dnc test  CONFIG OUT/.../last.pt --split test --out OUT/.../test.json
    dnc explain CONFIG OUT/.../last.pt --out OUT/.../explain          (DNC classifiers)
    dnc test  CONFIG OUT/.../explain/anchored.pt --split test           (the anchored model)

and prints one table (mean, standard deviation and per-seed figures, wall time of each training run);
``OUT/evidence.json`` holds every figure and the exact commands.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPES = {
    "cifar": {"data": "cifar10", "metric": "top1",
              "config": "configs/cifar10_jpeg/effnet-lite0_cpu_{head}.yaml"},
    "camvid": {"data": "camvid", "metric": "mIoU",
               "config": "configs/segmentation/camvid/fcn_effnet-lite0_cpu_camvid_{head}.yaml"},
}


def _dnc(args: list, log: Path) -> float:
    """Run ``python -m dnc ARGS`` (output to ``log``); returns the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ dnc " + " ".join(args) + "\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "dnc", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"evidence: dnc {args[0]} failed (see {log}): {tail[0] if tail else ''}")
    return time.perf_counter() - start


def run(recipe: str, head: str, seed: int, data: Path, out: Path, device: str, extra: list) -> dict:
    spec = RECIPES[recipe]
    config = spec["config"].format(head=head)
    work = out / recipe / head / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    common = [f"data.root={data / spec['data']}", f"train.seed={seed}", f"train.device={device}", *extra]
    train = ["train", config, "--work-dir", str(work), *common]
    seconds = _dnc(train, log)
    test = ["test", config, str(work / "last.pt"), "--split", "test", "--out", str(work / "test.json"), *common]
    _dnc(test, log)
    record = {"recipe": recipe, "head": head, "seed": seed, "train_seconds": round(seconds, 1),
              "val": json.loads((work / "metrics.json").read_text()).get(spec["metric"]),
              "test": json.loads((work / "test.json").read_text())[spec["metric"]],
              "commands": ["dnc " + " ".join(train), "dnc " + " ".join(test)]}
    if head == "dnc" and recipe == "cifar":
        explain = ["explain", config, str(work / "last.pt"), "--out", str(work / "explain"), *common]
        _dnc(explain, log)
        anchored = ["test", config, str(work / "explain" / "anchored.pt"), "--split", "test",
                    "--out", str(work / "test_anchored.json"), *common]
        _dnc(anchored, log)
        record["test_anchored"] = json.loads((work / "test_anchored.json").read_text())[spec["metric"]]
        record["commands"] += ["dnc " + " ".join(explain), "dnc " + " ".join(anchored)]
    return record


def _summary(values: list) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {sd:4.2f}  [" + ", ".join(f"{v:.2f}" for v in values) + "]"


def table(records: list) -> str:
    lines = [f"{'recipe':8} {'model':14} {'test: mean ± sd  [per seed]':44} {'val (mean)':>10} {'train s/run':>12}"]
    for recipe in RECIPES:
        for head, key, label in (("dnc", "test", "DNC"), ("linear", "test", "linear"),
                                 ("dnc", "test_anchored", "DNC anchored")):
            rows = [r for r in records if r["recipe"] == recipe and r["head"] == head and key in r]
            if not rows:
                continue
            val = [r["val"] for r in rows if r.get("val") is not None]
            secs = [r["train_seconds"] for r in rows]
            lines.append(f"{recipe:8} {label:14} {_summary([r[key] for r in rows]):44} "
                         f"{statistics.mean(val) if val and key == 'test' else float('nan'):10.2f} "
                         f"{statistics.mean(secs):12.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder laid out by benchmarks/evidence_data.py")
    p.add_argument("--out", type=Path, default=Path("work_dirs/evidence"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--heads", nargs="+", default=["dnc", "linear"], choices=["dnc", "linear"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--parallel-twins", action="store_true",
                   help="train the DNC and linear twins of a seed at the same time (a GPU with room for both; "
                        "each twin then shares the machine with the other, so their wall times stay comparable)")
    p.add_argument("--set", dest="extra", nargs="*", default=[], metavar="key=value",
                   help="overrides applied to every run (e.g. train.threads=2)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = []
    with ThreadPoolExecutor(len(a.heads) if a.parallel_twins else 1) as pool:
        for recipe in a.recipes:
            for seed in a.seeds:  # twins back to back (or together), so that both see the same machine load
                for r in pool.map(lambda head: run(recipe, head, seed, a.data, a.out, a.device, a.extra), a.heads):
                    records.append(dict(r, parallel_twins=a.parallel_twins))
                    print(f"{recipe} {r['head']} seed {seed}: test {r['test']:.2f}"
                          + (f", anchored {r['test_anchored']:.2f}" if "test_anchored" in r else "")
                          + f", val {r['val']}, {r['train_seconds']:.0f} s", flush=True)
                (a.out / "evidence.json").write_text(json.dumps(records, indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
