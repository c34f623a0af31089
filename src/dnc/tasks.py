"""What differs between classification and segmentation: datasets, model, evaluation, embeddings.

The engine trains any model whose ``forward(images, targets)`` returns ``(logits, losses)``; this
module builds those pieces from a :class:`~dnc.config.Config`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .config import Config, ConfigError, from_dict, load_config
from .engine import DistInfo, make_loader, unwrap

__all__ = ["build_model", "build_cls_split", "build_datasets", "build_eval_split", "load_trained_model", "load_model",
           "normalization", "cls_transform", "eval_transform", "build_eval_loader", "evaluate", "metric_key",
           "head_kwargs", "collate_fn", "autocast", "init_centroids_from_data", "check_classes", "training_subset"]


def head_kwargs(cfg: Config) -> dict:
    """Keyword arguments of the head: the DNC options (but the initialisation, done by
    :func:`init_centroids_from_data`), or none for the linear head."""
    if cfg.model.head != "dnc":
        return {}
    return {k: v for k, v in dataclasses.asdict(cfg.model.dnc).items() if k not in ("init", "init_samples")}


def build_model(cfg: Union[Config, str, Path], pretrained: Optional[str] = None, overrides: Sequence[str] = ()) -> nn.Module:
    """The model of a config (a :class:`~dnc.config.Config`, or the path of a YAML config with
    ``key=value`` ``overrides``), freshly initialised; ``pretrained`` replaces ``model.pretrained``
    (``""``: no pretrained weights)."""
    if not isinstance(cfg, Config):
        cfg = load_config(str(cfg), tuple(overrides))
    weights = cfg.model.pretrained if pretrained is None else pretrained
    if weights and os.path.isfile(weights) and os.path.getsize(weights) == 0:
        raise ConfigError(f"model.pretrained: {weights} is empty (0 bytes; an interrupted download?)")
    try:
        return _build_model(cfg, pretrained)
    except TypeError as e:  # e.g. a misspelt model.backbone_kwargs key reaching the backbone's constructor
        if "unexpected keyword argument" not in str(e):
            raise
        raise ConfigError(f"model.backbone_kwargs: backbone {cfg.model.backbone!r} does not take "
                          f"{str(e).rsplit('argument ', 1)[-1]} (given: {', '.join(cfg.model.backbone_kwargs)})") from None


def check_classes(ckpt_classes, dataset_classes, path) -> None:
    """``dnc test``: the checkpoint's class names must be the dataset's, in the same order (labels are
    positions in that list). A checkpoint without names (an old one) is not checked."""
    ckpt_classes, dataset_classes = [str(c) for c in ckpt_classes or []], [str(c) for c in dataset_classes or []]
    if not ckpt_classes or not dataset_classes or ckpt_classes == dataset_classes:
        return
    if len(ckpt_classes) != len(dataset_classes):
        raise ConfigError(f"{path}: trained on {len(ckpt_classes)} classes, the dataset has {len(dataset_classes)}")
    i = next(i for i, (a, b) in enumerate(zip(ckpt_classes, dataset_classes)) if a != b)
    raise ConfigError(f"{path}: class {i} is {ckpt_classes[i]!r} in the checkpoint but {dataset_classes[i]!r} in the "
                      f"dataset (the labels would not mean the same)")


def _build_model(cfg: Config, pretrained: Optional[str] = None) -> nn.Module:
    m = cfg.model
    weights = m.pretrained if pretrained is None else pretrained
    if cfg.task == "classification":
        from .models.classifier import Classifier
        return Classifier(m.backbone, cfg.data.num_classes, m.head, weights, m.backbone_kwargs, head_kwargs(cfg))
    from .models.segmenter import Segmenter
    return Segmenter(m.backbone, cfg.data.num_classes, m.decoder, m.head, weights, m.backbone_kwargs,
                     head_kwargs(cfg), m.decoder_channels, m.output_stride, m.aux_weight)


def metric_key(cfg: Config) -> str:
    return "top1" if cfg.task == "classification" else "mIoU"


def _seg_collate(batch):
    from .data.seg_transforms import seg_collate
    return (*seg_collate(batch), 0)  # unreadable samples (data.on_bad_sample=skip) were dropped by the loader


def collate_fn(cfg: Config):
    """Batches as ``(images, targets, number of skipped samples)`` (the loader adds the kept indices)."""
    if cfg.task == "classification":
        from .data.classification import collate
        return collate
    return _seg_collate


def build_cls_split(cfg: Config, split: str, transform) -> "torch.utils.data.Dataset":
    """One split of a classification dataset with the given transform, labels checked."""
    from .data.classification import build_cls_dataset, check_labels
    d = cfg.data
    kw = dict(d.dataset_kwargs)
    if d.holdout:
        kw["holdout"] = d.holdout
    if d.dataset == "imagefolder":
        kw.setdefault("on_bad", d.on_bad_sample)
    ds = build_cls_dataset(d.dataset, d.root, split, transform, **kw)
    if d.check_labels:
        check_labels(ds, d.num_classes, f"{d.dataset}/{split}")
    return ds


def normalization(cfg: Config) -> tuple:
    """``(mean, std)`` of the input normalisation: ``data.mean``/``data.std`` if set, else what the
    pip ImageNet weights expect (``model.pretrained=imagenet``), else ``(None, None)`` (the preset's)."""
    d, m = cfg.data, cfg.model
    if d.mean is not None or d.std is not None:
        if d.mean is None or d.std is None:
            raise ConfigError("set both data.mean and data.std, or neither")
        return tuple(d.mean), tuple(d.std)
    if m.pretrained == "imagenet":
        from .models.pretrained import imagenet_normalization
        return imagenet_normalization(m.backbone)
    return None, None


def cls_transform(cfg: Config, train: bool):
    """The train or evaluation transform of a classification config (``data.preset``, ``data.img_size``,
    normalised as :func:`normalization` says)."""
    from .data.transforms import build_cls_transform
    return build_cls_transform(cfg.data.preset, train, cfg.data.img_size, *normalization(cfg))


def _seg_transform(cfg: Config, train: bool):
    from .data.seg_transforms import build_seg_transforms
    d = cfg.data
    mean, std = normalization(cfg)
    return build_seg_transforms(train, crop_size=tuple(d.crop_size), scale=tuple(d.scale) if d.scale else None,
                                ratio_range=tuple(d.ratio_range), cat_max_ratio=d.cat_max_ratio,
                                photometric=d.photometric, **({"mean": mean, "std": std} if mean is not None else {}))


def _check_root(cfg: Config) -> None:
    d = cfg.data
    if d.root is None and d.dataset != "digits":
        raise ConfigError(f"data.root must be set for dataset {d.dataset} (the folder that holds it)")


def _seg_split(cfg: Config, split: str, transforms) -> "torch.utils.data.Dataset":
    from .data.segmentation import build_seg_dataset, check_masks
    d = cfg.data
    kw = dict(d.dataset_kwargs)
    if d.dataset == "folder":
        kw.setdefault("num_classes", d.num_classes)  # a folder of masks has the classes of the config
    ds = build_seg_dataset(d.dataset, d.root, split, transforms, **kw)
    if ds.num_classes != d.num_classes:
        raise ConfigError(f"dataset {d.dataset} has {ds.num_classes} classes but data.num_classes={d.num_classes}")
    if d.check_labels:
        check_masks(ds, num_workers=d.num_workers)
    return ds


def training_subset(cfg: Config, train):
    """The training set as training sees it: with ``data.train_subset=N``, its fixed class-balanced
    subset of N samples (:func:`~dnc.data.subset.balanced_subset`)."""
    if not cfg.data.train_subset:
        return train
    from .data.subset import balanced_subset
    return balanced_subset(train, cfg.data.train_subset)


def build_datasets(cfg: Config, splits=("train", "val")) -> tuple:
    """``({split: dataset}, classes)``, with the labels checked against ``data.num_classes``."""
    _check_root(cfg)
    out = {}
    for split in splits:
        train = split == "train"
        if cfg.task == "classification":
            ds = build_cls_split(cfg, split, cls_transform(cfg, train))
        else:
            ds = _seg_split(cfg, split, _seg_transform(cfg, train))
        out[split] = training_subset(cfg, ds) if train else ds
    classes = list(getattr(next(iter(out.values())), "classes", [])) if out else []
    return out, classes


def build_eval_split(cfg: Config, split: str = "val") -> Tuple["torch.utils.data.Dataset", dict]:
    """Any split of the data root with the evaluation transform, and what it is.

    ``val`` is the validation set of training (with ``data.holdout=N``: the N training images held out,
    not ``root/val``); ``train`` the training set. Other names: an image folder's ``root/<split>``
    (classes of the training folder), CIFAR's ``test`` batch, the named splits of segmentation datasets
    (CamVid ``test``, Cityscapes ``test``/``val``, ``folder``'s ``img_dir/<split>``).

    Returns ``(dataset, {"split", "root", "samples", "holdout", "source"})``, ``source`` in words.
    """
    d = cfg.data
    _check_root(cfg)
    where = d.root if d.root is not None else "the built-in digits"
    if cfg.task == "segmentation":
        ds = _seg_split(cfg, split, _seg_transform(cfg, False))
        source = f"split {split!r} of {where}"
    elif split in ("train", "val"):
        ds = build_cls_split(cfg, split, cls_transform(cfg, False))
        source = f"split {split!r} of {where}"
        if split == "val" and d.holdout:
            source = (f"the {d.holdout} training images held out for validation (data.holdout={d.holdout}) "
                      f"of {where}" + (", not its val/ folder" if d.dataset == "imagefolder" else ""))
    else:
        ds = _other_cls_split(cfg, split)
        source = f"split {split!r} of {where}"
    info = {"split": split, "root": d.root, "samples": len(ds),
            "holdout": d.holdout if split == "val" and cfg.task == "classification" else 0, "source": source}
    return ds, info


def _other_cls_split(cfg: Config, split: str):
    """A classification split other than train/val: ``root/<split>`` of an image folder, CIFAR's ``test``."""
    from .data.classification import CIFAR, ImageFolder, check_labels, find_classes
    d = cfg.data
    tf = cls_transform(cfg, False)
    if d.dataset == "imagefolder":
        root = Path(d.root)
        train_dir = root / "train" if (root / "train").is_dir() else root
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split}: split folder not found (splits are the sub-folders of data.root)")
        kw = {k: v for k, v in d.dataset_kwargs.items() if k in ("classes", "extensions")}
        kw.setdefault("classes", find_classes(train_dir))
        ds = ImageFolder(root / split, transform=tf, on_bad=d.on_bad_sample, **kw)
    elif d.dataset in ("cifar10", "cifar100") and split == "test":
        ds = CIFAR(d.root, train=False, variant=d.dataset, transform=tf)
    else:
        valid = "train, val, test" if d.dataset in ("cifar10", "cifar100") else "train, val"
        raise ConfigError(f"--split {split!r}: dataset {d.dataset} has the splits {valid}")
    if d.check_labels:
        check_labels(ds, d.num_classes, f"{d.dataset}/{split}")
    return ds


def load_trained_model(cfg: Config, ckpt: dict, path) -> nn.Module:
    """The model of ``cfg`` with the weights of checkpoint ``ckpt`` (loaded from ``path``)."""
    model = build_model(cfg, pretrained="")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        lines = str(e).splitlines()
        why = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise ConfigError(f"{path}: does not fit the model of the config: {why}") from None
    return model


def checkpoint_config(ckpt: dict, path, overrides: Sequence[str] = ()) -> Config:
    """The config saved in a ``dnc train`` / ``dnc explain`` checkpoint, with ``key=value`` overrides."""
    from .config import _override
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: has no saved config; pass the config file too (dnc test CONFIG CHECKPOINT)")
    data = saved
    for item in overrides:
        data = _override(data, item)
    return from_dict(Config, data).validate()


class _SegImageTransform:
    """A segmentation evaluation pipeline applied to an image alone (a dummy mask goes along)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF
        image = TF.to_image(image)
        return self.pipeline(image, torch.zeros(image.shape[-2:], dtype=torch.uint8))[0].as_subclass(torch.Tensor)


def eval_transform(cfg: Config) -> Callable:
    """The evaluation transform of a config for single images (PIL or ``(3, H, W)`` uint8 tensors),
    giving a float ``(3, H, W)`` tensor. Classification inputs of any size are first resized to the
    fixed input size of the ``cifar``/``digits`` presets (32 and 8 unless ``data.img_size``);
    segmentation images are rescaled as in evaluation (``data.scale``)."""
    d = cfg.data
    if cfg.task == "segmentation":
        return _SegImageTransform(_seg_transform(cfg, False))
    tf = cls_transform(cfg, False)
    side = d.img_size or {"cifar": 32, "digits": 8}.get(d.preset)
    if d.preset in ("cifar", "digits") and side:
        from torchvision.transforms import v2
        return v2.Compose([v2.ToImage(), v2.Resize((side, side), antialias=True), tf])
    return tf


def load_model(checkpoint, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, list, Callable]:
    """``(model, classes, transform)`` of a ``dnc train`` / ``dnc explain`` checkpoint, ready to predict.

    ``model`` is in eval mode on ``device``; ``model(transform(image)[None])`` gives class logits
    ``(1, C)`` (classification) or ``(1, C, h, w)`` at the decoder's resolution (segmentation).
    ``classes`` are the class names (``"0"``, ``"1"``, ... when the checkpoint has none).
    """
    from .engine import load_checkpoint
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, checkpoint)
    model = load_trained_model(cfg, ckpt, checkpoint).to(device).eval()
    classes = list(ckpt.get("classes") or [str(i) for i in range(cfg.data.num_classes)])
    return model, classes, eval_transform(cfg)


def build_eval_loader(cfg: Config, dataset, info: DistInfo):
    bs = cfg.data.eval_batch_size or (cfg.data.batch_size if cfg.task == "classification" else 1)
    return make_loader(dataset, bs, False, info, cfg.train.seed, cfg.data.num_workers, collate_fn(cfg),
                       on_bad=cfg.data.on_bad_sample)


def autocast(cfg: Config, device: torch.device):
    """The mixed-precision context of ``train.amp`` for inference."""
    if cfg.train.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16)


def _sample_path(dataset, index: int) -> Optional[str]:
    name = getattr(dataset, "sample_name", None)
    return name(index) if name is not None else None


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
    from tqdm import tqdm
    model = unwrap(model).eval()
    skipped = 0
    bar = tqdm(loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True,
               disable=not (progress and info.is_main and sys.stderr.isatty()))  # no bar in logs
    c = cfg.data.num_classes
    if cfg.task == "classification":
        from .metrics import Accuracy, ConfusionMatrix
        metric = Accuracy(topk=(1, 5) if c > 5 else (1,), device=info.device)
        confusion = ConfusionMatrix(c, device=info.device) if details else None
        records = []
        dataset = getattr(loader.dataset, "dataset", loader.dataset)  # inside make_loader's SeededDataset
        for images, targets, bad, index in bar:
            skipped += bad
            if len(targets) == 0:
                continue
            images, targets = images.to(info.device), targets.to(info.device)
            with autocast(cfg, info.device):
                logits = model(images).float()
            metric.update(logits, targets)
            if confusion is not None:
                confusion.update(logits.argmax(1), targets)
            if predictions:
                prob, top = logits.softmax(1).topk(min(5, logits.shape[1]), dim=1)
                for i, sample in enumerate(index.tolist()):
                    records.append({"index": sample, "path": _sample_path(dataset, sample),
                                    "label": int(targets[i]), "pred": int(top[i, 0]), "topk": top[i].tolist(),
                                    "scores": [round(p, 6) for p in prob[i].tolist()]})
        result = metric.compute()
        if confusion is not None:
            cm = confusion.compute()
            result["per_class_accuracy"] = ConfusionMatrix.recall(cm)
            result["confusion"] = cm.tolist()
        if predictions:
            result["predictions"] = sorted(_gather_objects(records), key=lambda r: r["index"])
        return _with_skipped(cfg, result, skipped)
    from .metrics import SegMetric
    from .models.seg_inference import seg_inference
    d = cfg.data
    metric = SegMetric(c, device=info.device)
    for images, masks, bad, _ in bar:
        skipped += bad
        if len(masks) == 0:
            continue
        images, masks = images.to(info.device), masks.to(info.device)
        with autocast(cfg, info.device):
            logits = seg_inference(model, images, c, tuple(masks.shape[-2:]), mode=d.eval_mode,
                                   crop_size=tuple(d.eval_crop or d.crop_size),
                                   stride=tuple(d.eval_stride) if d.eval_stride else None,
                                   scales=tuple(d.eval_scales), flip=d.eval_flip)
        metric.update(logits.argmax(1), masks)
    return _with_skipped(cfg, metric.compute(), skipped)


def _with_skipped(cfg: Config, result: dict, skipped: int) -> dict:
    if cfg.data.on_bad_sample == "skip":
        result["skipped"] = sum(_gather_objects([skipped]))
    return result


def _gather_objects(items: list) -> list:
    if not dist.is_initialized():
        return items
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


@torch.no_grad()
def init_centroids_from_data(cfg: Config, model: nn.Module, dataset, info: DistInfo) -> None:
    """``model.dnc.init = kmeans++``: cluster embeddings of up to ``init_samples`` training samples
    (pixels for segmentation), computed by the freshly built network, to place the sub-centroids."""
    net = unwrap(model)
    if cfg.model.head != "dnc" or cfg.model.dnc.init != "kmeans++":
        return
    loader = make_loader(dataset, cfg.data.batch_size, True, info, cfg.train.seed + 1, cfg.data.num_workers,
                         collate_fn(cfg), on_bad=cfg.data.on_bad_sample)
    zs, ys, n = [], [], 0
    was_training = net.training
    net.eval()
    goal, start = cfg.model.dnc.init_samples, time.perf_counter()
    what = "pixels" if cfg.task == "segmentation" else "samples"
    say = print if info.is_main else (lambda *a, **k: None)
    say(f"k-means++ start: embedding up to {goal} training {what}", flush=True)
    for step, (images, targets, _, _) in enumerate(loader, 1):
        if len(targets) == 0:
            continue
        z, y = net.embeddings(images.to(info.device), targets.to(info.device))
        zs.append(z.float())
        ys.append(y)
        n += len(y)
        if n >= cfg.model.dnc.init_samples:
            break
        if step % 10 == 0:
            say(f"k-means++ start: {n} {what} embedded ({time.perf_counter() - start:.0f} s)", flush=True)
    z, y = torch.cat(zs)[: cfg.model.dnc.init_samples], torch.cat(ys)[: cfg.model.dnc.init_samples]
    net.train(was_training)
    net.head_module().centroids.init_from_embeddings(z, y, generator=torch.Generator().manual_seed(cfg.train.seed))
    say(f"k-means++ start: {len(y)} embeddings clustered ({time.perf_counter() - start:.0f} s)", flush=True)
