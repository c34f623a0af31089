"""Scoring a model on an evaluation loader: accuracy (top-1/top-5, per class, confusion matrix, per-sample
predictions) or segmentation metrics, each sample counted once across processes."""
from __future__ import annotations

import sys

import torch
from torch import nn

from .config import Config
from .engine import DistInfo, gather_objects, unwrap

__all__ = ["autocast", "evaluate"]


def autocast(cfg: Config, device: torch.device):
    """The mixed-precision context of ``train.amp`` for inference."""
    if cfg.train.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(cfg: Config, model: nn.Module, loader, info: DistInfo, predictions: bool = False,
             details: bool = False, progress: bool = False) -> dict:
    """Metrics over the whole evaluation set, each sample counted once across processes.

    Classification: ``top1``, and ``top5`` when there are more than 5 classes. With ``details``:
    ``per_class_accuracy`` (top-1 % per class, None for a class without samples) and ``confusion``
    (``confusion[label][pred]`` counts). Segmentation: ``aAcc``, ``mIoU``, ``mAcc`` and the per-class
    ``IoU`` and ``Acc`` lists (see :class:`~dnc.metrics.SegMetric`).

    With ``predictions``, classification results also hold ``predictions``: one record per sample
    (index, image path where the dataset knows it, label, top-5 classes and their probabilities),
    gathered from all processes. With ``data.on_bad_sample=skip``, ``skipped`` counts the unreadable
    samples left out (all processes). ``progress`` shows a progress bar on process 0.
    """
    model = unwrap(model).eval()
    skipped = [0]
    batches = _eval_batches(loader, info, progress, skipped)
    if cfg.task == "classification":
        dataset = getattr(loader.dataset, "dataset", loader.dataset)  # inside make_loader's SeededDataset
        result = _evaluate_cls(cfg, model, batches, info, dataset, predictions, details)
    else:
        result = _evaluate_seg(cfg, model, batches, info)
    return _with_skipped(cfg, result, skipped[0])


def _eval_batches(loader, info: DistInfo, progress: bool, skipped: list):
    """``(images, targets, dataset indices)`` of each batch with a readable sample, on the device; ``skipped[0]``
    counts the unreadable ones. ``progress``: a progress bar on process 0 (on a terminal; none in logs)."""
    from tqdm import tqdm
    bar = tqdm(loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True,
               disable=not (progress and info.is_main and sys.stderr.isatty()))
    for images, targets, bad, index in bar:
        skipped[0] += bad
        if len(targets) == 0:
            continue
        yield images.to(info.device), targets.to(info.device), index


def _evaluate_cls(cfg: Config, model: nn.Module, batches, info: DistInfo, dataset, predictions: bool,
                  details: bool) -> dict:
    from .data.images import sample_name
    from .metrics import Accuracy, ConfusionMatrix
    c = cfg.data.num_classes
    metric = Accuracy(topk=(1, 5) if c > 5 else (1,), device=info.device)
    confusion = ConfusionMatrix(c, device=info.device) if details else None
    records = []
    for images, targets, index in batches:
        with autocast(cfg, info.device):
            logits = model(images).float()
        metric.update(logits, targets)
        if confusion is not None:
            confusion.update(logits.argmax(1), targets)
        if predictions:
            prob, top = logits.softmax(1).topk(min(5, logits.shape[1]), dim=1)
            for i, sample in enumerate(index.tolist()):
                records.append({"index": sample, "path": sample_name(dataset, sample),
                                "label": int(targets[i]), "pred": int(top[i, 0]), "topk": top[i].tolist(),
                                "scores": [round(p, 6) for p in prob[i].tolist()]})
    result = metric.compute()
    if confusion is not None:
        cm = confusion.compute()
        result["per_class_accuracy"] = ConfusionMatrix.recall(cm)
        result["confusion"] = cm.tolist()
    if predictions:
        result["predictions"] = sorted(gather_objects(records), key=lambda r: r["index"])
    return result


def _evaluate_seg(cfg: Config, model: nn.Module, batches, info: DistInfo) -> dict:
    from .metrics import SegMetric
    from .models.seg_inference import seg_inference
    d = cfg.data
    metric = SegMetric(d.num_classes, device=info.device)
    for images, masks, _ in batches:
        with autocast(cfg, info.device):
            logits = seg_inference(model, images, d.num_classes, tuple(masks.shape[-2:]), mode=d.eval_mode,
                                   crop_size=tuple(d.eval_crop or d.crop_size),
                                   stride=tuple(d.eval_stride) if d.eval_stride else None,
                                   scales=tuple(d.eval_scales), flip=d.eval_flip)
        metric.update(logits.argmax(1), masks)
    return metric.compute()


def _with_skipped(cfg: Config, result: dict, skipped: int) -> dict:
    if cfg.data.on_bad_sample == "skip":
        result["skipped"] = sum(gather_objects([skipped]))
    return result
