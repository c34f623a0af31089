"""Output heads: the DNC head (nearest sub-centroid) and the parametric linear baseline.

Every head maps features to class logits with one interface, for images ``(N, D)`` and, through
``PixelHead``, for pixels ``(B, D, H, W)``:

* ``head(x)`` returns logits;
* ``head(x, target)`` in training mode returns ``(logits, losses)``, where ``losses`` holds any loss
  beyond the cross-entropy on the logits (which the model computes, at its own resolution).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .centroids import SubCentroids

__all__ = ["DNCHead", "LinearHead", "PixelHead", "build_head"]


class DNCHead(nn.Module):
    """Deep Nearest Centroids classifier: ``logits[n, c] = max_k <z_n, p(c, k)> / tau``.

    ``z = l2_normalize(LayerNorm(x))`` (the LayerNorm is optional). With ``calibration="layernorm"``
    the class scores go through a LayerNorm over the C classes with a learned per-class affine instead
    of the fixed temperature, as in the original code; the prediction is then no longer exactly the
    class of the nearest sub-centroid.

    Optional auxiliary losses of the prototype-segmentation line (need the current step's assignment,
    so not with a memory): ``contrast_weight`` (cross-entropy over all C*K sub-centroid logits against
    the assigned sub-centroid) and ``compact_weight`` (mean of ``(1 - <z, assigned p>)^2``).
    """

    def __init__(self, in_dim: int, num_classes: int, num_subcentroids: int = 4, feat_norm: bool = True,
                 calibration: str = "temperature", temperature: float = 0.1, contrast_weight: float = 0.0,
                 compact_weight: float = 0.0, **update_kwargs):
        super().__init__()
        if calibration not in ("temperature", "layernorm"):
            raise ValueError(f"calibration must be 'temperature' or 'layernorm', got {calibration!r}")
        if (contrast_weight or compact_weight) and update_kwargs.get("memory_size", 0):
            raise ValueError("contrast_weight/compact_weight need the step's own assignment: use memory_size=0")
        self.num_classes, self.temperature = num_classes, temperature
        self.contrast_weight, self.compact_weight = contrast_weight, compact_weight
        self.feat_norm = nn.LayerNorm(in_dim) if feat_norm else nn.Identity()
        self.centroids = SubCentroids(num_classes, in_dim, num_subcentroids, **update_kwargs)
        self.mask_norm = nn.LayerNorm(num_classes) if calibration == "layernorm" else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(N, D)``."""
        return F.normalize(self.feat_norm(x).float(), dim=-1)

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        return self.mask_norm(scores) if self.mask_norm is not None else scores / self.temperature

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        z = self.embed(x)
        sims = self.centroids.similarities(z)
        logits = self.calibrate(sims.amax(-1).float())
        if target is None or not self.training:
            return logits
        correct = logits.detach().argmax(1) == target
        assign = self.centroids.update(z.detach(), target, correct, sims.detach())
        return logits, self._aux_losses(sims, target, assign)

    def _aux_losses(self, sims: torch.Tensor, target: torch.Tensor, assign: Optional[torch.Tensor]) -> dict:
        losses = {}
        if assign is None or not (self.contrast_weight or self.compact_weight):
            return losses
        k = self.centroids.k
        taken = assign >= 0
        index = torch.where(taken, target * k + assign, -100)
        if self.contrast_weight:
            ce = F.cross_entropy(sims.flatten(1).float() / self.temperature, index, ignore_index=-100, reduction="sum")
            losses["contrast"] = self.contrast_weight * ce / taken.sum().clamp_min(1)
        if self.compact_weight:
            own = sims.flatten(1).float().gather(1, index.clamp_min(0)[:, None]).squeeze(1)
            losses["compact"] = self.compact_weight * ((1 - own) ** 2 * taken).sum() / taken.sum().clamp_min(1)
        return losses


class LinearHead(nn.Module):
    """The parametric baseline: a linear softmax classifier (optionally after dropout)."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        logits = self.fc(self.dropout(x))
        return logits if target is None or not self.training else (logits, {})


class PixelHead(nn.Module):
    """Applies an ``(N, D)`` head to every pixel of a ``(B, D, H, W)`` feature map.

    Targets are ``(B, H, W)`` class maps at the feature resolution; ``ignore_index`` pixels take no
    part in the clustering (they are passed on as -1).
    """

    def __init__(self, head: nn.Module, ignore_index: int = 255):
        super().__init__()
        self.head, self.ignore_index = head, ignore_index

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        b, d, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, d)
        if target is None or not self.training:
            return self._unflatten(self.head(flat), b, h, w)
        t = target.reshape(-1)
        logits, losses = self.head(flat, torch.where(t == self.ignore_index, -1, t))
        return self._unflatten(logits, b, h, w), losses

    @staticmethod
    def _unflatten(logits: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        return logits.view(b, h, w, -1).permute(0, 3, 1, 2)


def build_head(kind: str, in_dim: int, num_classes: int, **dnc_kwargs) -> nn.Module:
    """``kind`` is ``"dnc"`` (with the DNC options) or ``"linear"``."""
    if kind == "dnc":
        return DNCHead(in_dim, num_classes, **dnc_kwargs)
    if kind == "linear":
        return LinearHead(in_dim, num_classes)
    raise ValueError(f"unknown head {kind!r}; choose 'dnc' or 'linear'")
