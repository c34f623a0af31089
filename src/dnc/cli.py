"""``dnc`` command line: train, test, explain, predict, config, demo.

    dnc train CONFIG [--work-dir DIR] [--resume [CKPT]] [--force] [key=value ...]
    torchrun --nproc_per_node 8 -m dnc train CONFIG ...
    dnc test [CONFIG] CHECKPOINT [--split NAME] [--out result.json|result.pkl] [--metrics accuracy|mIoU] [key=value ...]
    dnc explain CONFIG CHECKPOINT --out DIR [key=value ...]
    dnc predict CHECKPOINT IMAGE|FOLDER|GLOB... [--out preds.json|preds.csv] [--explain]
    dnc config CONFIG [key=value ...]
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
from pathlib import Path

import yaml

from . import __version__
from .files import write_atomic as _write_atomic
from .files import write_json as _write_json

__all__ = ["main"]


def _seed(seed: int, deterministic: bool) -> None:
    import random

    import torch
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _threads(n: int) -> None:
    """``train.threads``: the number of torch threads on the CPU (0: torch's default)."""
    if n > 0:
        import torch
        torch.set_num_threads(n)


EXIT_STOPPED = 3  # a run stopped by SIGTERM/SIGINT with a resumable last.pt: job scripts may requeue it
_RUN_FILES = ("last.pt", "best.pt", "metrics.json", "log.jsonl")
_SAME_RUN = ("task", "model.backbone", "model.head", "data.dataset", "data.num_classes")


def _check_same_run(cfg, saved: dict, path: str, config: str) -> None:
    """A checkpoint to resume must be one of the run that ``config`` describes (same task, model, data)."""
    from .config import to_dict
    from .engine import CheckpointError
    ours = to_dict(cfg)
    for key in _SAME_RUN:
        a, b = ours, saved
        for part in key.split("."):
            a, b = a.get(part), (b or {}).get(part)
        if a is not None and a != b:  # None: left to the data or the weights (resolved in the saved config)
            raise CheckpointError(f"{path}: a checkpoint of another run ({key} is {b!r} there, {a!r} in {config})")


def _fresh_work_dir(work_dir: Path, force: bool) -> None:
    """Refuse to start a run over another one's outputs, unless ``--force`` (which removes them)."""
    found = [n for n in _RUN_FILES[:3] if (work_dir / n).exists()]
    if found and not force:
        raise FileExistsError(f"{work_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                              f"or pass --force to start over (its files are replaced)")


def cmd_train(args) -> dict:
    import shlex

    from .config import load_config, resume_config, to_dict
    from .engine import load_resumable, make_loader, setup_distributed, train_loop
    from .files import remove_stale_temporaries
    from .tasks import (build_datasets, build_eval_loader, build_model, collate_fn, evaluate, init_centroids_from_data,
                        metric_key, resolve_config)

    # Resuming, the run's config is the checkpoint's (checked below); the overrides are checked against it.
    cfg = load_config(args.config, tuple(args.overrides), validate=not args.resume)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    resume, ckpt, notes = args.resume, None, []
    if resume == "auto":
        resume = str(work_dir / "last.pt")
    if resume:  # continue the run as it was started: its config is the checkpoint's
        ckpt = load_resumable(resume)
        if Path(resume).resolve().parent != work_dir.resolve():  # a checkpoint from elsewhere: the run of CONFIG?
            _check_same_run(cfg, ckpt["config"], resume, args.config)
        cfg, notes = resume_config(ckpt["config"], tuple(args.overrides), resume)
    else:
        _fresh_work_dir(work_dir, getattr(args, "force", False))
        cfg = resolve_config(cfg)  # the classes and the weights' preprocessing, saved with the run
    info = setup_distributed(cfg.train.device)
    _threads(cfg.train.threads)
    _seed(cfg.train.seed + info.rank, cfg.train.deterministic)
    datasets, classes = build_datasets(cfg)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(work_dir)
        if not resume:
            for name in _RUN_FILES:
                (work_dir / name).unlink(missing_ok=True)
        for note in notes:
            print(f"dnc: warning: {note}", file=sys.stderr, flush=True)
        _write_atomic(work_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    model = build_model(cfg)
    train_loader = make_loader(datasets["train"], cfg.data.batch_size, True, info, cfg.train.seed,
                               cfg.data.num_workers, collate_fn(cfg), on_bad=cfg.data.on_bad_sample)
    val_loader = build_eval_loader(cfg, datasets["val"], info)
    metrics = train_loop(
        cfg, model, train_loader, info, work_dir,
        evaluate=lambda m: evaluate(cfg, m, val_loader, info), metric_key=metric_key(cfg), resume=resume,
        classes=classes, before_training=lambda m: init_centroids_from_data(cfg, m, datasets["train"], info),
        resume_state=ckpt)
    if metrics.get("stopped"):
        if info.is_main:
            how = "" if metrics["reason"] == "stop_after" else f" by {metrics['reason']} (exit status {EXIT_STOPPED})"
            again = shlex.join(["dnc", "train", args.config, "--work-dir", str(work_dir), "--resume", *args.overrides])
            print(f"stopped{how} at iteration {metrics['iter']}; resume with: {again}", flush=True)
        return metrics
    if info.is_main:
        _write_json(work_dir / "metrics.json", metrics)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}), flush=True)
    return metrics


def _test_inputs(args, command: str = "test") -> tuple:
    """``(config or None, checkpoint, overrides)`` of ``dnc COMMAND [CONFIG] CHECKPOINT [key=value ...]``."""
    from .config import ConfigError
    files = [x for x in args.inputs if "=" not in x]
    overrides = [x for x in args.inputs if "=" in x] + list(args.overrides)
    if len(files) not in (1, 2):
        raise ConfigError(f"dnc {command} takes [CONFIG] CHECKPOINT, got {len(files)} paths: {' '.join(files)}")
    return (files[0] if len(files) == 2 else None), files[-1], overrides


def checkpoint_command_config(args, command: str) -> tuple:
    """``(config, checkpoint path, config file or None)`` of a command on ``[CONFIG] CHECKPOINT``: the
    config file's (resolved as dnc train resolves it), else the one saved in the checkpoint."""
    from .engine import load_checkpoint
    from .tasks import command_config
    config, checkpoint, overrides = _test_inputs(args, command)
    ckpt = {} if config else load_checkpoint(checkpoint, mmap=True)
    return command_config(config, ckpt, checkpoint, overrides), checkpoint, config


def add_checkpoint_inputs(p, what: str) -> None:
    """The ``[CONFIG] CHECKPOINT [key=value ...]`` positionals of a command on a checkpoint."""
    p.add_argument("inputs", nargs="+", metavar="[CONFIG] CHECKPOINT",
                   help=f"{what}, which holds its config; or a config file and the checkpoint. key=value overrides "
                        "may follow")
    p.set_defaults(overrides=[])


def _print_details(cfg, result: dict, classes: list) -> None:
    """Per-class figures (and a small confusion matrix) as a table on stdout."""
    names = classes or [str(i) for i in range(cfg.data.num_classes)]
    width = max(len(n) for n in names)
    fmt = lambda v: "    -" if v is None else f"{v:5.1f}"  # noqa: E731
    if cfg.task == "segmentation":
        print(f"{'class':<{width}}   IoU %  Acc %")
        for n, iou, acc in zip(names, result["IoU"], result["Acc"]):
            print(f"{n:<{width}}   {fmt(iou)}  {fmt(acc)}")
        return
    cm = result["confusion"]
    print(f"{'class':<{width}}  samples  top-1 %")
    for n, row, acc in zip(names, cm, result["per_class_accuracy"]):
        print(f"{n:<{width}}  {sum(row):7d}  {fmt(acc)}")
    if len(names) <= 20:
        cell = max(5, max(len(str(v)) for row in cm for v in row) + 1)
        print("confusion matrix (rows: label, columns: prediction, in the order above)")
        for n, row in zip(names, cm):
            print(f"{n:<{width}} " + "".join(f"{v:>{cell}d}" for v in row))


def cmd_test(args) -> dict:
    from .config import ConfigError
    from .engine import load_checkpoint, setup_distributed
    from .tasks import build_eval_loader, build_eval_split, check_classes, command_config, evaluate, load_trained_model

    if args.out and Path(args.out).suffix not in (".json", ".pkl"):
        raise ConfigError(f"--out {args.out}: use a .json or .pkl file")
    config, checkpoint, overrides = _test_inputs(args)
    ckpt = load_checkpoint(checkpoint)
    cfg = command_config(config, ckpt, checkpoint, overrides)
    valid = {"classification": {"accuracy"}, "segmentation": {"mIoU"}}[cfg.task]
    for m in args.metrics or []:
        if m not in valid:
            raise ConfigError(f"--metrics {m!r} is not available for {cfg.task}; valid choices: {', '.join(sorted(valid))}")
    info = setup_distributed(cfg.train.device)
    _threads(cfg.train.threads)
    model = load_trained_model(cfg, ckpt, checkpoint)
    dataset, evaluated = build_eval_split(cfg, args.split)
    classes = list(getattr(dataset, "classes", []))
    check_classes(ckpt.get("classes"), classes, checkpoint)
    if info.is_main:
        print(f"scoring {checkpoint} on {evaluated['source']}: {evaluated['samples']} samples", flush=True)
    loader = build_eval_loader(cfg, dataset, info)
    ood = None
    if args.ood:
        from .ood import ood_report
        ood = ood_report(cfg, model.to(info.device), loader, args.ood, info.device)
    result = evaluate(cfg, model.to(info.device), loader, info, predictions=bool(args.out), details=True,
                      progress=True)
    result = {"evaluated": evaluated, **result, **({"ood": ood} if ood is not None else {})}
    if info.is_main:
        _print_details(cfg, result, classes)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
        if args.out:
            out = Path(args.out)
            payload = {"config": str(config) if config else None, "checkpoint": str(checkpoint), "classes": classes,
                       **result}
            if out.suffix == ".pkl":
                _write_atomic(out, pickle.dumps(payload))
            else:
                _write_json(out, payload)
    return result


def cmd_config(args) -> dict:
    """Print the resolved config (``_base_`` files merged, overrides applied) as YAML."""
    from .config import load_config, to_dict
    data = to_dict(load_config(args.config, tuple(args.overrides)))
    print(yaml.safe_dump(data, sort_keys=False), end="", flush=True)
    return data


DEMO_TIME = "about 30 s of one CPU core"  # measured (CPU time, one thread); the README says the same


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
                                work_dir=str(root / head), resume=None, force=True, overrides=list(args.overrides))
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
    parser = argparse.ArgumentParser(prog="dnc", description="Deep Nearest Centroids: train, test, explain and predict.")
    parser.add_argument("--version", action="version", version=f"dnc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "config overrides, e.g. optim.lr=0.05 data.root=/data/mine"

    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config", help="YAML config: a file, or a path inside the shipped configs (e.g. demo/digits_dnc.yaml)")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue the run of CKPT (default: WORK_DIR/last.pt) with the config it was started with")
    p.add_argument("--force", action="store_true", help="start over in a work dir that holds a run (replaces its files)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate a checkpoint (per-class figures; --out for per-sample predictions)",
                       usage="dnc test [-h] [--split NAME] [--out FILE] [--metrics M ...] [CONFIG] CHECKPOINT "
                             "[key=value ...]")
    p.add_argument("inputs", nargs="+", metavar="[CONFIG] CHECKPOINT",
                   help="a checkpoint of dnc train or dnc explain, which holds its config; or a config file and a "
                        "checkpoint. key=value overrides may follow")
    p.add_argument("--split", default="val", metavar="NAME",
                   help="split of the data root to score (default val, with data.holdout the held-out training "
                        "images): test for an image folder's test/ or CIFAR's test batch, CamVid's or Cityscapes' "
                        "test/val, train")
    p.add_argument("--out", help="write metrics and per-sample predictions (.json or .pkl)")
    p.add_argument("--metrics", nargs="+", help="accuracy (classification) or mIoU (segmentation)")
    p.add_argument("--ood", action="append", metavar="DIR",
                   help="a folder of images of no known class (repeatable): AUROC, FPR at 95%% TPR and the threshold "
                        "of each open-set score")
    p.set_defaults(func=cmd_test, overrides=[])

    p = sub.add_parser("config", help="print a config as dnc uses it: _base_ files merged, overrides applied")
    p.add_argument("config", help="YAML config: a file, or a path inside the shipped configs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(func=cmd_config)

    demo = f"train DNC and linear models on the built-in digits and explain the DNC one (CPU, {DEMO_TIME})"
    p = sub.add_parser("demo", help=demo, description=demo[0].upper() + demo[1:] + ".")
    p.add_argument("--work-dir", default="work_dirs/demo", help="output folder (default work_dirs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of both digits configs")
    p.set_defaults(func=cmd_demo)

    from . import explain, export, extend, ood, predict
    for module in (explain, predict, ood, extend, export):
        module.add_commands(sub)
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
        result = args.func(args)
        if isinstance(result, dict) and result.get("stopped") and result.get("reason") != "stop_after":
            return EXIT_STOPPED
    except KeyboardInterrupt:
        print("dnc: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get("DNC_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.strerror and e.filename is None:  # our own "FILE: what" messages
            msg = e.strerror                                             # without "[Errno N]"
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
