"""``dnc train CONFIG [--work-dir DIR] [--resume [CKPT]] [--force] [key=value ...]``."""
from __future__ import annotations

import json
import shlex

EXIT_STOPPED = 3  # a run stopped by SIGTERM/SIGINT with a resumable last.pt: job scripts may requeue it
OVERRIDES_HELP = "config overrides, e.g. optim.lr=0.05 data.root=/data/mine"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config", help="YAML config: a file, or a path inside the shipped configs (e.g. demo/digits_dnc.yaml)")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue the run of CKPT (default: WORK_DIR/last.pt) with the config it was started with")
    p.add_argument("--force", action="store_true", help="start over in a work dir that holds a run (replaces its files)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..runs import train
    metrics, work_dir, info = train(args.config, args.overrides, args.work_dir, args.resume, getattr(args, "force", False))
    if info.is_main:
        print_metrics(metrics, args.config, args.overrides, work_dir)
    return metrics


def print_metrics(metrics: dict, config: str, overrides, work_dir) -> None:
    """The final metrics as one JSON line, or how a stopped run is resumed."""
    if metrics.get("stopped"):
        how = "" if metrics["reason"] == "stop_after" else f" by {metrics['reason']} (exit status {EXIT_STOPPED})"
        again = shlex.join(["dnc", "train", config, "--work-dir", str(work_dir), "--resume", *overrides])
        print(f"stopped{how} at iteration {metrics['iter']}; resume with: {again}", flush=True)
    else:
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}), flush=True)
