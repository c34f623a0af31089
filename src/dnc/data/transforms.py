"""Image transforms for classification, built with ``torchvision.transforms.v2``.

Every preset accepts what the datasets in :mod:`dnc.data.classification` return (a
``tv_tensors.Image`` uint8 ``(3, H, W)``), and also a PIL image or a uint8 tensor, and produces
a plain float32 ``(3, H, W)`` tensor, normalised by ``mean``/``std`` (except ``'none'``).
Geometric and colour operations run on uint8 and are converted to float afterwards, as in
torchvision's reference scripts.

The presets follow the original DNC (MMClassification 0.18) recipes:

``'cifar'``
    train: RandomCrop 32, padding 4 (zero fill) + HorizontalFlip 0.5 + Normalize;
    eval: Resize to ``img_size`` x ``img_size`` (a no-op on 32x32 CIFAR images) + Normalize. CIFAR-10
    mean/std by default; pass ``CIFAR100_MEAN/STD`` for CIFAR-100. ``img_size`` other than 32 first
    resizes the training images to ``img_size`` too.
``'imagenet'``
    train: RandomResizedCrop 224 (bilinear, scale 0.08-1, ratio 3/4-4/3) + HorizontalFlip 0.5;
    eval: Resize short side ``int(img_size / crop_pct)`` (crop_pct 0.875 unless given: 256 for 224)
    + CenterCrop ``img_size``.
``'swin'``
    train: RandomResizedCrop 224 bicubic + HorizontalFlip 0.5 + RandAugment + Normalize
    + RandomErasing (p 0.25, area 0.02-1/3, ratio 0.3-3.3, standard-normal fill on the
    normalised image, i.e. ``value='random'``, which equals mmcls' ``mode='rand'`` filling with
    N(mean, std) before normalisation); eval: Resize 256 bicubic + CenterCrop 224 (as ``'imagenet'``).
    RandAugment is torchvision's (2 ops, magnitude 9 on an 11-bin scale, i.e. 9/10 of each
    op's maximum like timm's ``rand-m9``; fill = mean pixel, like mmcls' ``pad_val``).
    Differences from timm's ``rand-m9-mstd0.5-inc1`` used by the original: no per-op magnitude
    noise (mstd 0.5), torchvision's op list and ranges, and bilinear instead of bicubic for the
    rotate/shear/translate ops (tensor images support only nearest and bilinear there).
``'digits'``
    8x8 scikit-learn digits: train adds a small random shift (RandomCrop 8, padding 1);
    normalise with mean 0.5, std 0.5. ``img_size`` None keeps 8x8 (evaluation resizes other images to
    8x8); otherwise images are first resized to ``img_size`` and the shift padding becomes
    ``max(1, img_size // 8)``.
``'none'``
    convert to float32 in [0, 1] only (takes no size, mean, std or interpolation).

Every evaluation pipeline is also described as data by :func:`eval_pipeline` (what ``dnc export``
writes into an exported model for a runtime without PyTorch); the evaluation transform is built from
that description, so the two cannot differ.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torchvision.transforms import v2
from torchvision.transforms import InterpolationMode

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "CROP_PCT", "build_cls_transform", "eval_pipeline", "preset_defaults",
]

# The values of the original mmcls configs (pixel units / 255).
CIFAR10_MEAN = tuple(v / 255 for v in (125.307, 122.961, 113.8575))
CIFAR10_STD = tuple(v / 255 for v in (51.5865, 50.847, 51.255))
CIFAR100_MEAN = tuple(v / 255 for v in (129.304, 124.070, 112.434))
CIFAR100_STD = tuple(v / 255 for v in (68.170, 65.392, 70.418))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)

PRESETS = ("cifar", "imagenet", "swin", "digits", "none")
CROP_PCT = 0.875  # imagenet/swin evaluation: the centre crop's share of the resized short side (224 of 256)

# preset -> (default img_size, default mean, default std, default interpolation)
_DEFAULTS = {
    "cifar": (32, CIFAR10_MEAN, CIFAR10_STD, InterpolationMode.BILINEAR),
    "imagenet": (224, IMAGENET_MEAN, IMAGENET_STD, InterpolationMode.BILINEAR),
    "swin": (224, IMAGENET_MEAN, IMAGENET_STD, InterpolationMode.BICUBIC),
    "digits": (None, DIGITS_MEAN, DIGITS_STD, InterpolationMode.BILINEAR),
}


def preset_defaults(preset: str) -> dict:
    """What ``preset`` uses where nothing else is given: ``img_size``, ``mean``, ``std``, ``interpolation``
    and (imagenet, swin) ``crop_pct``; empty for ``'none'``."""
    if preset not in _DEFAULTS:
        return {}
    size, mean, std, interp = _DEFAULTS[preset]
    out = {"img_size": size, "mean": list(mean), "std": list(std), "interpolation": interp.value}
    return {**out, "crop_pct": CROP_PCT} if preset in ("imagenet", "swin") else out


def _interpolation(value: Union[str, InterpolationMode, None], default: InterpolationMode) -> InterpolationMode:
    if value is None:
        return default
    if isinstance(value, InterpolationMode):
        return value
    try:
        return InterpolationMode(str(value).lower())
    except ValueError:
        names = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"interpolation: unknown mode {value!r} (expected one of: {names})") from None


def _triple(name: str, value: Sequence[float]) -> tuple:
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name}: expected 3 values (one per RGB channel), got {len(value)}")
    return value


def _check_none(preset: str, **given) -> None:
    given = [k for k, v in given.items() if v is not None]
    if preset == "none" and given:
        raise ValueError(f"transform preset 'none' takes no {', '.join(given)}")


def eval_pipeline(
    preset: str,
    img_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    interpolation: Union[str, InterpolationMode, None] = None,
    crop_pct: Optional[float] = None,
) -> dict:
    """The evaluation pipeline of ``preset`` as plain data (JSON-ready), applied in this order to an
    8-bit RGB image:

    * ``resize``: ``"shorter"`` (the short side becomes ``size``, the other ``int(size * long / short)``),
      ``"exact"`` (to ``size`` = ``[h, w]``) or ``None``; with ``interpolation`` and ``antialias``,
      the result rounded back to 8 bits;
    * ``crop``: ``[h, w]`` of a centre crop (top ``round((H - h) / 2)``, Python's rounding), or ``None``;
    * ``(pixel / 255 - mean) / std`` per channel;

    ``input_size`` is the ``[h, w]`` the network then sees (``None``: any). ``crop_pct`` is the crop's
    share of the resized short side (``"shorter"`` only).
    """
    if preset not in PRESETS:
        raise ValueError(f"transform preset {preset!r} is unknown (expected one of: {', '.join(PRESETS)})")
    if preset == "none":
        _check_none(preset, img_size=img_size, mean=mean, std=std, interpolation=interpolation)
        return {"resize": None, "size": None, "crop": None, "crop_pct": None, "interpolation": None,
                "antialias": False, "mean": [0.0] * 3, "std": [1.0] * 3, "input_size": None}
    default_size, default_mean, default_std, default_interp = _DEFAULTS[preset]
    size = (default_size or 8) if img_size is None else int(img_size)
    if size <= 0:
        raise ValueError(f"img_size: must be a positive integer, got {img_size!r}")
    crop_pct = CROP_PCT if crop_pct is None else float(crop_pct)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct: must be in (0, 1], got {crop_pct}")
    out = {"resize": "exact", "size": [size, size], "crop": None, "crop_pct": None,
           "interpolation": _interpolation(interpolation, default_interp).value, "antialias": True,
           "mean": list(_triple("mean", default_mean if mean is None else mean)),
           "std": list(_triple("std", default_std if std is None else std)), "input_size": [size, size]}
    if preset in ("imagenet", "swin"):
        out.update(resize="shorter", size=int(size / crop_pct), crop=[size, size], crop_pct=crop_pct)
    return out


def _eval_transform(p: dict) -> v2.Compose:
    """The evaluation transform of an :func:`eval_pipeline` description."""
    ops = [v2.ToImage()]
    if p["resize"] is not None:
        ops.append(v2.Resize(p["size"] if p["resize"] == "shorter" else tuple(p["size"]),
                             interpolation=InterpolationMode(p["interpolation"]), antialias=p["antialias"]))
    if p["crop"] is not None:
        ops.append(v2.CenterCrop(tuple(p["crop"])))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if p["resize"] is not None:  # preset 'none' is not normalised
        ops.append(v2.Normalize(p["mean"], p["std"]))
    return v2.Compose(ops + [v2.ToPureTensor()])


def build_cls_transform(
    preset: str,
    train: bool,
    img_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    interpolation: Union[str, InterpolationMode, None] = None,
    crop_pct: Optional[float] = None,
) -> v2.Compose:
    """Return the train or eval transform of ``preset`` (see the module docstring).

    Args:
        preset: one of ``'cifar'``, ``'imagenet'``, ``'swin'``, ``'digits'``, ``'none'``.
        train: training-time augmentation if True, else the deterministic eval pipeline.
        img_size: output side length; None uses the preset's default (32, 224, 224, 8x8 kept).
        mean, std: per-channel normalisation in [0, 1] units; None uses the preset's default.
        interpolation: resize interpolation (``'bilinear'``, ``'bicubic'``, ... or an
            ``InterpolationMode``); None uses the preset's default.
        crop_pct: imagenet/swin evaluation: the centre crop's share of the resized short side;
            None uses 0.875 (other presets ignore it).

    Returns:
        A ``v2.Compose`` mapping an image to a plain float32 ``(3, H, W)`` tensor.
    """
    if not train:
        return _eval_transform(eval_pipeline(preset, img_size, mean, std, interpolation, crop_pct))
    if preset not in PRESETS:
        raise ValueError(f"transform preset {preset!r} is unknown (expected one of: {', '.join(PRESETS)})")
    if preset == "none":
        _check_none(preset, img_size=img_size, mean=mean, std=std, interpolation=interpolation)
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])

    default_size, default_mean, default_std, default_interp = _DEFAULTS[preset]
    size = default_size if img_size is None else int(img_size)
    if size is not None and size <= 0:
        raise ValueError(f"img_size: must be a positive integer, got {img_size!r}")
    mean = _triple("mean", default_mean if mean is None else mean)
    std = _triple("std", default_std if std is None else std)
    interp = _interpolation(interpolation, default_interp)

    ops = [v2.ToImage()]  # training from here on
    if preset == "cifar":
        if size != 32:
            ops.append(v2.Resize((size, size), interpolation=interp, antialias=True))
        ops += [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(0.5)]
    elif preset == "digits":
        if size is not None:
            ops.append(v2.Resize((size, size), interpolation=interp, antialias=True))
        side = 8 if size is None else size
        ops.append(v2.RandomCrop(side, padding=max(1, side // 8)))
    else:  # imagenet, swin
        ops += [v2.RandomResizedCrop(size, interpolation=interp, antialias=True), v2.RandomHorizontalFlip(0.5)]
        if preset == "swin":
            # Affine ops on tensors support only nearest/bilinear (mmcls used PIL bicubic).
            ra_interp = interp if interp in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR) \
                else InterpolationMode.BILINEAR
            ops.append(v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11,
                                      interpolation=ra_interp, fill=[round(255 * m) for m in mean]))

    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if preset == "swin":
        ops.append(v2.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random"))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)
