"""Backbones by name: every timm model, CIFAR variants of the ResNets, and a tiny demo network.

``create_backbone(name)`` returns a module mapping images to pooled features ``(N, D)`` with the
feature width :func:`feature_width`. Names:

* any timm model name (``resnet50``, ``swin_tiny_patch4_window7_224``, ``mobilenetv2_100``, ...), with
  a pretrained tag (``resnet50.a1_in1k``) or as ``hf-hub:ORG/NAME``;
* ``<resnet>_cifar`` (e.g. ``resnet18_cifar``): the ResNet with a 3x3 stride-1 stem and no max-pool,
  as the CIFAR ResNets of the original (MMClassification's ``ResNet_CIFAR``);
* ``tiny_cnn``: three conv layers for the built-in 8x8 digits demo.

``pretrained`` is anything :func:`~dnc.models.pretrained.weight_source` takes: timm's or the hub's
weights (through timm), a snapshot folder, ``"imagenet"`` (pip-installed), or a local file or dnc
checkpoint (see :func:`load_pretrained`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from ..validate import check_finite

__all__ = ["create_backbone", "feature_width", "load_pretrained", "read_state_dict"]


class TinyCNN(nn.Module):
    """A small CNN for 8x8 inputs (the built-in digits demo)."""

    def __init__(self, in_chans: int = 3, width: int = 32, num_features: int = 128):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(in_chans, width), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, num_features), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[:-2](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return self.features[-2:](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _cifar_stem(model: nn.Module) -> nn.Module:
    out = model.conv1.out_channels if isinstance(model.conv1, nn.Conv2d) else model.bn1.num_features
    model.conv1 = nn.Conv2d(3, out, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def feature_width(model: nn.Module) -> int:
    """Width of the pooled features of a backbone: timm's ``head_hidden_size`` where a model has one
    (e.g. MobileNetV3's head convolution after the pooling), else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def create_backbone(name: str, pretrained: Optional[str] = None, **kwargs) -> nn.Module:
    """A feature extractor ``(N, 3, H, W) -> (N, D)``, D = :func:`feature_width`."""
    from .pretrained import create_timm_model, weight_source
    kind, where = weight_source(name, pretrained)
    if name == "tiny_cnn":
        model = TinyCNN(**kwargs)
    elif name.endswith("_cifar"):
        base = name[: -len("_cifar")]
        if not base.startswith("resnet"):
            raise ValueError(f"backbone {name!r}: the _cifar stem exists for ResNets only")
        model = _cifar_stem(timm.create_model(base, pretrained=False, num_classes=0, **kwargs))
    else:
        from .pretrained import _prefixed
        if not _prefixed(name)[0] and not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}; use a timm model name, <resnet>_cifar or tiny_cnn")
        model = create_timm_model(name, None if kind in ("file", "dnc") else pretrained, num_classes=0, **kwargs)
    if kind in ("file", "dnc"):
        load_pretrained(model, where)
    elif kind and (name == "tiny_cnn" or name.endswith("_cifar")):
        raise ValueError(f"model.pretrained={pretrained}: backbone {name!r} takes a weights file only")
    return model


_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def read_state_dict(path: str) -> dict:
    """Tensors of a local weights file (safetensors, a plain state dict, or a ``dnc`` checkpoint), each
    checked finite."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is reported the same way
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ValueError(f"{path}: no state dict of tensors found")
    check_finite(tensors, path)
    return tensors


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if key.startswith(pre):
                key, changed = key[len(pre):], True
    return key


def load_pretrained(module: nn.Module, path: str) -> None:
    """Load local weights into ``module``, matching names up to wrapper prefixes.

    Accepts timm/torchvision-style state dicts and ``dnc train`` checkpoints (the backbone of a
    classifier, DNC or linear, initialises a segmentation encoder: the paper's transfer). Weights the
    module does not have (a classifier, a DNC head) are left out; a module tensor missing from the file,
    or one of another shape, is an error.
    """
    source = {_strip(k): v for k, v in read_state_dict(path).items()}
    # timm's own filter of the architecture adapts foreign layouts, e.g. resamples a ViT's position
    # embeddings to another image size; the check below stays strict.
    adapt = getattr(sys.modules.get(type(module).__module__), "checkpoint_filter_fn", None)
    if adapt is not None and type(module).__module__.startswith("timm."):
        try:
            source = adapt(source, module)
        except Exception:  # noqa: BLE001 - a layout the filter does not know: the strict check reports it
            pass
    target = module.state_dict()
    names = {_strip(k): k for k in target}
    missing = [k for s, k in names.items() if s not in source]
    if missing:
        raise ValueError(f"{path}: {len(missing)} weights of the model are not in the file, e.g. {missing[:3]}")
    for s, k in names.items():
        if source[s].shape != target[k].shape:
            raise ValueError(f"{path}: weight {s!r} has shape {tuple(source[s].shape)}, the model needs {tuple(target[k].shape)}")
    module.load_state_dict({k: source[s] for s, k in names.items()})
