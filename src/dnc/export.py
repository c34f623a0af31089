"""Deployment (``dnc export``): ONNX, TorchScript, ``torch.export`` (.pt2) or safetensors.

The exported model maps normalised images ``(B, 3, H, W)`` (the evaluation transform of the config,
described in the export's metadata) to logits: ``(B, C)`` for a classifier, ``(B, C, h, w)`` at the
decoder's resolution for a segmenter. The batch is dynamic, and so are height and width for a
segmenter. A DNC head exports as two matrix products and a max: its sub-centroids are constants of
the graph. The ONNX graph has named outputs: ``logits`` and ``score``, the open-set score that
``dnc predict`` thresholds (:func:`dnc.ood.image_scores`; the calibrated one, else the head's
default), and for a segmenter ``labels`` and ``score`` per pixel of the input. With
``--with-preprocessing nhwc|nchw`` (ONNX, classifiers) the graph takes decoded uint8 images of any
size and resizes, crops and normalises them itself (:mod:`dnc.onnx_graph`).

Every export describes itself (:func:`dnc.export_meta.export_metadata`: classes, preprocessing,
head, temperature, open-set score and threshold, ``dnc`` version, the checkpoint's sha256): in the
ONNX ``metadata_props``, the safetensors metadata, the TorchScript / .pt2 archive (``dnc.json``), and
always in ``FILE.json`` beside the export.

Every export is checked before it is kept: it is written into a temporary folder beside ``--out``
(under the final file name, so that nothing inside an archive names the temporary), loaded back with
its own runtime (onnxruntime for ONNX, ``torch.jit.load``, ``torch.export.load``, or for safetensors
a model rebuilt from the file's metadata), run on a few random inputs of several shapes, and compared
with the PyTorch model, every output. The largest absolute difference is printed; above ``--atol``
the command fails (one line naming ``--out``) and the temporary folder is removed, so ``--out`` only
ever holds a checked export. A graph with the preprocessing is also checked against the PyTorch
evaluation transform (in 8-bit steps: ONNX's antialiased resize is close to torchvision's, not equal).

safetensors holds the state dict (plain tensors only, the sub-centroid step count included) and, as JSON
in the file's metadata, the description with the config and the class names (:func:`read_safetensors`).
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

__all__ = ["FORMATS", "Outputs", "example_inputs", "example_images", "export_model", "check_export",
           "check_preprocessing", "check_composition", "read_safetensors", "run_export"]

FORMATS = ("onnx", "torchscript", "pt2", "safetensors")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "safetensors": ".safetensors"}


def _input_size(cfg, size: Optional[Sequence[int]]) -> tuple:
    if size:
        return tuple(int(s) for s in size)
    d = cfg.data
    if cfg.task == "segmentation":
        return tuple(d.eval_crop or d.crop_size)
    side = d.img_size or {"digits": 8, "cifar": 32}.get(d.preset, 224)
    return side, side


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


class Outputs(nn.Module):
    """What the ONNX graph computes from normalised images: a classifier's ``(logits, score)``
    (:func:`~dnc.ood.image_scores`, score ``kind``), a segmenter's ``(logits, labels, score)``
    (:func:`~dnc.ood.pixel_outputs` at the input's size)."""

    def __init__(self, model: nn.Module, segmentation: bool, kind: Optional[str] = None):
        super().__init__()
        from .embedding import head_of as _head
        from .ood import default_score
        self.model, self.segmentation = model.eval(), segmentation
        self.kind = kind or default_score("dnc" if hasattr(_head(model), "centroids") else "linear", segmentation)
        self.names = ("logits", "labels", "score") if segmentation else ("logits", "score")
        self.train(False)

    def forward(self, images: torch.Tensor):
        from .ood import image_scores, pixel_outputs
        if self.segmentation:
            return pixel_outputs(self.model, images, images.shape[-2:])
        logits, scores = image_scores(self.model, images)
        return logits, scores[self.kind]


def export_model(model: nn.Module, fmt: str, path, example: torch.Tensor, segmentation: bool,
                 metadata: Optional[dict] = None, score: Optional[str] = None) -> None:
    """Write ``model`` (in eval mode) to ``path`` in format ``fmt``, traced on ``example``, with
    ``metadata`` (:func:`~dnc.export_meta.export_metadata`) inside; ONNX computes :class:`Outputs`
    with the open-set ``score`` (default: the head's)."""
    import json

    from .export_meta import EXTRA_FILE, METADATA_KEY
    model = model.eval()
    path = str(path)
    text = json.dumps(metadata or {}, default=str)
    if fmt == "safetensors":
        from safetensors.torch import save
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        Path(path).write_bytes(save(tensors, metadata={METADATA_KEY: text}))  # save_file would create it 0600
        return
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still widely deployed
            torch.jit.save(torch.jit.trace(model, example), path, _extra_files={EXTRA_FILE: text})
        return
    batch = torch.export.Dim.DYNAMIC
    dims = {0: batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC} if segmentation else {0: batch}
    if fmt == "pt2":
        with torch.no_grad():
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({**dims},)), path,
                              extra_files={EXTRA_FILE: text})
        return
    if fmt == "onnx":
        try:
            import onnx
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError:
            raise ValueError("--format onnx needs the optional extra: pip install 'deep-nearest-centroids[export]'") from None
        from .onnx_graph import name_dims, set_metadata
        wrapped = Outputs(model, segmentation, score)
        with torch.no_grad():
            torch.onnx.export(wrapped, (example,), path, dynamo=True, input_names=["images"],
                              output_names=list(wrapped.names), dynamic_shapes=({**dims},), verbose=False,
                              optimize=True, external_data=False)  # one self-contained file (models under 2 GB)
        proto = onnx.load(path)
        name_dims(proto, ["batch", None, "height", "width"])
        if metadata:
            set_metadata(proto, metadata, METADATA_KEY)
        onnx.save(proto, path)
        return
    raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def read_safetensors(path) -> tuple:
    """``(state_dict, metadata)`` of a ``dnc export --format safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("dnc", "{}"))
    return load_file(str(path)), meta


def _ort_session(model):
    """An onnxruntime CPU session of a file or of serialised bytes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("checking an ONNX export needs onnxruntime: pip install 'deep-nearest-centroids[export]'") from None
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])


def _runner(fmt: str, path, cfg):
    """A function ``images -> tuple of outputs`` running the exported file with its own runtime."""
    path = str(path)
    if fmt == "onnx":
        session = _ort_session(path)
        name = session.get_inputs()[0].name
        return lambda x: tuple(torch.from_numpy(o) for o in session.run(None, {name: x.numpy()}))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m = torch.jit.load(path, map_location="cpu").eval()
        return lambda x: (m(x),)
    if fmt == "pt2":
        m = torch.export.load(path).module()
        return lambda x: (m(x),)
    from .tasks import build_model
    state, _ = read_safetensors(path)
    m = build_model(cfg, pretrained="").eval()
    m.load_state_dict(state)
    return lambda x: (m(x),)


def _compare(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor], where: str, names: Sequence[str]) -> float:
    """Largest absolute difference of float outputs; integer outputs (labels) may differ on at most
    0.1% of the elements (near-ties of the logits)."""
    if len(got) != len(ref):
        raise ValueError(f"{where} gives {len(got)} outputs, PyTorch {len(ref)}")
    worst = 0.0
    for name, r, g in zip(names, ref, got):
        if g.shape != r.shape:
            raise ValueError(f"{where} gives {name} of shape {tuple(g.shape)}, PyTorch {tuple(r.shape)}")
        if not r.is_floating_point():
            wrong = float((g != r).double().mean()) if r.numel() else 0.0
            if wrong > 1e-3:
                raise ValueError(f"{where} differs from PyTorch in {100 * wrong:.2g}% of its {name}")
            continue
        diff = float((g.float() - r.float()).abs().max()) if r.numel() else 0.0
        worst = max(worst, diff if diff == diff else float("inf"))  # NaN: infinitely wrong
    return worst


@torch.no_grad()
def check_export(fmt: str, path, model: nn.Module, inputs: Sequence[torch.Tensor], cfg, atol: float,
                 name=None, score: Optional[str] = None) -> float:
    """Largest absolute difference between the exported file and ``model`` over ``inputs`` and every
    output (ONNX: :class:`Outputs` with ``score``); raises ``ValueError`` naming ``name`` (default:
    ``path``) when it exceeds ``atol`` or an output has another shape."""
    run = _runner(fmt, path, cfg)
    model = model.eval()
    segmentation = cfg.task == "segmentation"
    reference = Outputs(model, segmentation, score) if fmt == "onnx" else None
    names = reference.names if reference is not None else ("logits",)
    worst = 0.0
    for x in inputs:
        ref = reference(x) if reference is not None else (model(x),)
        worst = max(worst, _compare(ref, run(x), f"{name or path}: the {fmt} export, for input {tuple(x.shape)},",
                                    names))
    if worst > atol:
        raise ValueError(f"{name or path}: the {fmt} export differs from PyTorch by up to {worst:.3g} "
                         f"(tolerance {atol:g})")
    return worst


def example_images(cfg, layout: str, seed: int = 0) -> list:
    """Smooth random uint8 images in ``layout`` for checking a graph with the preprocessing: a batch of
    2 landscape and one of 1 portrait image, sizes chosen so that the crop offsets round both ways."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    side = max(_input_size(cfg, None))
    out = []
    for n, (h, w) in ((2, (side + 7, 2 * side + 3)), (1, (3 * side + 5, side + 2))):
        low = torch.rand(n, 3, h // 4 + 2, w // 4 + 2, generator=g) * 255
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
        out.append(x.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else x)
    return out


@torch.no_grad()
def check_preprocessing(path, cfg, layout: str, name=None) -> float:
    """Check the preprocessing inside the ONNX graph at ``path`` against the PyTorch evaluation transform
    (:func:`~dnc.tasks.eval_transform`) on :func:`example_images`; returns the largest difference in 8-bit
    steps. The sizes must be equal, the difference at most 32 steps on any pixel and 1 on average (ONNX's
    antialiased ``Resize`` weighs the pixels a little differently from torchvision's and PIL's: on photos
    shrunk 10-fold, a few pixels differ by up to ~20 steps, 0.1-0.6 on average)."""
    import onnx

    from .onnx_graph import preprocessing_model
    from .tasks import eval_transform, preprocessing
    pre = preprocessing(cfg)
    session = _ort_session(preprocessing_model(pre, layout, onnx.load(str(path), load_external_data=False))
                           .SerializeToString())
    transform = eval_transform(cfg)
    scale = torch.tensor(pre["std"]).view(3, 1, 1) * 255
    worst = 0.0
    for images in example_images(cfg, layout):
        got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
        chw = images.permute(0, 3, 1, 2) if layout == "nhwc" else images
        ref = torch.stack([transform(x) for x in chw])
        if got.shape != ref.shape:
            raise ValueError(f"{name or path}: the preprocessing in the graph gives shape {tuple(got.shape)} for "
                             f"images {tuple(chw.shape)}, PyTorch's {tuple(ref.shape)}")
        steps = (got - ref).abs() * scale
        if float(steps.max()) > 32 or float(steps.mean()) > 1:
            raise ValueError(f"{name or path}: the preprocessing in the graph differs from PyTorch's by up to "
                             f"{float(steps.max()):.3g} 8-bit steps ({float(steps.mean()):.3g} on average)")
        worst = max(worst, float(steps.max()))
    return worst


@torch.no_grad()
def check_composition(path, plain, cfg, layout: str, name=None) -> float:
    """Largest difference between the graph with the preprocessing (``path``) and its preprocessing
    followed by the checked graph without it (``plain``), every output, on :func:`example_images`."""
    import onnx

    from .onnx_graph import preprocessing_model
    from .tasks import preprocessing
    full, net = _ort_session(path), _ort_session(plain)
    pre = _ort_session(preprocessing_model(preprocessing(cfg), layout, onnx.load(str(plain))).SerializeToString())
    names = [o.name for o in net.get_outputs()]
    worst = 0.0
    for images in example_images(cfg, layout):
        got = [torch.from_numpy(o) for o in full.run(None, {"image": images.numpy()})]
        ref = [torch.from_numpy(o) for o in net.run(None, {"images": pre.run(None, {"image": images.numpy()})[0]})]
        worst = max(worst, _compare(ref, got, f"{name or path}: the graph with the preprocessing", names))
    return worst


def run_export(checkpoint, fmt: str, out, atol: float = 1e-3, size: Optional[Sequence[int]] = None,
               layout: Optional[str] = None, force: bool = False) -> dict:
    """``dnc export``: export the model of ``checkpoint``, check it, and move it to ``out``, its
    description to ``out.json`` (existing files only with ``force``, never the checkpoint); ``layout``
    (``"nhwc"``/``"nchw"``, ONNX classifiers) puts the preprocessing into the graph."""
    import shutil
    import tempfile

    from .config import Config, from_dict
    from .engine import load_checkpoint
    from .export_meta import export_metadata, sidecar_path
    from .files import write_json
    from .onnx_graph import LAYOUTS
    from .tasks import load_trained_model

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"--size expects H W (two positive integers), got {' '.join(map(str, size))}")
    if layout is not None and (fmt != "onnx" or layout not in LAYOUTS):
        raise ValueError(f"--with-preprocessing {layout}: needs --format onnx and a layout ({', '.join(LAYOUTS)})")
    if not math.isfinite(atol) or atol < 0:
        raise ValueError(f"--atol must be a finite number >= 0, got {atol}")
    for path in (out, sidecar_path(out)):
        check_output(path, [checkpoint], force)
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{checkpoint}: has no 'config'; write it with dnc train")
    cfg = from_dict(Config, ckpt["config"])
    cfg.train.amp = "none"
    if layout is not None and cfg.task != "classification":
        raise ValueError("--with-preprocessing: for classifiers only (a segmenter's graph takes normalised images; "
                         "its metadata describes the preprocessing)")
    model = load_trained_model(cfg, ckpt, checkpoint).eval()
    inputs = example_inputs(cfg, size)
    meta = export_metadata(cfg, ckpt, checkpoint, fmt, layout)
    score = meta["score"]["name"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    tmp = folder / out.name  # the final name: archives name their root folder after the file
    result = {"format": fmt, "out": str(out), "inputs": [list(x.shape) for x in inputs], "atol": atol}
    try:
        try:
            export_model(model, fmt, tmp, inputs[1], cfg.task == "segmentation", meta, score)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters raise many types; one line names the cause
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ValueError(f"{checkpoint}: {fmt} export to {out} failed: {msg.replace(str(tmp), str(out))}") from None
        result["max_abs_diff"] = check_export(fmt, tmp, model, inputs, cfg, atol, out, score)
        if layout is not None:
            import onnx

            from .onnx_graph import add_preprocessing
            plain = folder / f"plain{out.suffix}"
            os.replace(tmp, plain)
            onnx.save(add_preprocessing(onnx.load(str(plain)), meta["preprocessing"], layout), str(tmp))
            result["preprocessing_max_steps"] = check_preprocessing(tmp, cfg, layout, out)
            worst = check_composition(tmp, plain, cfg, layout, out)
            if worst > atol:
                raise ValueError(f"{out}: the graph with the preprocessing differs from the preprocessing followed "
                                 f"by the network by up to {worst:.3g} (tolerance {atol:g})")
        os.replace(tmp, out)
        write_json(sidecar_path(out), meta)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**result, "metadata": str(sidecar_path(out)), "score": score,
            "threshold": meta["score"]["threshold"]}
