"""``dnc extend [CONFIG] CHECKPOINT --add NAME=DIR ... --remove NAME ... --out CKPT2``."""
from __future__ import annotations

import sys

from .inputs import add_checkpoint_inputs, checkpoint_config


def add_parser(sub) -> None:
    p = sub.add_parser("extend", help="add classes from a few images or remove classes, without retraining")
    add_checkpoint_inputs(p, "checkpoint whose classes change (dnc train, dnc explain or dnc extend)")
    p.add_argument("--add", action="append", default=[], metavar="NAME=DIR",
                   help="a new class and the folder of its images (any tree)")
    p.add_argument("--remove", action="append", default=[], metavar="NAME", help="a class to drop")
    p.add_argument("--out", required=True, metavar="CKPT2", help="the extended checkpoint (.pt); its config goes to CKPT2.yaml")
    p.add_argument("--force", action="store_true", help="replace CKPT2 if it exists (never the checkpoint)")
    p.add_argument("--val", action="store_true",
                   help="print the old classes' validation accuracy before and after (the config's val split)")
    p.add_argument("--refit-old", action="store_true",
                   help="also re-fit the old classes' sub-centroids on the current embeddings of the config's "
                        "training split (prevents the collapse of stale old classes; changes them)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=run)


def _parse_add(items) -> dict:
    """``{name: folder}`` of the ``--add NAME=DIR`` items."""
    added = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--add {item!r}: expected NAME=DIR")
        if name in added:
            raise ValueError(f"--add {name}: given twice")
        added[name] = folder
    return added


def run(args) -> dict:
    from ..extend import WARN_DROP, run_extend
    cfg, checkpoint, _ = checkpoint_config(args, "extend")
    s = run_extend(cfg, checkpoint, _parse_add(args.add), args.remove, args.out, args.val, args.device,
                   args.refit_old, args.force)
    added = ", ".join(f"{n} ({c} images)" for n, c in s["added"].items()) or "none"
    print(f"{len(s['classes'])} classes; added {added}; removed {', '.join(s['removed']) or 'none'} -> {args.out} "
          f"(config {s['config']}; its data.root must hold every class to test or train on it)", flush=True)
    v = s.get("old_classes")
    if v:
        line = (f"old classes on the validation split ({v['images']} images): top-1 {v['top1_before']:.2f}% before, "
                f"{v['top1_after']:.2f}% after; {v['taken_by_new']:.2f}% now predicted as a new class; "
                f"mean cosine to their own class {v['cos_own']:.3f}")
        print(line + (f", to the nearest new class {v['cos_new']:.3f}" if "cos_new" in v else ""), flush=True)
        drop = v["top1_before"] - v["top1_after"]
        if drop > WARN_DROP:
            why = ("the old classes were re-fitted (--refit-old), so the new classes themselves overlap them on this "
                   "embedding; " if args.refit_old else
                   "their images lie closer to the new sub-centroids than to their own (stale sub-centroids of an "
                   "under-trained embedding?); re-fit them with --refit-old, or ")
            print(f"dnc: warning: adding classes costs the old classes {drop:.1f} points: {why}continue training: "
                  f"dnc train {s['config']} --resume {args.out} train.iters=...", file=sys.stderr, flush=True)
    return s
