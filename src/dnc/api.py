"""The Python API in timm's shape: :func:`create_model` and :func:`replace_head`.

    import dnc, timm
    model = dnc.create_model("resnet50.a1_in1k", num_classes=10, pretrained=True)      # timm's weights
    model = dnc.create_model("hf-hub:timm/convnext_tiny.in12k", num_classes=10, pretrained=True)
    model = dnc.replace_head(timm.create_model("resnet18", pretrained=True), num_classes=10)

Both give the :class:`~dnc.models.classifier.Classifier` that ``dnc train`` builds: ``model(x)`` gives
logits, ``logits, losses = model(x, y)`` in a training step (``losses["ce"]`` plus the DNC head's
auxiliary losses; the sub-centroids move), with timm's ``num_classes``, ``pretrained_cfg``,
``forward_features``, ``forward_head`` and ``reset_classifier``. The preprocessing of the weights is
timm's: ``timm.data.resolve_data_config(model=model.backbone)`` / ``model.pretrained_cfg``.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from .models.classifier import Classifier

__all__ = ["create_model", "replace_head"]


def create_model(name: str, num_classes: Optional[int] = None, head: str = "dnc",
                 pretrained: Union[bool, str, None] = False, backbone_kwargs: Optional[dict] = None,
                 **head_options) -> Classifier:
    """A classifier on the timm model ``name`` with a DNC (or ``"linear"``) head.

    Args:
        name: as ``timm.create_model`` takes it (``resnet50``, ``resnet50.a1_in1k``, ``hf-hub:ORG/NAME``,
            ``local-dir:PATH``), or ``<resnet>_cifar`` / ``tiny_cnn``.
        num_classes: classes of the head; None: the weights' (their ``pretrained_cfg``).
        head: ``"dnc"`` or ``"linear"``.
        pretrained: False; True for the weights of ``name`` (timm's pretrained tag, or the hub
            repository / folder it names); or anything ``model.pretrained`` takes (``hf-hub:ORG/NAME``,
            a snapshot folder, a weights file, a dnc checkpoint, ``"imagenet"``).
        backbone_kwargs: more arguments of ``timm.create_model`` (``drop_path_rate``, ``img_size``, ...).
        head_options: options of the head (:class:`~dnc.heads.DNCHead`: ``num_subcentroids``,
            ``temperature``, ``momentum``, ...; :class:`~dnc.heads.LinearHead`: ``dropout``).
    """
    weights = "timm" if pretrained is True else (pretrained or None)
    if num_classes is None:
        from .models.backbones import create_backbone
        backbone = create_backbone(name, weights, **(backbone_kwargs or {}))
        n = (getattr(backbone, "pretrained_cfg", None) or {}).get("num_classes")
        if not n:
            raise ValueError(f"create_model: the weights of {name!r} name no number of classes; pass num_classes")
        return Classifier(backbone, n, head, head_kwargs=head_options)
    return Classifier(name, num_classes, head, weights, backbone_kwargs, head_options)


def replace_head(model: nn.Module, head: str = "dnc", num_classes: Optional[int] = None, **head_options) -> Classifier:
    """The timm classifier ``model`` with a DNC (or ``"linear"``) head instead of its own: its classifier is
    removed (``reset_classifier(0)``; the module is reused, not copied) and a new head for
    ``num_classes`` classes (None: the model's) placed on its pooled features."""
    if not hasattr(model, "reset_classifier"):
        raise ValueError(f"replace_head: {type(model).__name__} is not a timm classifier (it has no reset_classifier)")
    n = num_classes if num_classes is not None else getattr(model, "num_classes", 0)
    if not n:
        raise ValueError(f"replace_head: {type(model).__name__} has no classes to replace; pass num_classes")
    model.reset_classifier(0)
    return Classifier(model, n, head, head_kwargs=head_options)
