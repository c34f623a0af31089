"""``dnc`` command line: train, test, explain, predict, demo.

    dnc train CONFIG [--work-dir DIR] [--resume [CKPT]] [key=value ...]
    torchrun --nproc_per_node 8 -m dnc train CONFIG ...
    dnc test CONFIG CHECKPOINT [--out result.json|result.pkl] [--metrics accuracy|mIoU] [key=value ...]
    dnc demo

Errors are reported as one line naming the file, key or sample at fault (``DNC_DEBUG=1`` shows the
traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import yaml

__all__ = ["main"]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _seed(seed: int, deterministic: bool) -> None:
    import random

    import torch
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def cmd_train(args) -> dict:
    from .config import load_config, to_dict
    from .engine import make_loader, setup_distributed, train_loop
    from .tasks import build_datasets, build_eval_loader, build_model, collate_fn, evaluate, init_centroids_from_data, metric_key

    cfg = load_config(args.config, tuple(args.overrides))
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    resume = args.resume
    if resume == "auto":
        resume = str(work_dir / "last.pt")
    info = setup_distributed(cfg.train.device)
    _seed(cfg.train.seed + info.rank, cfg.train.deterministic)
    datasets, classes = build_datasets(cfg)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(work_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    model = build_model(cfg)
    train_loader = make_loader(datasets["train"], cfg.data.batch_size, True, info, cfg.train.seed,
                               cfg.data.num_workers, collate_fn(cfg))
    val_loader = build_eval_loader(cfg, datasets["val"], info)
    metrics = train_loop(
        cfg, model, train_loader, info, work_dir,
        evaluate=lambda m: evaluate(cfg, m, val_loader, info), metric_key=metric_key(cfg), resume=resume,
        classes=classes, before_training=lambda m: init_centroids_from_data(cfg, m, datasets["train"], info))
    if metrics.get("stopped"):
        if info.is_main:
            print(f"stopped at iteration {metrics['iter']}; resume with: dnc train {args.config} "
                  f"--work-dir {work_dir} --resume", flush=True)
        return metrics
    if info.is_main:
        _write_json(work_dir / "metrics.json", metrics)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}), flush=True)
    return metrics


def cmd_test(args) -> dict:
    from .config import ConfigError, load_config
    from .engine import load_checkpoint, setup_distributed
    from .tasks import build_datasets, build_eval_loader, evaluate, load_trained_model

    if args.out and Path(args.out).suffix not in (".json", ".pkl"):
        raise ConfigError(f"--out {args.out}: use a .json or .pkl file")
    cfg = load_config(args.config, tuple(args.overrides))
    valid = {"classification": {"accuracy"}, "segmentation": {"mIoU"}}[cfg.task]
    for m in args.metrics or []:
        if m not in valid:
            raise ConfigError(f"--metrics {m!r} is not available for {cfg.task}; valid choices: {', '.join(sorted(valid))}")
    info = setup_distributed(cfg.train.device)
    ckpt = load_checkpoint(args.checkpoint)
    model = load_trained_model(cfg, ckpt, args.checkpoint)
    datasets, classes = build_datasets(cfg, ("val",))
    loader = build_eval_loader(cfg, datasets["val"], info)
    if args.ood:
        from .ood import ood_report
        ood = ood_report(cfg, model.to(info.device), loader, args.ood, info.device)
    result = evaluate(cfg, model.to(info.device), loader, info, predictions=bool(args.out))
    if args.ood:
        result["ood"] = ood
    if info.is_main:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
        if args.out:
            out = Path(args.out)
            payload = {"config": str(args.config), "checkpoint": str(args.checkpoint), "classes": classes, **result}
            if out.suffix == ".pkl":
                _write_atomic(out, pickle.dumps(payload))
            else:
                _write_json(out, payload)
    return result


def cmd_demo(args) -> dict:
    """Train a DNC and a linear classifier on the built-in digits, print both accuracies, and explain
    the DNC model (its sub-centroids anchored to training images, with an HTML report)."""
    from .config import PACKAGE_CONFIGS, load_config
    from .explain import run_explain
    root = Path(args.work_dir)
    results = {}
    for head in ("dnc", "linear"):
        print(f"== training the {head} model on the digits (CPU) ==", flush=True)
        ns = argparse.Namespace(config=str(PACKAGE_CONFIGS / "demo" / f"digits_{head}.yaml"),
                                work_dir=str(root / head), resume=None, overrides=list(args.overrides))
        results[head] = cmd_train(ns)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnc", description="Deep Nearest Centroids: train, test and explain.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", help="resume from CKPT (default: WORK_DIR/last.pt)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate a checkpoint")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="write metrics and per-sample predictions (.json or .pkl)")
    p.add_argument("--metrics", nargs="+", help="accuracy (classification) or mIoU (segmentation)")
    p.add_argument("--ood", action="append", metavar="DIR", help="images of no known class: AUROC, FPR95, threshold")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("demo", help="train DNC and linear models on the built-in digits (CPU, about a minute)")
    p.add_argument("--work-dir", default="work_dirs/demo")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)

    from .explain import add_commands
    add_commands(sub)
    from . import export, extend, ood
    ood.add_commands(sub)
    extend.add_commands(sub)
    export.add_commands(sub)
    return parser


def _parse(argv) -> argparse.Namespace:
    """argparse stops collecting the positional ``key=value`` overrides at the first option, and
    ``--resume [CKPT]`` / ``--metrics M...`` swallow a following override: gather them all back."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if not hasattr(args, "overrides"):
        return args
    taken = []
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():
        taken, args.resume = [resume], "auto"
    if getattr(args, "metrics", None):
        taken += [m for m in args.metrics if "=" in m]
        args.metrics = [m for m in args.metrics if "=" not in m] or None
    args.overrides = list(args.overrides) + taken + extra
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("dnc: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get("DNC_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if msg.startswith("Caught ") and "Original Traceback" in str(e):  # re-raised from a DataLoader worker:
            msg = str(e).strip().splitlines()[-1].split(": ", 1)[-1]     # its own message is the last line
        print(f"dnc: error: {msg}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
