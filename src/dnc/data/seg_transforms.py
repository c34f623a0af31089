"""Joint image + mask transforms reproducing MMSegmentation's train and test pipelines.

Train (MMSeg's ADE20K / Cityscapes recipes)::

    RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0))  # keep ratio; image bilinear, mask nearest
    RandomCrop(crop_size, cat_max_ratio=0.75)                 # retry while one class covers > 75%
    RandomHorizontalFlip(0.5)
    PhotoMetricDistortion()                                   # brightness, contrast, saturation, hue
    Normalize(mean, std)                                      # float32, on the 0-255 scale
    Pad(crop_size)                                            # image with 0, mask with 255

Eval: ``Resize(scale)`` of the image only (keep ratio) and ``Normalize``; the mask keeps its
original size, and the prediction is resized to it before scoring (as MMSeg does). Eval images
therefore differ in size: evaluate with batch size 1.

Every transform is a callable ``(image, mask) -> (image, mask)`` on ``tv_tensors.Image`` /
``tv_tensors.Mask``, built from ``torchvision.transforms.v2`` functionals, which resize masks with
nearest interpolation. Randomness comes from torch's generator only, so ``torch.manual_seed`` and
DataLoader worker seeding make the pipeline reproducible. Resizing uses ``antialias=False`` to
match OpenCV's bilinear resize used by MMSeg.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "pair", "rescale_size", "Resize", "RandomResize", "RandomCrop", "PhotoMetricDistortion", "Normalize",
    "Pad", "SegCompose", "build_seg_transforms", "seg_collate", "rgb_to_hsv", "hsv_to_rgb",
]

Size = Tuple[int, int]


def pair(name: str, value: Union[int, Sequence[int], None]) -> Optional[Size]:
    """``(h, w)`` from an int or a pair of positive ints (``None`` stays ``None``); else one clear error."""
    if value is None:
        return None
    value = (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"{name}: expected a positive int or (h, w), got {value!r}")
    return value


def rescale_size(h: int, w: int, scale: Sequence[float]) -> Size:
    """The ``(h, w)`` that fits ``(h, w)`` into ``scale`` keeping the aspect ratio (mmcv.imrescale).

    ``scale`` is unordered: the long side becomes at most ``max(scale)`` and the short side at most
    ``min(scale)``, with the larger of the two limits reached (so small images are enlarged).
    """
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize(image, mask, size: Size):
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
    if mask is not None:
        mask = F.resize(mask, list(size), interpolation=InterpolationMode.NEAREST)
    return image, mask


class Resize:
    """Resize to fit ``scale`` keeping the ratio; the mask too only when ``resize_mask``."""

    def __init__(self, scale: Sequence[int], resize_mask: bool = False):
        self.scale, self.resize_mask = tuple(scale), resize_mask

    def __call__(self, image, mask):
        size = rescale_size(*image.shape[-2:], self.scale)
        if self.resize_mask:
            return _resize(image, mask, size)
        return _resize(image, None, size)[0], mask


class RandomResize:
    """MMSeg ``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``.

    Draws ``r ~ U(ratio_range)`` and fits the image into ``scale * r`` keeping its aspect ratio.
    ``scale=None`` scales the image's own size by ``r``; ``ratio_range=None`` uses ``r = 1``.
    """

    def __init__(self, scale: Optional[Sequence[int]], ratio_range: Optional[Sequence[float]] = None):
        self.scale = None if scale is None else tuple(scale)
        self.ratio_range = None if ratio_range is None else tuple(ratio_range)

    def __call__(self, image, mask):
        h, w = image.shape[-2:]
        r = 1.0
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            r = lo + (hi - lo) * torch.rand(()).item()
        if self.scale is None:
            size = (int(h * r + 0.5), int(w * r + 0.5))
        else:
            size = rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r)))
        return _resize(image, mask, size)


class RandomCrop:
    """MMSeg ``RandomCrop``: a random ``crop_size`` window (smaller if the image is smaller).

    With ``cat_max_ratio < 1`` the window is redrawn up to 10 times until the crop holds at least
    two classes (ignoring ``ignore_index``) and the most frequent one covers less than
    ``cat_max_ratio`` of the labelled pixels; after 10 failures the 11th draw is used.
    """

    def __init__(self, crop_size: Size, cat_max_ratio: float = 1.0, ignore_index: int = 255):
        self.crop_size = pair("crop_size", crop_size)
        self.cat_max_ratio, self.ignore_index = cat_max_ratio, ignore_index

    def _window(self, h: int, w: int) -> Tuple[int, int, int, int]:
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return top, left, ch, cw

    def _accept(self, mask: torch.Tensor, window) -> bool:
        top, left, ch, cw = window
        crop = mask[..., top:top + ch, left:left + cw]
        labels = crop[crop != self.ignore_index]
        if labels.numel() == 0:
            return False
        counts = torch.bincount(labels.flatten().clamp_min(0))
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def __call__(self, image, mask):
        h, w = image.shape[-2:]
        window = self._window(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self._accept(mask, window):
                    break
                window = self._window(h, w)
        return F.crop(image, *window), F.crop(mask, *window)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` RGB in [0, 1] to HSV with hue, saturation and value all in [0, 1]."""
    r, g, b = rgb.unbind(-3)
    maxc, _ = rgb.max(-3)
    minc, _ = rgb.min(-3)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / d,
                    torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(-3)
    h6 = (h % 1.0) * 6.0
    i = h6.floor()
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long().remainder(6).unsqueeze(-3)
    # Colour of each of the six hue sectors, per channel.
    r = torch.stack([v, q, p, p, t, v], dim=-3).gather(-3, i)
    g = torch.stack([t, v, v, q, p, p], dim=-3).gather(-3, i)
    b = torch.stack([p, p, t, v, v, q], dim=-3).gather(-3, i)
    return torch.cat([r, g, b], dim=-3)


class PhotoMetricDistortion:
    """MMSeg ``PhotoMetricDistortion`` on a uint8 RGB image; the mask is untouched.

    In order, each step applied with probability 0.5: brightness ``+U(-32, 32)``; contrast
    ``*U(0.5, 1.5)`` (first or, with probability 0.5, last); saturation ``*U(0.5, 1.5)`` on HSV's
    S; hue shift by an integer in ``[-18, 18]`` in OpenCV's 0-180 hue units (up to +-36 degrees).
    Values are clipped to [0, 255] after each step; unlike MMSeg (which rounds down to uint8 after
    every step), intermediate values stay float and the result is rounded once.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.rand(()) < 0.5)

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(()).item()

    def _contrast(self, img: torch.Tensor) -> torch.Tensor:
        if self._coin():
            img = (img * self._uniform(*self.contrast_range)).clamp_(0, 255)
        return img

    def __call__(self, image, mask):
        img = image.as_subclass(torch.Tensor).float()
        if self._coin():
            img = (img + self._uniform(-self.brightness_delta, self.brightness_delta)).clamp_(0, 255)
        contrast_first = self._coin()
        if contrast_first:
            img = self._contrast(img)
        saturate, shift_hue = self._coin(), self._coin()
        if saturate or shift_hue:
            hsv = rgb_to_hsv(img / 255.0)
            h, s, v = hsv.unbind(-3)
            if saturate:
                s = (s * self._uniform(*self.saturation_range)).clamp(0, 1)
            if shift_hue:
                h = (h + int(torch.randint(-self.hue_delta, self.hue_delta + 1, ())) / 180.0) % 1.0
            img = hsv_to_rgb(torch.stack([h, s, v], dim=-3)) * 255.0
        if not contrast_first:
            img = self._contrast(img)
        img = img.round_().clamp_(0, 255).to(image.dtype)
        return tv_tensors.wrap(img, like=image), mask


class Normalize:
    """Convert the image to float32 and normalise it; ``mean``/``std`` are on the 0-1 scale."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        # The image stays on the 0-255 scale: (x / 255 - mean) / std == (x - 255 mean) / (255 std).
        self.normalize = v2.Normalize([255.0 * m for m in mean], [255.0 * s for s in std])

    def __call__(self, image, mask):
        return self.normalize(image.to(torch.float32)), mask


class Pad:
    """Pad bottom and right up to ``size`` (h, w): the image with ``fill``, the mask with ``ignore_index``."""

    def __init__(self, size: Size, fill: float = 0.0, ignore_index: int = 255):
        self.size = pair("size", size)
        self.fill, self.ignore_index = fill, ignore_index

    def __call__(self, image, mask):
        h, w = image.shape[-2:]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            image = F.pad(image, [0, 0, pw, ph], fill=self.fill)
            mask = F.pad(mask, [0, 0, pw, ph], fill=self.ignore_index)
        return image, mask


class SegCompose:
    """Apply joint transforms in order and return plain ``(float32 image, int64 mask)`` tensors.

    Inputs may be plain tensors (or a PIL image): they are wrapped as ``tv_tensors.Image`` /
    ``tv_tensors.Mask`` first, so that every transform knows which one is the mask.
    """

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(image, tv_tensors.Image):
            image = F.to_image(image)
        if not isinstance(mask, tv_tensors.Mask):
            mask = tv_tensors.Mask(torch.as_tensor(mask))
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image size {tuple(image.shape[-2:])} differs from mask size {tuple(mask.shape[-2:])}")
        for t in self.transforms:
            image, mask = t(image, mask)
        return (image.as_subclass(torch.Tensor).to(torch.float32),
                mask.as_subclass(torch.Tensor).to(torch.int64))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(t).__name__ for t in self.transforms)})"


def build_seg_transforms(train: bool, crop_size: Union[int, Size] = (512, 512),
                         scale: Optional[Sequence[int]] = (2048, 512),
                         ratio_range: Optional[Sequence[float]] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                         flip_prob: float = 0.5, photometric: bool = True,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         ignore_index: int = 255) -> SegCompose:
    """MMSeg's train or eval pipeline as a callable ``(image, mask) -> (image, mask)``.

    Train images come out exactly ``crop_size`` (h, w); eval images are resized to fit ``scale``
    (no resize with ``scale=None``) and the mask keeps its original size. ``crop_size``,
    ``ratio_range``, ``cat_max_ratio``, ``flip_prob`` and ``photometric`` only affect training.
    """
    if not train:
        steps: List[Callable] = [] if scale is None else [Resize(scale)]
        return SegCompose(steps + [Normalize(mean, std)])
    crop_size = pair("crop_size", crop_size)
    steps = [RandomResize(scale, ratio_range),
             RandomCrop(crop_size, cat_max_ratio, ignore_index)]
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize(mean, std), Pad(crop_size, 0.0, ignore_index)]
    return SegCompose(steps)


def seg_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, mask)`` samples into ``(images (B, 3, h, w), masks (B, H, W))``.

    All samples must have the same sizes, which the train pipeline guarantees; eval samples keep
    their own sizes, so evaluate with batch size 1.
    """
    images = [torch.as_tensor(img).as_subclass(torch.Tensor) for img, _ in batch]
    masks = [torch.as_tensor(m).as_subclass(torch.Tensor) for _, m in batch]
    shapes = {(tuple(i.shape), tuple(m.shape)) for i, m in zip(images, masks)}
    if len(shapes) > 1:
        raise ValueError(f"seg_collate: samples of different sizes {sorted(shapes)} in one batch; "
                         f"use batch size 1 for evaluation (images keep their own size)")
    return torch.stack(images), torch.stack(masks)
