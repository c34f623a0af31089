"""Deployment (``dnc export``): ONNX, TorchScript, ``torch.export`` (.pt2) or safetensors.

The exported model maps normalised images ``(B, 3, H, W)`` (the evaluation transform of the config)
to logits: ``(B, C)`` for a classifier, ``(B, C, h, w)`` at the decoder's resolution for a segmenter.
The batch is dynamic, and so are height and width for a segmenter. A DNC head exports as two
matrix products and a max: its sub-centroids are constants of the graph.

Every export is checked before it is kept: it is written to a temporary file beside ``--out``,
loaded back with its own runtime (onnxruntime for ONNX, ``torch.jit.load``, ``torch.export.load``,
or for safetensors a model rebuilt from the file's metadata), run on a few random inputs of
several shapes, and compared with the PyTorch model. The largest absolute difference is printed;
above ``--atol`` the command fails (one line) and the temporary file is removed, so ``--out`` only
ever holds a checked export.

safetensors holds the state dict (plain tensors only, the sub-centroid step count included) and, as JSON
in the file's metadata, the config and the class names (:func:`read_safetensors` reads both back).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .files import check_output

__all__ = ["FORMATS", "example_inputs", "export_model", "check_export", "read_safetensors", "run_export"]

FORMATS = ("onnx", "torchscript", "pt2", "safetensors")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "safetensors": ".safetensors"}


def _input_size(cfg, size: Optional[Sequence[int]]) -> tuple:
    """``size``, else the config's evaluation input size (:func:`~dnc.tasks.input_size`); images of any
    size (preset ``none``) are traced at 224 x 224."""
    from .tasks import input_size
    if size:
        return tuple(int(s) for s in size)
    return input_size(cfg) or (224, 224)


def example_inputs(cfg, size: Optional[Sequence[int]] = None, seed: int = 0) -> list:
    """A few random normalised batches: batch sizes 1 and 3 (the export traces the second: a batch
    of 1 would be specialised), and for a segmenter also another
    height and width (+32, +64), so that the dynamic dimensions are checked."""
    g = torch.Generator().manual_seed(seed)
    h, w = _input_size(cfg, size)
    shapes = [(1, 3, h, w), (3, 3, h, w)]
    if cfg.task == "segmentation":
        shapes.append((2, 3, h + 32, w + 64))
    return [torch.randn(s, generator=g) for s in shapes]


def export_model(model: nn.Module, fmt: str, path, example: torch.Tensor, segmentation: bool,
                 metadata: Optional[dict] = None) -> None:
    """Write ``model`` (in eval mode) to ``path`` in format ``fmt``, traced on ``example``."""
    model = model.eval()
    path = str(path)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, path, metadata={"dnc": json.dumps(metadata or {}, default=str)})
        return
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still widely deployed
            torch.jit.save(torch.jit.trace(model, example), path)
        return
    batch = torch.export.Dim.DYNAMIC
    dims = {0: batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC} if segmentation else {0: batch}
    if fmt == "pt2":
        with torch.no_grad():
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({**dims},)), path)
        return
    if fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError:
            raise ValueError("--format onnx needs the optional extra: pip install 'deep-nearest-centroids[export]'") from None
        with torch.no_grad():
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({**dims},), verbose=False, optimize=True,
                              external_data=False)  # one self-contained file (models under 2 GB)
        return
    raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def read_safetensors(path) -> tuple:
    """``(state_dict, metadata)`` of a ``dnc export --format safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("dnc", "{}"))
    return load_file(str(path)), meta


def _runner(fmt: str, path, cfg):
    """A function ``images -> logits`` running the exported file with its own runtime."""
    path = str(path)
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("checking an ONNX export needs onnxruntime: pip install 'deep-nearest-centroids[export]'") from None
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m = torch.jit.load(path, map_location="cpu").eval()
        return lambda x: m(x)
    if fmt == "pt2":
        m = torch.export.load(path).module()
        return lambda x: m(x)
    from .tasks import build_model
    state, _ = read_safetensors(path)
    m = build_model(cfg, pretrained="").eval()
    m.load_state_dict(state)
    return lambda x: m(x)


@torch.no_grad()
def check_export(fmt: str, path, model: nn.Module, inputs: Sequence[torch.Tensor], cfg, atol: float) -> float:
    """Largest absolute difference between the exported file and ``model`` over ``inputs``; raises
    ``ValueError`` naming the file when it exceeds ``atol`` or an output has another shape."""
    run = _runner(fmt, path, cfg)
    model = model.eval()
    worst = 0.0
    for x in inputs:
        ref, got = model(x).float(), run(x).float()
        if got.shape != ref.shape:
            raise ValueError(f"{path}: the {fmt} export gives shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                             f"PyTorch {tuple(ref.shape)}")
        diff = float((got - ref).abs().max()) if ref.numel() else 0.0
        if diff != diff:  # NaN
            diff = float("inf")
        worst = max(worst, diff)
    if worst > atol:
        raise ValueError(f"{path}: the {fmt} export differs from PyTorch by up to {worst:.3g} (tolerance {atol:g})")
    return worst


def run_export(checkpoint, fmt: str, out, atol: float = 1e-3, size: Optional[Sequence[int]] = None,
               force: bool = False) -> dict:
    """``dnc export``: export the model of ``checkpoint``, check it, and move it to ``out`` (an existing file
    only with ``force``, never the checkpoint itself)."""
    from .config import Config, from_dict
    from .engine import load_checkpoint
    from .tasks import load_trained_model

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"--size expects H W (two positive integers), got {' '.join(map(str, size))}")
    if not math.isfinite(atol) or atol < 0:
        raise ValueError(f"--atol must be a finite number >= 0, got {atol}")
    out = check_output(out, [checkpoint], force)
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{checkpoint}: has no 'config'; write it with dnc train")
    cfg = from_dict(Config, ckpt["config"])
    cfg.train.amp = "none"
    model = load_trained_model(cfg, ckpt, checkpoint).eval()
    inputs = example_inputs(cfg, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix or _SUFFIX[fmt]}")
    meta = {"config": ckpt["config"], "classes": list(ckpt.get("classes") or []), "input": "normalised images (B, 3, H, W)"}
    try:
        try:
            export_model(model, fmt, tmp, inputs[1], cfg.task == "segmentation", meta)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters raise many types; one line names the cause
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ValueError(f"{checkpoint}: {fmt} export failed: {msg}") from None
        worst = check_export(fmt, tmp, model, inputs, cfg, atol)
        os.replace(tmp, out)
    finally:
        for leftover in tmp.parent.glob(tmp.name + "*"):  # the file, and ONNX external data if any
            leftover.unlink(missing_ok=True)
    return {"format": fmt, "out": str(out), "max_abs_diff": worst, "inputs": [list(x.shape) for x in inputs],
            "atol": atol}
