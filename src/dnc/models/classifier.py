"""Image classifier: backbone -> global pooling -> DNC or linear head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import build_head
from .backbones import create_backbone

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """``model(images)`` gives logits; ``model(images, labels)`` in training gives ``(logits, losses)``."""

    def __init__(self, backbone: str, num_classes: int, head: str = "dnc", pretrained: Optional[str] = None,
                 backbone_kwargs: Optional[dict] = None, head_kwargs: Optional[dict] = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, **(backbone_kwargs or {}))
        self.head = build_head(head, self.backbone.num_features, num_classes, **(head_kwargs or {}))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def head_module(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Unit embeddings ``(N, D)`` the DNC head compares with its sub-centroids, and the targets."""
        return self.head.embed(self.features(images)), targets

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        feats = self.features(images)
        if targets is None or not self.training:
            return self.head(feats)
        logits, losses = self.head(feats, targets)
        return logits, {"ce": F.cross_entropy(logits.float(), targets), **losses}
