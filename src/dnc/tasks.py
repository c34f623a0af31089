"""What differs between classification and segmentation: datasets, model, transforms, the k-means++ start.

The engine trains any model whose ``forward(images, targets)`` returns ``(logits, losses)``; this
module builds those pieces from a :class:`~dnc.config.Config`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import Config, ConfigError, load_config
from .engine import DistInfo, make_loader
from .runconfig import check_root, checkpoint_classes, checkpoint_config, resolve_num_classes, resolve_preprocessing

log = logging.getLogger("dnc")

__all__ = ["build_model", "build_cls_split", "build_datasets", "build_eval_split", "load_trained_model", "load_model",
           "normalization", "cls_transform", "preprocessing", "input_size", "eval_transform", "build_eval_loader",
           "metric_key", "head_kwargs", "collate_fn", "init_centroids_from_data", "check_classes", "training_subset"]


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
    cfg = resolve_num_classes(cfg)
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
        model = Classifier(m.backbone, cfg.data.num_classes, m.head, weights, m.backbone_kwargs, head_kwargs(cfg))
    else:
        from .models.segmenter import Segmenter
        model = Segmenter(m.backbone, cfg.data.num_classes, m.decoder, m.head, weights, m.backbone_kwargs,
                          head_kwargs(cfg), m.decoder_channels, m.output_stride, m.aux_weight)
    # Labels checked up front (data.check_labels) need no check in every step (a host read: a GPU sync).
    model.head_module().check_labels = not cfg.data.check_labels
    return model


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
    """``(mean, std)`` of the input normalisation: ``data.mean``/``data.std`` if set, else the pretrained
    weights' (:func:`resolve_preprocessing`), else ``(None, None)`` (the preset's)."""
    d = resolve_preprocessing(cfg).data
    return (tuple(d.mean), tuple(d.std)) if d.mean is not None else (None, None)


def cls_transform(cfg: Config, train: bool):
    """The train or evaluation transform of a classification config (``data.preset``, ``data.img_size``,
    ``data.interpolation``, ``data.crop_pct``, normalised as :func:`normalization` says), with the
    pretrained weights' values where the config leaves them open (:func:`resolve_preprocessing`)."""
    from .data.transforms import build_cls_transform
    d = resolve_preprocessing(cfg).data
    return build_cls_transform(d.preset, train, d.img_size, d.mean, d.std, d.interpolation, d.crop_pct)


def preprocessing(cfg: Config) -> dict:
    """The evaluation pipeline of a config as plain data (what :func:`eval_transform` does to an 8-bit RGB
    image; ``dnc export`` writes it into the exported model): ``resize`` (``"shorter"``, ``"exact"``,
    ``"fit"`` or ``None``) to ``size`` with ``interpolation``/``antialias``, a centre ``crop`` ``[h, w]``,
    then ``(pixel / 255 - mean) / std``; ``input_size`` is what the network sees (``None``: any size).
    See :func:`dnc.data.transforms.eval_pipeline`; ``"fit"`` (segmentation) fits the image into
    ``size`` keeping its aspect ratio (:func:`dnc.data.seg_transforms.rescale_size`)."""
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_pipeline
    d = resolve_preprocessing(cfg).data
    if cfg.task == "classification":
        return eval_pipeline(d.preset, d.img_size, d.mean, d.std, d.interpolation, d.crop_pct)
    return {"resize": "fit" if d.scale else None, "size": list(d.scale) if d.scale else None, "crop": None,
            "crop_pct": None, "interpolation": "bilinear", "antialias": False,
            "mean": list(d.mean or IMAGENET_MEAN), "std": list(d.std or IMAGENET_STD), "input_size": None}


def _seg_transform(cfg: Config, train: bool):
    from .data.seg_transforms import build_seg_transforms
    d = cfg.data
    mean, std = normalization(cfg)
    return build_seg_transforms(train, crop_size=tuple(d.crop_size), scale=tuple(d.scale) if d.scale else None,
                                ratio_range=tuple(d.ratio_range), cat_max_ratio=d.cat_max_ratio,
                                photometric=d.photometric, **({"mean": mean, "std": std} if mean is not None else {}))


def _seg_split(cfg: Config, split: str, transforms, mark_left_out: bool = False) -> "torch.utils.data.Dataset":
    from .data.segmentation import IGNORE_INDEX, LEFT_OUT_INDEX, build_seg_dataset, check_masks
    d = cfg.data
    kw = dict(d.dataset_kwargs)
    if d.dataset == "folder":
        kw.setdefault("num_classes", d.num_classes)  # a folder of masks has the classes of the config
    ds = build_seg_dataset(d.dataset, d.root, split, transforms, LEFT_OUT_INDEX if mark_left_out else IGNORE_INDEX, **kw)
    if ds.num_classes != d.num_classes:
        chosen = " (data.dataset_kwargs.classes)" if ds.left_out else ""
        raise ConfigError(f"dataset {d.dataset} has {ds.num_classes} classes{chosen} but data.num_classes={d.num_classes}")
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
    check_root(cfg)
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


def build_eval_split(cfg: Config, split: str = "val", mark_left_out: bool = False) -> Tuple["torch.utils.data.Dataset", dict]:
    """Any split of the data root with the evaluation transform, and what it is.

    ``val`` is the validation set of training (with ``data.holdout=N``: the N training images held out,
    not ``root/val``); ``train`` the training set. Other names: an image folder's ``root/<split>``
    (classes of the training folder), CIFAR's ``test`` batch, the named splits of segmentation datasets
    (CamVid ``test``, Cityscapes ``test``/``val``, ``folder``'s ``img_dir/<split>``).

    ``mark_left_out``: the pixels of the classes a segmentation subset leaves out
    (``data.dataset_kwargs.classes``) read as ``LEFT_OUT_INDEX``, not ignored (``dnc test --ood-pixels``).

    Returns ``(dataset, {"split", "root", "samples", "holdout", "source"})``, ``source`` in words.
    """
    d = cfg.data
    check_root(cfg)
    where = d.root if d.root is not None else "the built-in digits"
    if cfg.task == "segmentation":
        ds = _seg_split(cfg, split, _seg_transform(cfg, False), mark_left_out)
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


def input_size(cfg: Config) -> Optional[tuple]:
    """``(H, W)`` of the model's evaluation input: a segmenter's ``data.eval_crop`` (or ``crop_size``); a
    classifier's ``data.img_size`` or its preset's (digits 8, cifar 32, imagenet and swin 224); None for
    preset ``none``, whose images keep their size."""
    d = cfg.data
    if cfg.task == "segmentation":
        return tuple(d.eval_crop or d.crop_size)
    size = preprocessing(cfg)["input_size"]
    return None if size is None else tuple(size)


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
    giving a float ``(3, H, W)`` tensor, as :func:`preprocessing` describes it. Classification inputs of
    any size are resized to the fixed input size of the ``cifar``/``digits`` presets (32 and 8 unless
    ``data.img_size``); segmentation images are rescaled as in evaluation (``data.scale``)."""
    if cfg.task == "segmentation":
        return _SegImageTransform(_seg_transform(cfg, False))
    return cls_transform(cfg, False)


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
    return model, checkpoint_classes(ckpt, cfg, checkpoint), eval_transform(cfg)


def build_eval_loader(cfg: Config, dataset, info: DistInfo):
    bs = cfg.data.eval_batch_size or (cfg.data.batch_size if cfg.task == "classification" else 1)
    return make_loader(dataset, bs, False, info, cfg.train.seed, cfg.data.num_workers, collate_fn(cfg),
                       on_bad=cfg.data.on_bad_sample)


@torch.no_grad()
def init_centroids_from_data(cfg: Config, model: nn.Module, dataset, info: DistInfo) -> None:
    """``model.dnc.init = kmeans++``: cluster embeddings of up to ``init_samples`` training samples
    (pixels for segmentation), computed by the freshly built network, to place the sub-centroids. Under
    DDP each process embeds its share, ``ceil(init_samples / world)``, and the start clusters them all."""
    from .embedding import embed, head_of
    if cfg.model.head != "dnc" or cfg.model.dnc.init != "kmeans++":
        return
    loader = make_loader(dataset, cfg.data.batch_size, True, info, cfg.train.seed + 1, cfg.data.num_workers,
                         collate_fn(cfg), on_bad=cfg.data.on_bad_sample)
    share = -(-cfg.model.dnc.init_samples // info.world)  # this process's part of the start set
    what, start = ("pixels" if cfg.task == "segmentation" else "samples"), time.perf_counter()
    say = log.info if info.is_main else (lambda message: None)
    say(f"k-means++ start: embedding up to {cfg.model.dnc.init_samples} training {what}")
    z, y = embed(model, loader, info.device, limit=share,
                 progress=lambda n: say(f"k-means++ start: {n} {what} embedded ({time.perf_counter() - start:.0f} s)"))
    head_of(model).centroids.init_from_embeddings(z, y, generator=torch.Generator().manual_seed(cfg.train.seed))
    say(f"k-means++ start: {len(y)} embeddings clustered ({time.perf_counter() - start:.0f} s)")
