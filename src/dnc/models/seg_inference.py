"""Test-time inference for segmentation: whole image or sliding window, multi-scale, flip.

Follows MMSegmentation's ``EncoderDecoder.inference`` / ``slide_inference`` / ``aug_test``: the
logits of each view are resized (bilinear, ``align_corners=False``) to the output size, turned into
softmax probabilities, and the probabilities of all views (scales x flips) are averaged.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..data.seg_transforms import pair
from .decoders import resize

__all__ = ["seg_inference", "slide_logits"]

Size = Tuple[int, int]


def _logits(forward: Callable, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = forward(image)
    if out.ndim != 4 or out.shape[:2] != (image.shape[0], num_classes):
        raise ValueError(f"seg_inference: forward returned shape {tuple(out.shape)}, expected "
                         f"({image.shape[0]}, {num_classes}, h, w)")
    return out


def slide_logits(forward: Callable, image: torch.Tensor, num_classes: int, crop_size: Size,
                 stride: Size) -> torch.Tensor:
    """Logits at the input's size from overlapping ``crop_size`` windows (MMSeg ``slide_inference``).

    Windows start every ``stride`` pixels and the last one is shifted back to end at the border.
    A window larger than the image is zero-padded (bottom/right) to ``crop_size`` and its logits
    cropped back, so the model always sees ``crop_size`` inputs. Each window's logits are upsampled
    to the window size and overlapping windows are averaged.
    """
    b, _, h, w = image.shape
    (ch, cw), (sh, sw) = crop_size, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    total = image.new_zeros((b, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            crop = image[..., y1:y2, x1:x2]
            ph, pw = ch - crop.shape[-2], cw - crop.shape[-1]
            if ph or pw:
                crop = F.pad(crop, (0, pw, 0, ph))
            logits = resize(_logits(forward, crop, num_classes), (ch, cw))
            total[..., y1:y2, x1:x2] += logits[..., : y2 - y1, : x2 - x1]
            count[..., y1:y2, x1:x2] += 1
    return total / count


def seg_inference(forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int,
                  out_size: Sequence[int], mode: str = "whole", crop_size: Union[int, Sequence[int], None] = None,
                  stride: Union[int, Sequence[int], None] = None, scales: Sequence[float] = (1.0,),
                  flip: bool = False) -> torch.Tensor:
    """Class probabilities ``(B, num_classes, *out_size)`` for a normalised ``image`` (B, 3, H, W).

    Args:
        forward: model, ``forward(img) -> logits (B, num_classes, h', w')`` at any resolution.
        out_size: ``(H_out, W_out)``, usually the original mask size.
        mode: ``'whole'`` (one forward per view) or ``'slide'`` (sliding window, see
            :func:`slide_logits`).
        crop_size, stride: window size and step for ``'slide'`` (int or (h, w)); ``stride``
            defaults to two thirds of ``crop_size`` (MMSeg's 769/513 Cityscapes setting).
        scales: the image is resized by each ratio (``int(H * s + 0.5)``, bilinear) before
            inference; MMSeg's multi-scale test uses (0.5, 0.75, 1.0, 1.25, 1.5, 1.75).
        flip: also run every scale on the horizontally flipped image (logits flipped back).

    Returns the mean over views of ``softmax(resize(logits, out_size))`` (MMSeg's aug_test); its
    argmax over dim 1 is the prediction. Call under ``torch.no_grad()`` / ``inference_mode()``.
    In ``'whole'`` mode low-resolution logits are resized straight to ``out_size`` (one bilinear
    step instead of MMSeg's two, via the input size).
    """
    if image.ndim != 4:
        raise ValueError(f"seg_inference: expected an image batch (B, 3, H, W), got shape {tuple(image.shape)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"seg_inference: mode must be 'whole' or 'slide', got {mode!r}")
    out_size = pair("out_size", out_size)
    crop = pair("crop_size", crop_size)
    if mode == "slide":
        if crop is None:
            raise ValueError("seg_inference: mode 'slide' needs crop_size")
        step = pair("stride", stride) or (math.ceil(crop[0] * 2 / 3), math.ceil(crop[1] * 2 / 3))
    if not scales:
        raise ValueError("seg_inference: scales must hold at least one ratio")

    h, w = image.shape[-2:]
    probs = None
    views = 0
    for s in scales:
        scaled = image if s == 1 else resize(image, (int(h * s + 0.5), int(w * s + 0.5)))
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                logits = slide_logits(forward, x, num_classes, crop, step)
            else:
                logits = _logits(forward, x, num_classes)
            if flipped:
                logits = logits.flip(-1)
            p = resize(logits, out_size).float().softmax(dim=1)
            probs = p if probs is None else probs + p
            views += 1
    return probs / views
