"""Semantic segmenter: timm encoder -> decoder (FCN / DeepLabV3 / UPerNet) -> per-pixel DNC or linear head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import PixelHead, build_head
from .backbones import load_pretrained
from .pretrained import is_dnc_checkpoint as _is_dnc_checkpoint
from .decoders import FCNDecoder, build_decoder
from .encoders import build_encoder

__all__ = ["Segmenter"]


class Segmenter(nn.Module):
    """``model(images)`` gives logits at the decoder's resolution (1/8 or 1/4 of the input);
    ``model(images, masks)`` gives ``(logits, losses)`` (in eval mode too; only training moves the
    sub-centroids) with the cross-entropy on logits upsampled bilinearly to the mask size (ignored
    pixels excluded), the optional auxiliary FCN loss and the DNC auxiliary losses. The DNC head clusters pixels at the decoder's resolution, with the
    masks resized there by nearest neighbour.

    ``pretrained``: the encoder's weights (anything :func:`~dnc.models.pretrained.weight_source` takes),
    or a ``dnc train`` classification
    checkpoint, whose backbone initialises the encoder (the paper's classification-to-segmentation
    transfer: a DNC classifier has no other parameters to throw away).
    """

    def __init__(self, backbone: str, num_classes: int, decoder: str = "fcn", head: str = "dnc",
                 pretrained: Optional[str] = None, backbone_kwargs: Optional[dict] = None,
                 head_kwargs: Optional[dict] = None, decoder_channels: int = 512, output_stride: int = 8,
                 aux_weight: float = 0.0, ignore_index: int = 255):
        super().__init__()
        transfer = _is_dnc_checkpoint(pretrained)
        self.encoder = build_encoder(backbone, output_stride, None if transfer else (pretrained or None),
                                     **(backbone_kwargs or {}))
        if transfer:
            load_pretrained(self.encoder.model, pretrained)
        self.decoder = build_decoder(decoder, self.encoder.channels, decoder_channels)
        self.head = PixelHead(build_head(head, self.decoder.out_channels, num_classes, **(head_kwargs or {})), ignore_index)
        self.num_classes, self.ignore_index, self.aux_weight = num_classes, ignore_index, aux_weight
        if aux_weight:
            self.aux = nn.Sequential(FCNDecoder(self.encoder.channels, 256, num_convs=1, concat_input=False, in_index=-2),
                                     nn.Conv2d(256, num_classes, 1))

    def head_module(self) -> nn.Module:
        return self.head.head

    @staticmethod
    def resize_labels(masks: torch.Tensor, size) -> torch.Tensor:
        """``(B, h, w)`` labels of ``masks (B, H, W)`` at ``size`` (nearest: the label of a decoder pixel)."""
        return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()

    def _ce(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled pixels; zero (not NaN) for a batch whose pixels are all void."""
        up = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        labelled = (masks != self.ignore_index).sum().clamp_min(1)
        return F.cross_entropy(up, masks, ignore_index=self.ignore_index, reduction="sum") / labelled

    def forward(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None):
        feats = self.encoder(images)
        x = self.decoder(feats)
        if masks is None:
            return self.head(x)
        logits, losses = self.head(x, self.resize_labels(masks, x.shape[-2:]))
        losses = {"ce": self._ce(logits, masks), **losses}
        if self.aux_weight:
            losses["aux"] = self.aux_weight * self._ce(self.aux(feats), masks)
        return logits, losses

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor, masks: torch.Tensor, per_image: int = 4096):
        """Unit pixel embeddings and their labels (ignored pixels dropped), at most ``per_image``
        random pixels of each image: the samples of the k-means++ initialisation."""
        x = self.decoder(self.encoder(images))
        b, d, h, w = x.shape
        z = self.head.head.embed(x.permute(0, 2, 3, 1).reshape(-1, d))
        y = self.resize_labels(masks, (h, w)).reshape(-1)
        keep = (y != self.ignore_index).reshape(b, -1) & (torch.rand(b, h * w, device=y.device).argsort(1).argsort(1) < per_image)
        keep = keep.reshape(-1)
        return z[keep], y[keep]
