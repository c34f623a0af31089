"""Image classifier: backbone -> global pooling -> DNC or linear head, in the shape of a timm model."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import build_head
from .backbones import create_backbone, feature_width

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """``model(images)`` gives logits; ``model(images, labels)`` gives ``(logits, losses)`` (in training
    the DNC head's sub-centroids move; ``losses["ce"]`` is the cross-entropy on the logits).

    As a timm model: ``num_classes``, ``num_features``, ``pretrained_cfg`` (the backbone's: where the
    weights came from and the preprocessing they expect), ``forward_features(images)`` (the backbone's
    feature map), ``forward_head(features, pre_logits=False)`` (pooling, then the head),
    ``get_classifier()`` and ``reset_classifier(num_classes, head=None)``.

    ``backbone`` is a timm model name (``hf-hub:`` included, see :func:`create_backbone`) or a module
    mapping images to pooled features (e.g. a timm model after ``reset_classifier(0)``).
    """

    def __init__(self, backbone: Union[str, nn.Module], num_classes: int, head: str = "dnc",
                 pretrained: Optional[str] = None, backbone_kwargs: Optional[dict] = None,
                 head_kwargs: Optional[dict] = None):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, nn.Module) else \
            create_backbone(backbone, pretrained, **(backbone_kwargs or {}))
        self.num_features = feature_width(self.backbone)
        self.head_type, self.head_kwargs = head, dict(head_kwargs or {})
        self.head = build_head(head, self.num_features, num_classes, **self.head_kwargs)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.backbone, "pretrained_cfg", None) or {})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, D)``."""
        return self.backbone(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features before pooling (timm's ``forward_features``)."""
        return self.backbone.forward_features(images) if hasattr(self.backbone, "forward_features") else images

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits of :meth:`forward_features`' output (``pre_logits``: the pooled features ``(N, D)``)."""
        pooled = self.backbone.forward_head(features) if hasattr(self.backbone, "forward_head") else self.backbone(features)
        return pooled if pre_logits else self.head(pooled)

    def get_classifier(self) -> nn.Module:
        return self.head

    def head_module(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, head: Optional[str] = None, **head_kwargs) -> None:
        """A new, freshly initialised head for ``num_classes`` classes: of kind ``head`` (``"dnc"`` or
        ``"linear"``; None: the current kind, with its options unless others are given)."""
        if head is not None and head != self.head_type:
            self.head_type, self.head_kwargs = head, dict(head_kwargs)
        elif head_kwargs:
            self.head_kwargs = dict(head_kwargs)
        device = next(self.head.parameters(), torch.empty(0)).device
        self.head = build_head(self.head_type, self.num_features, num_classes, **self.head_kwargs).to(device)
        self.head.train(self.training)

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Unit embeddings ``(N, D)`` the DNC head compares with its sub-centroids, and the targets."""
        return self.head.embed(self.features(images)), targets

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        feats = self.features(images)
        if targets is None:
            return self.head(feats)
        logits, losses = self.head(feats, targets)
        return logits, {"ce": F.cross_entropy(logits.float(), targets), **losses}
