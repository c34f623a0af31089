"""A run's config made explicit and read back: what a config leaves open is resolved once, from the data
(the number of classes) and from the pretrained weights (normalisation, resizing), and ``dnc train``
saves the result, so that every later command reads a checkpoint's config as the run used it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from .config import Config, ConfigError, from_dict, load_config

__all__ = ["check_root", "resolve_num_classes", "resolve_preprocessing", "resolve_config", "checkpoint_config",
           "checkpoint_classes", "command_config"]


_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "ade20k": 150, "cityscapes": 19, "camvid": 11}


def resolve_num_classes(cfg: Config) -> Config:
    """``cfg`` with ``data.num_classes`` set where it is None: the class folders of an image folder
    (``root/train``'s, or ``root``'s), ``dataset_kwargs.classes``, or the dataset's fixed number."""
    d = cfg.data
    if d.num_classes is not None:
        return cfg
    n = len(d.dataset_kwargs["classes"]) if d.dataset_kwargs.get("classes") else _CLASSES.get(d.dataset)
    if d.dataset == "folder" and n is None:
        n = d.dataset_kwargs.get("num_classes")
    if d.dataset == "imagefolder" and n is None:
        check_root(cfg)
        from .data.classification import find_classes
        root = Path(d.root)
        n = len(find_classes(root / "train" if (root / "train").is_dir() else root))
        if n == 0:
            raise ConfigError(f"{d.root}: no class folders found (data.root holds one folder per class)")
    if n is None:
        raise ConfigError(f"data.num_classes must be set for dataset {d.dataset} (the number of classes of its masks)")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, num_classes=n))


_WEIGHT_SIZED = ("imagenet", "swin")  # presets whose input size and resizing are the weights' (not the dataset's)


def resolve_preprocessing(cfg: Config) -> Config:
    """``cfg`` with its normalisation and resizing made explicit: the pretrained weights' where the config
    leaves them to them (:func:`_weights_preprocessing`), then the preset's ``data.mean``/``data.std``
    (segmentation: ImageNet's), so that a saved config never says ``null`` for what a run used."""
    cfg = _weights_preprocessing(cfg)
    d = cfg.data
    if d.mean is not None or (cfg.task == "classification" and d.preset == "none"):
        return cfg
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, preset_defaults
    defaults = preset_defaults(d.preset) if cfg.task == "classification" else {}
    mean, std = defaults.get("mean", list(IMAGENET_MEAN)), defaults.get("std", list(IMAGENET_STD))
    return dataclasses.replace(cfg, data=dataclasses.replace(d, mean=list(mean), std=list(std)))


def _weights_preprocessing(cfg: Config) -> Config:
    """``cfg`` with the preprocessing of its pretrained weights where the config leaves it to them (None).

    From the weights' timm ``pretrained_cfg`` (:func:`~dnc.models.pretrained.weights_data_config`):
    ``data.mean``/``data.std`` always; for the ``imagenet``/``swin`` presets also ``data.interpolation``,
    ``data.crop_pct`` and ``data.img_size`` (the ``cifar``/``digits`` presets keep the dataset's size and
    resizing). Without pretrained weights, or with preset ``none``, nothing changes (the preset's
    defaults apply). Values given in the config win. ``dnc train`` writes the result into the run's
    config.yaml and checkpoints, so that every later command reads the same values."""
    d, m = cfg.data, cfg.model
    if (d.mean is None) != (d.std is None):
        raise ConfigError("set both data.mean and data.std, or neither")
    sized = cfg.task == "classification" and d.preset in _WEIGHT_SIZED
    keys = ["mean", "std"] + (["interpolation", "crop_pct", "img_size"] if sized else [])
    missing = [k for k in keys if getattr(d, k) is None]
    if not m.pretrained or not missing or (cfg.task == "classification" and d.preset == "none"):
        return cfg
    from .models.pretrained import weights_data_config
    weights = weights_data_config(m.backbone, m.pretrained, m.backbone_kwargs)
    if not weights:
        return cfg
    found = {"mean": weights.get("mean"), "std": weights.get("std"), "interpolation": weights.get("interpolation"),
             "crop_pct": weights.get("crop_pct"),
             "img_size": weights["input_size"][-1] if weights.get("input_size") else None}
    if d.mean is not None or found["mean"] is None or found["std"] is None:
        missing = [k for k in missing if k not in ("mean", "std")]
    new = {k: [float(v) for v in found[k]] if k in ("mean", "std") else found[k]
           for k in missing if found[k] is not None}
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **new)) if new else cfg


def resolve_config(cfg: Config) -> Config:
    """The config of a run with what it leaves to the data and the weights filled in:
    :func:`resolve_num_classes` and :func:`resolve_preprocessing` (idempotent; given values win)."""
    return resolve_preprocessing(resolve_num_classes(cfg))


def checkpoint_classes(ckpt: dict, cfg: Config, path) -> list:
    """The class names of a checkpoint (``"0"``, ``"1"``, ... when it has none), checked: one per class
    of the model, each a valid name (:func:`~dnc.validate.check_class_names`)."""
    from .validate import check_class_names
    classes = check_class_names(ckpt.get("classes") or [str(i) for i in range(cfg.data.num_classes)], path,
                                separators=True)
    if len(classes) != cfg.data.num_classes:
        raise ConfigError(f"{path}: holds {len(classes)} class names for a model of {cfg.data.num_classes} classes")
    return classes


def checkpoint_config(ckpt: dict, path, overrides: Sequence[str] = ()) -> Config:
    """The config saved in a ``dnc train`` / ``dnc explain`` checkpoint, with ``key=value`` overrides."""
    from .config import _override
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: has no saved config; pass the config file too (dnc test CONFIG CHECKPOINT)")
    data = _as_trained(saved)
    for item in overrides:
        data = _override(data, item)
    return from_dict(Config, data).validate()


def _as_trained(saved: dict) -> dict:
    """A config saved before ``dnc train`` wrote the weights' preprocessing into it (no ``data.crop_pct``
    key) with pretrained weights: the preprocessing it was trained with made explicit (the preset's, and
    the pip weights' mean and std for ``model.pretrained=imagenet``), so that it is not resolved anew."""
    data, model = saved.get("data") or {}, saved.get("model") or {}
    if "crop_pct" in data or not model.get("pretrained"):
        return saved
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, preset_defaults
    if saved.get("task", "classification") == "classification":
        then = preset_defaults(data.get("preset", "none"))
    else:
        then = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if model["pretrained"] == "imagenet" and then:
        then["mean"], then["std"] = [0.5] * 3, [0.5] * 3  # what normalization() gave these runs
    fill = {k: v for k, v in then.items() if data.get(k) is None and v is not None}
    if data.get("mean") is not None:  # mean and std were given together
        fill.pop("mean", None), fill.pop("std", None)
    return {**saved, "data": {**data, **fill, "crop_pct": fill.get("crop_pct", data.get("crop_pct"))}}


def command_config(config: Optional[str], ckpt: dict, checkpoint, overrides: Sequence[str] = ()) -> Config:
    """The config of a command on a checkpoint: the YAML file ``config`` with the ``key=value`` overrides,
    resolved as ``dnc train`` resolves a run's (:func:`resolve_config`); without a file, the config the
    checkpoint holds (with the overrides)."""
    if config:
        return resolve_config(load_config(str(config), tuple(overrides)))
    return checkpoint_config(ckpt, checkpoint, overrides)


def check_root(cfg: Config) -> None:
    d = cfg.data
    if d.root is None and d.dataset != "digits":
        raise ConfigError(f"data.root must be set for dataset {d.dataset} (the folder that holds it)")
