"""``dnc explain [CONFIG] CHECKPOINT --out DIR``: sub-centroids anchored to training images, with a report."""
from __future__ import annotations

from pathlib import Path

from .inputs import add_checkpoint_inputs, checkpoint_config


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="anchor sub-centroids to training images; galleries and an HTML report")
    add_checkpoint_inputs(p, "a DNC classification checkpoint of dnc train (e.g. WORK_DIR/best.pt); data overrides "
                             "choose the evaluation set, not the training images")
    p.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                   help="output folder: anchored.pt, explain.json, index.html, galleries/, decisions/")
    p.add_argument("--top-m", type=int, default=5, metavar="M",
                   help="nearest training images kept per sub-centroid (default 5)")
    p.add_argument("--examples", type=int, default=24, metavar="N",
                   help="correct and wrong evaluation predictions shown in the report, each (default 24)")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..explain import run_explain
    cfg, checkpoint, config = checkpoint_config(args, "explain")
    result = run_explain(cfg, checkpoint, args.out_dir, args.top_m, args.examples, progress=True,
                         config_name=str(config or checkpoint))
    acc = result["accuracy"]
    print(f"scored {result['evaluated']['source']}: {result['num_eval']} samples; "
          f"top-1 original {acc['before']['top1']:.2f}%, anchored {acc['after']['top1']:.2f}% "
          f"({acc['after']['top1'] - acc['before']['top1']:+.2f}); unused sub-centroids {result['unused']}; "
          f"report {Path(args.out_dir) / 'index.html'}", flush=True)
    return result
