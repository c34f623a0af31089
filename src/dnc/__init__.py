"""Deep Nearest Centroids (ICLR 2023): classification and segmentation with class sub-centroids.

The library in a few names (imported on first use, so that ``import dnc`` stays cheap)::

    from dnc import DNCHead                     # the head, for your own training loop
    head = DNCHead(in_dim=512, num_classes=10)
    logits, losses = head(features, labels)     # training: also moves the sub-centroids
    logits = head(features)                     # inference

    model, classes, transform = dnc.load_model("work_dirs/run/best.pt")
    model = dnc.build_model("configs/demo/digits_dnc.yaml")
    model = dnc.create_model("resnet50.a1_in1k", num_classes=10, pretrained=True)   # as timm.create_model
    model = dnc.replace_head(timm_model)        # a timm classifier with a DNC head instead of its own

* :class:`DNCHead`, :class:`LinearHead`, :class:`PixelHead` (:mod:`dnc.heads`) and
  :class:`SubCentroids` (:mod:`dnc.centroids`): the output layers;
* :func:`build_model` (a config, or its YAML path with overrides) and :func:`load_model` (a
  checkpoint: ``(model, classes, eval transform)``), from :mod:`dnc.tasks`;
* :func:`create_model` and :func:`replace_head` (:mod:`dnc.api`): the classifier of ``dnc train`` in
  timm's shape, from a timm model name or a timm model;
* :func:`load_config` (:mod:`dnc.config`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "DNCHead": "heads", "LinearHead": "heads", "PixelHead": "heads", "SubCentroids": "centroids",
    "build_model": "tasks", "load_model": "tasks", "load_config": "config",
    "create_model": "api", "replace_head": "api", "Classifier": "models.classifier",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static type checkers see the real objects
    from .api import create_model, replace_head
    from .centroids import SubCentroids
    from .config import load_config
    from .heads import DNCHead, LinearHead, PixelHead
    from .models.classifier import Classifier
    from .tasks import build_model, load_model


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dnc' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
