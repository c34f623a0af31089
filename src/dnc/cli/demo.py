"""``dnc demo``: DNC and linear models on the built-in digits, and the DNC one explained."""
from __future__ import annotations

from pathlib import Path

DEMO_TIME = "about 30 s of one CPU core"  # measured (CPU time, one thread); the README says the same


def add_parser(sub) -> None:
    demo = f"train DNC and linear models on the built-in digits and explain the DNC one (CPU, {DEMO_TIME})"
    p = sub.add_parser("demo", help=demo, description=demo[0].upper() + demo[1:] + ".")
    p.add_argument("--work-dir", default="work_dirs/demo", help="output folder (default work_dirs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of both digits configs")
    p.set_defaults(func=run)


def run(args) -> dict:
    """Train a DNC and a linear classifier on the built-in digits, print both accuracies, and explain
    the DNC model (its sub-centroids anchored to training images, with an HTML report)."""
    from ..config import PACKAGE_CONFIGS, load_config
    from ..explain import run_explain
    from ..runs import train
    from .train import print_metrics
    root = Path(args.work_dir)
    results = {}
    for head in ("dnc", "linear"):
        print(f"== training the {head} model on the digits (CPU) ==", flush=True)
        config = str(PACKAGE_CONFIGS / "demo" / f"digits_{head}.yaml")
        metrics, work_dir, info = train(config, args.overrides, str(root / head), force=True)
        if info.is_main:
            print_metrics(metrics, config, list(args.overrides), work_dir)
        results[head] = metrics
    print("== explaining the DNC model: sub-centroids as training images ==", flush=True)
    cfg = load_config(str(PACKAGE_CONFIGS / "demo" / "digits_dnc.yaml"), tuple(args.overrides))
    explained = run_explain(cfg, root / "dnc" / "last.pt", root / "explain",
                            config_name="configs/demo/digits_dnc.yaml")["accuracy"]
    print("\nheld-out digits (360 images), top-1 accuracy:")
    for head, m in results.items():
        print(f"  {head:>6}: {m['top1']:.2f}%")
    anchors = cfg.data.num_classes * cfg.model.dnc.num_subcentroids
    print(f"  DNC anchored to {anchors} training images: {explained['after']['top1']:.2f}%")
    print(f"report: {root / 'explain' / 'index.html'}")
    return results
