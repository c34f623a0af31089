"""A training run and a test run from a config: what ``dnc train`` and ``dnc test`` do, with plain arguments.

* :func:`train`: a new run in a fresh work dir, or the continuation of one (``resume``), its config and
  ``metrics.json`` written by process 0;
* :func:`test`: score a checkpoint on a split of the data root (per-class figures, open-set scores with
  ``ood``, per-sample predictions written to ``out``).

Messages go to the ``dnc`` logger (the command line prints them).
"""
from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from .files import write_atomic, write_json
from .workdir import StartOver, work_dir_lock

__all__ = ["seed_everything", "set_threads", "check_same_run", "fresh_work_dir", "train", "test"]

log = logging.getLogger("dnc")

_SAME_RUN = ("task", "model.backbone", "model.head", "data.dataset", "data.num_classes")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(n: int) -> None:
    """``train.threads``: the number of torch threads on the CPU (0: torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


def check_same_run(cfg, saved: dict, path: str, config: str) -> None:
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


def fresh_work_dir(work_dir: Path, force: bool) -> None:
    """Refuse to start a run over another one's outputs, unless ``force`` (which replaces them once the new
    run has written its first checkpoint)."""
    found = [n for n in ("last.pt", "best.pt", "metrics.json") if (work_dir / n).exists()]
    if found and not force:
        raise FileExistsError(f"{work_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                              f"or pass --force to start over (its files are replaced)")


def _prepare_work_dir(cfg, work_dir: Path, resume: Optional[str], notes: Sequence[str]) -> Optional[StartOver]:
    """Process 0: set a replaced run's files aside (:class:`StartOver`, returned), write ``config.yaml``."""
    from .config import to_dict
    from .files import remove_stale_temporaries
    remove_stale_temporaries(work_dir)
    replaced = None if resume else StartOver(work_dir).begin()
    for note in notes:
        log.warning(note)
    write_atomic(work_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return replaced


def train(config: str, overrides: Sequence[str] = (), work_dir=None, resume: Optional[str] = None,
          force: bool = False) -> tuple:
    """Train the model of ``config`` (a YAML path) with ``key=value`` ``overrides`` in ``work_dir``
    (default ``work_dirs/<config name>``). ``resume``: a checkpoint to continue from (``"auto"``:
    ``WORK_DIR/last.pt``), with the config it was started with; ``force``: start over in a work dir
    that holds a run. Returns ``(metrics, work_dir, DistInfo)``; the metrics of a stopped run are
    ``{"stopped": True, "iter", "reason"}``.

    Process 0 holds the work dir's lock (:func:`~dnc.workdir.work_dir_lock`) from the start: a second
    training there is refused before it reads or writes anything."""
    work_dir = Path(work_dir or Path("work_dirs") / Path(config).stem)
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(config, overrides, work_dir, resume, force)
    with work_dir_lock(work_dir):
        return _train(config, overrides, work_dir, resume, force)


def _train(config: str, overrides: Sequence[str], work_dir: Path, resume: Optional[str], force: bool) -> tuple:
    from . import engine
    from .config import load_config, resume_config
    from .evaluation import evaluate
    from .runconfig import resolve_config
    from .tasks import build_datasets, build_eval_loader, build_model, collate_fn, init_centroids_from_data, metric_key

    # Resuming, the run's config is the checkpoint's (checked below); the overrides are checked against it.
    cfg = load_config(config, tuple(overrides), validate=not resume)
    ckpt, notes = None, []
    if resume == "auto":
        resume = str(work_dir / "last.pt")
    if resume:  # continue the run as it was started: its config is the checkpoint's
        ckpt = engine.load_resumable(resume)
        if Path(resume).resolve().parent != work_dir.resolve():  # a checkpoint from elsewhere: the run of CONFIG?
            check_same_run(cfg, ckpt["config"], resume, config)
        cfg, notes = resume_config(ckpt["config"], tuple(overrides), resume)
    else:
        fresh_work_dir(work_dir, force)
        cfg = resolve_config(cfg)  # the classes and the weights' preprocessing, saved with the run
    info = engine.setup_distributed(cfg.train.device)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic)
    datasets, classes = build_datasets(cfg)
    replaced = _prepare_work_dir(cfg, work_dir, resume, notes) if info.is_main else None
    try:
        model = build_model(cfg)
        train_loader = engine.make_loader(datasets["train"], cfg.data.batch_size, True, info, cfg.train.seed,
                                          cfg.data.num_workers, collate_fn(cfg), on_bad=cfg.data.on_bad_sample)
        val_loader = build_eval_loader(cfg, datasets["val"], info)
        metrics = engine.train_loop(
            cfg, model, train_loader, info, work_dir,
            evaluate=lambda m: evaluate(cfg, m, val_loader, info), metric_key=metric_key(cfg), resume=resume,
            classes=classes, before_training=lambda m: init_centroids_from_data(cfg, m, datasets["train"], info),
            resume_state=ckpt, on_saved=replaced.commit if replaced else None)
    except BaseException:
        if replaced:  # the new run failed before its first checkpoint: the old one comes back
            replaced.rollback()
        raise
    if info.is_main and not metrics.get("stopped"):
        write_json(work_dir / "metrics.json", metrics)
    return metrics, work_dir, info


def _check_metrics(cfg, metrics: Optional[Sequence[str]]) -> None:
    from .config import ConfigError
    valid = {"classification": {"accuracy"}, "segmentation": {"mIoU"}}[cfg.task]
    for m in metrics or []:
        if m not in valid:
            raise ConfigError(f"--metrics {m!r} is not available for {cfg.task}; valid choices: {', '.join(sorted(valid))}")


def test(config: Optional[str], checkpoint: str, overrides: Sequence[str] = (), split: str = "val",
         metrics: Optional[Sequence[str]] = None, ood: Optional[Sequence[str]] = None, out=None,
         ood_pixels: bool = False, knn: int = 0) -> tuple:
    """Score ``checkpoint`` on ``split`` (its saved config, or ``config`` when given, with ``overrides``).
    ``ood``: folders of images of no known class (open-set scores); ``ood_pixels``: a segmenter's open-set
    scores of the pixels of the classes its training left out; ``knn``: with either, also the ``knn`` score
    with this many neighbours (:func:`~dnc.ood.feature_bank`); ``out``: a ``.json`` or ``.pkl`` file for
    the metrics and per-sample predictions. Returns ``(cfg, result, classes, DistInfo)``."""
    from .config import ConfigError
    from .engine import load_checkpoint, setup_distributed
    from .evaluation import evaluate
    from .runconfig import command_config
    from .tasks import build_eval_loader, build_eval_split, check_classes, load_trained_model

    if out and Path(out).suffix not in (".json", ".pkl"):
        raise ConfigError(f"--out {out}: use a .json or .pkl file")
    ckpt = load_checkpoint(checkpoint)
    cfg = command_config(config, ckpt, checkpoint, overrides)
    _check_metrics(cfg, metrics)
    if knn and not (ood or ood_pixels):
        raise ConfigError("dnc test --knn: the knn score is an open-set score; give --ood DIR or --ood-pixels too")
    if knn < 0:
        raise ConfigError(f"dnc test --knn: the number of neighbours must be >= 1, got {knn}")
    if ood_pixels and (cfg.task != "segmentation" or cfg.data.dataset == "folder"
                       or not cfg.data.dataset_kwargs.get("classes")):
        raise ConfigError("dnc test --ood-pixels: scores the pixels of classes left out of a segmenter's training; "
                          "the run's data.dataset_kwargs.classes must keep some of the classes of an ade20k, "
                          "cityscapes or camvid dataset")
    info = setup_distributed(cfg.train.device)
    set_threads(cfg.train.threads)
    model = load_trained_model(cfg, ckpt, checkpoint)
    dataset, evaluated = build_eval_split(cfg, split)
    classes = list(getattr(dataset, "classes", []))
    check_classes(ckpt.get("classes"), classes, checkpoint)
    if info.is_main:
        log.info(f"scoring {checkpoint} on {evaluated['source']}: {evaluated['samples']} samples")
    loader = build_eval_loader(cfg, dataset, info)
    extra = {}
    bank = None
    if knn:  # checked above: with --ood or --ood-pixels
        from .ood import feature_bank
        bank = feature_bank(cfg, model.to(info.device), info.device)
    if ood:
        from .ood import ood_report
        extra["ood"] = ood_report(cfg, model.to(info.device), loader, ood, info.device, bank=bank, k=knn)
    if ood_pixels:
        extra["ood_pixels"] = _ood_pixels(cfg, model.to(info.device), split, info, bank, knn)
    result = evaluate(cfg, model.to(info.device), loader, info, predictions=bool(out), details=True, progress=True)
    result = {"evaluated": evaluated, **result, **extra}
    if info.is_main and out:
        payload = {"config": str(config) if config else None, "checkpoint": str(checkpoint), "classes": classes,
                   **result}
        if Path(out).suffix == ".pkl":
            write_atomic(Path(out), pickle.dumps(payload))
        else:
            write_json(Path(out), payload)
    return cfg, result, classes, info


def _ood_pixels(cfg, model, split: str, info, bank, k: int) -> dict:
    """``dnc test --ood-pixels``: the split again, the pixels of the classes left out of training marked."""
    from .ood import pixel_ood_report
    from .tasks import build_eval_loader, build_eval_split
    dataset, _ = build_eval_split(cfg, split, mark_left_out=True)
    return pixel_ood_report(model, build_eval_loader(cfg, dataset, info), dataset.left_out, info.device, bank=bank,
                            k=k)
