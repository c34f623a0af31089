"""What an exported model says about itself (``dnc export``): one JSON-ready dict, written by every format.

A runtime without PyTorch needs, besides the weights: the class names, how an image becomes the input
(:func:`dnc.tasks.preprocessing`: resize, crop, interpolation, mean, std), what the outputs are, and
for open-set rejection the score's name and the threshold of ``dnc calibrate``. ONNX keeps the dict as
JSON under the ``metadata_props`` key ``dnc``, safetensors under its metadata key ``dnc``, TorchScript
and ``.pt2`` as the archive's extra file ``dnc.json``, and every export also as ``FILE.json`` beside it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

__all__ = ["METADATA_KEY", "EXTRA_FILE", "file_sha256", "sidecar_path", "export_metadata"]

METADATA_KEY = "dnc"  # ONNX metadata_props and safetensors metadata
EXTRA_FILE = "dnc.json"  # inside TorchScript and .pt2 archives


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(out) -> Path:
    """``FILE.json`` beside the export ``FILE`` (``model.onnx`` -> ``model.onnx.json``)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _outputs(fmt: str, segmentation: bool) -> dict:
    if fmt != "onnx":
        return {"logits": "(B, C, h, w) class scores at the decoder's resolution" if segmentation
                else "(B, C) class scores (softmax gives the probabilities)"}
    if segmentation:
        return {"logits": "(B, C, h, w) class scores at the decoder's resolution",
                "labels": "(B, H, W) int64 class of every pixel of the input (logits upsampled bilinearly)",
                "score": "(B, H, W) open-set score of every pixel of the input (higher: more like a known class)"}
    return {"logits": "(B, C) class scores (softmax gives the probabilities)",
            "score": "(B,) open-set score (higher: more like a known class; below score.threshold: unknown)"}


def export_metadata(cfg, ckpt: dict, checkpoint, fmt: str, layout: Optional[str] = None) -> dict:
    """The self-description of an export of ``checkpoint`` (loaded as ``ckpt``, config ``cfg``) in format
    ``fmt``; ``layout`` (``"nhwc"``/``"nchw"``) when the preprocessing is inside the ONNX graph (its
    input is then a uint8 image)."""
    from . import __version__
    from .ood import default_score
    from .tasks import preprocessing

    m = cfg.model
    ood = ckpt.get("ood") or {}
    dnc = m.head == "dnc"
    temperature = m.dnc.temperature if dnc and m.dnc.calibration == "temperature" else None
    if layout:
        graph_input = {"name": "image", "dtype": "uint8", "layout": layout.upper(),
                       "what": "decoded 8-bit RGB images; the graph resizes, crops and normalises"}
    else:
        graph_input = {"name": "images", "dtype": "float32", "layout": "NCHW",
                       "what": "images after the preprocessing below (resize, crop, (pixel / 255 - mean) / std)"}
    classes = [str(c) for c in (ckpt.get("classes") or range(cfg.data.num_classes))]
    return {
        "format": fmt,
        "dnc_version": __version__,
        "source": {"file": Path(checkpoint).name, "sha256": file_sha256(checkpoint)},
        "task": cfg.task,
        "classes": classes,
        "head": m.head,
        "calibration": m.dnc.calibration if dnc else None,
        "temperature": temperature,
        "num_subcentroids": m.dnc.num_subcentroids if dnc else None,
        "preprocessing": {**preprocessing(cfg), "in_graph": bool(layout)},
        "input": graph_input,
        "outputs": _outputs(fmt, cfg.task == "segmentation"),
        "score": {"name": ood.get("score") or default_score(m.head, cfg.task == "segmentation"), "threshold": ood.get("threshold"),
                  "tpr": ood.get("tpr"), "rule": "unknown when score < threshold"},
        "config": ckpt.get("config"),
    }
