"""Segmentation decoders after MMSegmentation's FCNHead, ASPPHead (DeepLabV3) and UPerHead.

Each decoder maps the encoder's list of feature maps to one ``(B, channels, h, w)`` map and ends
with the head's dropout (``Dropout2d``, MMSeg's ``cls_seg`` dropout); the per-pixel classifier
(a 1x1 conv or the DNC head) is not part of it. ``out_channels`` says the output width.
Convolutions are MMSeg ``ConvModule`` s: conv (no bias) + BatchNorm + ReLU, Kaiming-normal
initialised (fan_out, as mmcv does). Resizing is bilinear with ``align_corners=False``.

Note: the image-pooling branches (ASPP, PPM scale 1) apply BatchNorm to a 1x1 map, so training
needs more than one image per batch (per process, unless BatchNorm is converted to SyncBatchNorm).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "FCNDecoder", "ASPPDecoder", "UPerDecoder", "build_decoder", "resize"]


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of an NCHW map (``align_corners=False``); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """MMSeg ``ConvModule(in, out, k, padding=dilation * (k // 2), dilation, norm=BN, act=ReLU)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


def _in_channels(in_channels: Union[int, Sequence[int]], in_index: int) -> int:
    return int(in_channels) if isinstance(in_channels, int) else int(list(in_channels)[in_index])


class FCNDecoder(nn.Module):
    """MMSeg ``FCNHead``: ``num_convs`` conv-BN-ReLU on ``features[in_index]``, then (with
    ``concat_input``) concatenation with the input and one more conv, then dropout.

    ``in_channels`` is the selected map's width (or the encoder's channel list, indexed by
    ``in_index``). MMSeg's auxiliary head is ``FCNDecoder(channels[-2], 256, num_convs=1,
    concat_input=False, in_index=-2)``.
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], channels: int = 512, num_convs: int = 2,
                 kernel_size: int = 3, concat_input: bool = True, dropout: float = 0.1, in_index: int = -1,
                 dilation: int = 1):
        super().__init__()
        in_channels = _in_channels(in_channels, in_index)
        if num_convs < 0 or (num_convs == 0 and in_channels != channels):
            raise ValueError(f"FCNDecoder: num_convs={num_convs} needs in_channels == channels "
                             f"when 0 (got {in_channels} and {channels})")
        self.in_index, self.concat_input = in_index, concat_input
        self.convs = nn.Sequential(*[
            ConvBNReLU(in_channels if i == 0 else channels, channels, kernel_size, dilation)
            for i in range(num_convs)])
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, kernel_size) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.out_channels = channels

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = features[self.in_index]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.dropout(out)


class ASPPDecoder(nn.Module):
    """MMSeg ``ASPPHead`` (DeepLabV3): image pooling + one branch per dilation (1x1 for dilation 1,
    3x3 dilated otherwise), concatenated, then a 3x3 bottleneck conv and dropout."""

    def __init__(self, in_channels: Union[int, Sequence[int]], channels: int = 512,
                 dilations: Sequence[int] = (1, 12, 24, 36), dropout: float = 0.1, in_index: int = -1):
        super().__init__()
        in_channels = _in_channels(in_channels, in_index)
        self.in_index = in_index
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        self.aspp = nn.ModuleList([
            ConvBNReLU(in_channels, channels, 1 if d == 1 else 3, dilation=d) for d in dilations])
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.out_channels = channels

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = features[self.in_index]
        outs = [resize(self.image_pool(x), x.shape[-2:])] + [branch(x) for branch in self.aspp]
        return self.dropout(self.bottleneck(torch.cat(outs, dim=1)))


class UPerDecoder(nn.Module):
    """MMSeg ``UPerHead``: a pyramid pooling module on the last map, an FPN over all maps (1x1
    laterals, top-down addition, 3x3 convs), every level upsampled to the first (1/4) map,
    concatenated and fused by a 3x3 conv, then dropout. Output at the first map's resolution."""

    def __init__(self, in_channels: Sequence[int], channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) < 2:
            raise ValueError(f"UPerDecoder: needs at least two feature levels, got in_channels={in_channels}")
        self.psp = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1))
            for s in pool_scales])
        self.psp_bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.num_levels = len(in_channels)
        self.out_channels = channels

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(stage(x), x.shape[-2:]) for stage in self.psp]
        return self.psp_bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        features = list(features)[-self.num_levels:]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self._ppm(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))
        return self.dropout(fused)


def build_decoder(name: str, encoder_channels: Sequence[int], channels: int = 512, **kwargs) -> nn.Module:
    """Decoder ``'fcn'``, ``'deeplabv3'`` (alias ``'aspp'``) or ``'upernet'`` (alias ``'uper'``)
    over an encoder with channel list ``encoder_channels``; kwargs go to the decoder class."""
    key = name.lower()
    if key == "fcn":
        return FCNDecoder(encoder_channels, channels, **kwargs)
    if key in ("deeplabv3", "aspp"):
        return ASPPDecoder(encoder_channels, channels, **kwargs)
    if key in ("upernet", "uper"):
        return UPerDecoder(encoder_channels, channels, **kwargs)
    raise ValueError(f"decoder {name!r} is unknown (expected one of: fcn, deeplabv3, upernet)")
