"""Segmentation encoders: timm backbones returning four NCHW feature maps (stages 1-4).

``build_encoder('resnet101c', output_stride=8)`` gives MMSeg's "R-101-D8": timm dilates stages 3
and 4 (dilations 2 and 4, stride 1) for output stride 8, exactly as MMSeg's ``ResNetV1c`` with
``strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)``. Architectures: MMSeg's ResNetV1c (deep 3-conv
stem, plain strided shortcuts) is timm's ``resnet50c`` / ``resnet101c``; timm's ``resnet50d`` /
``resnet101d`` add ResNet-D average-pool shortcuts on top (ImageNet weights for them are more
common). Swin (timm ``swin_*``) works at output stride 32 only; its NHWC features are permuted to
NCHW, and inputs of any size are accepted (see :class:`TimmEncoder`).

``pretrained`` is anything :func:`~dnc.models.pretrained.weight_source` takes but a dnc checkpoint
(which :class:`~dnc.models.segmenter.Segmenter` loads): timm's or the hub's weights and snapshot
folders (loaded by timm as ``features_only`` models), ``"imagenet"`` (pip-installed), or a local file
(a state dict of the full timm classification model, ``.pth``/``.safetensors``, possibly wrapped in
``{'state_dict': ...}`` or ``{'model': ...}``), loaded by timm's own loader so its checkpoint filters apply.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TimmEncoder", "build_encoder"]


def _is_nhwc(model: nn.Module) -> bool:
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


class TimmEncoder(nn.Module):
    """A timm ``features_only`` backbone giving the last four feature levels as NCHW tensors.

    Attributes:
        channels: channels of the four maps, e.g. ``[256, 512, 1024, 2048]`` for ResNet-50.
        reductions: their strides w.r.t. the input, e.g. ``[4, 8, 8, 8]`` at output stride 8.

    Swin is built with ``strict_img_size=False`` (attention masks follow the input size) and
    ``always_partition=True`` (window_size windows, shifted in every other block, at every stage,
    as in MMSeg's Swin; ``img_size`` then does not matter). Inputs of NHWC models are zero-padded
    at the bottom/right to a multiple of the patch size (as MMSeg's Swin does), and every feature
    map is cropped to ``ceil(H / reduction) x ceil(W / reduction)``.
    """

    def __init__(self, name: str, output_stride: int = 8, pretrained: Optional[Union[str, Path]] = None,
                 out_indices: Optional[Sequence[int]] = None, **kwargs):
        super().__init__()
        from .pretrained import _prefixed, create_timm_model, resolve_backbone, weight_source
        kind, where = weight_source(name, pretrained)
        if kind == "dnc":
            raise ValueError(f"{where}: a dnc checkpoint initialises a Segmenter (model.pretrained), not an encoder")
        kwargs = dict(kwargs, features_only=True)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if kind == "file":  # a local file: timm's own loader, so that its checkpoint filters apply
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=where))
        transformer = resolve_backbone(name)[0].startswith(("swin", "swinv2"))
        if transformer:
            if output_stride != 32:
                raise ValueError(f"encoder {name!r}: Swin has no dilated variant; output_stride must be 32, "
                                 f"got {output_stride}")
            # Any input size (attention masks built per forward) and, as MMSeg's Swin, windows of
            # window_size with a shift in every other block at every stage, whatever the input size
            # (timm otherwise shrinks windows and drops shifts where img_size gives small maps).
            kwargs.setdefault("strict_img_size", False)
            kwargs.setdefault("always_partition", True)
        elif output_stride != 32:
            kwargs["output_stride"] = output_stride
        if not _prefixed(name)[0] and not timm.is_model(name):
            raise ValueError(f"encoder {name!r}: not a timm model name")
        try:
            model = timm.create_model(name, **kwargs) if kind == "file" else create_timm_model(name, pretrained, **kwargs)
        except TypeError as err:  # an option the architecture (or this timm version) does not take
            hint = " (Swin at any input size needs a timm with strict_img_size/always_partition)" if transformer else ""
            raise ValueError(f"encoder {name!r}: {err}{hint}") from None
        except AssertionError as err:  # timm asserts on unsupported output strides
            detail = str(err) or f"output_stride={output_stride} is not supported"
            raise ValueError(f"encoder {name!r}: {detail}") from None
        except Exception as err:  # state-dict key / shape mismatch, unreadable file
            if kind != "file":
                raise
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
            if len(detail) > 300:
                detail = detail[:300] + " ..."
            raise ValueError(f"{where}: cannot load into timm model {name!r}: {detail}") from None

        self.model = model
        self.nhwc = _is_nhwc(model)
        info = model.feature_info
        channels, reductions = list(info.channels()), list(info.reduction())
        self.num_levels = len(channels) if out_indices is not None else min(4, len(channels))
        self.channels: List[int] = channels[-self.num_levels:]
        self.reductions: List[int] = reductions[-self.num_levels:]
        self.pad_multiple = reductions[0] if self.nhwc else 1
        self.name = name

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        h, w = x.shape[-2:]
        m = self.pad_multiple
        if m > 1 and (h % m or w % m):
            x = F.pad(x, (0, -w % m, 0, -h % m))
        feats = self.model(x)[-self.num_levels:]
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return [f[..., :math.ceil(h / r), :math.ceil(w / r)] if self.nhwc else f
                for f, r in zip(feats, self.reductions)]


def build_encoder(name: str, output_stride: int = 8, pretrained: Optional[Union[str, Path]] = None,
                  **kwargs) -> TimmEncoder:
    """A :class:`TimmEncoder` for timm model ``name``; other kwargs go to ``timm.create_model``
    (e.g. ``drop_path_rate=0.3`` for Swin-B, ``img_size``, ``out_indices``)."""
    return TimmEncoder(name, output_stride=output_stride, pretrained=pretrained, **kwargs)
