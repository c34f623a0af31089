"""DNC design choices on the built-in digits (CPU): initialisation, calibration, momentum, memory.

    python benchmarks/digits_ablation.py [--seeds 0 1 2] [--out digits_ablation.json]

Every variant is the demo recipe (tiny CNN, 15 epochs) with one change, trained through `dnc train`;
accuracy is top-1 on the 360 held-out digits. Prints a Markdown table (mean and min/max over seeds,
wall time per run).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402

from dnc.cli import main  # noqa: E402
from dnc.config import PACKAGE_CONFIGS  # noqa: E402

DEMO = PACKAGE_CONFIGS / "demo"
VARIANTS = {
    "linear softmax": (DEMO / "digits_linear.yaml", []),
    "DNC (demo: k-means++ init, momentum 0.9)": (DEMO / "digits_dnc.yaml", []),
    "DNC, random init": (DEMO / "digits_dnc.yaml", ["model.dnc.init=random"]),
    "DNC, LayerNorm calibration": (DEMO / "digits_dnc.yaml", ["model.dnc.calibration=layernorm"]),
    "DNC, memory 256 / every 4 steps": (DEMO / "digits_dnc.yaml", ["model.dnc.memory_size=256", "model.dnc.update_interval=4"]),
    "DNC, random init, momentum 0.999 (barely moves)": (DEMO / "digits_dnc.yaml", ["model.dnc.init=random", "model.dnc.momentum=0.999"]),
    "DNC, all samples (not only correct)": (DEMO / "digits_dnc.yaml", ["model.dnc.correct_only=false"]),
}


def run(config: Path, overrides: list, seed: int) -> tuple:
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        with redirect_stdout(StringIO()):
            code = main(["train", str(config), "--work-dir", work, f"train.seed={seed}", *overrides])
        if code:
            sys.exit(f"run failed: {config} {overrides}")
        seconds = time.perf_counter() - start
        metrics = json.loads((Path(work) / "metrics.json").read_text())
        cos = [json.loads(line).get("centroid_cos") for line in open(Path(work) / "log.jsonl")]
        cos = [c for c in cos if c is not None]
    return metrics["top1"], seconds, (cos[-1] if cos else None)


def main_() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = {}
    print("| variant | top-1 mean | min - max | final centroid_cos | s per run |\n| --- | --- | --- | --- | --- |")
    for name, (config, overrides) in VARIANTS.items():
        results = [run(config, overrides, s) for s in args.seeds]
        accs = [r[0] for r in results]
        cos = [r[2] for r in results if r[2] is not None]
        rows[name] = {"top1": accs, "seconds": [r[1] for r in results], "centroid_cos": cos}
        print(f"| {name} | {statistics.mean(accs):.2f} | {min(accs):.2f} - {max(accs):.2f} | "
              f"{statistics.mean(cos):.3f} | {statistics.mean(r[1] for r in results):.1f} |"
              if cos else f"| {name} | {statistics.mean(accs):.2f} | {min(accs):.2f} - {max(accs):.2f} | - | "
              f"{statistics.mean(r[1] for r in results):.1f} |", flush=True)
    if args.out:
        common.write_json(args.out, {"seeds": args.seeds, "variants": rows})


if __name__ == "__main__":
    main_()
