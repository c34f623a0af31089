"""dnc export describes itself in every format; ONNX outputs logits and the open-set score (and per-pixel
labels and scores of a segmenter); the preprocessing can live in the graph; files are 0644, and no
temporary name reaches an archive or an error message."""
import hashlib
import importlib.util
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dnc.cli import main
from dnc.config import Config, from_dict, load_config, to_dict
from dnc.engine import save_checkpoint
from dnc.export import read_safetensors
from dnc.ood import image_scores, pixel_scores
from dnc.tasks import build_model, eval_transform

from openset_tiny import DNC_CFG, LINEAR_CFG

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs the 'export' extra")
FORMATS = ["torchscript", "pt2", "safetensors", pytest.param("onnx", marks=needs_onnx)]
TINY = ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16", "data.preset=imagenet",
        "data.img_size=16", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]")
OOD = {"score": "cosine", "threshold": 0.25, "tpr": 0.95}


def _checkpoint(tmp_path, config=DNC_CFG, ood=OOD, extra=()):
    cfg = load_config(config, TINY + tuple(extra))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").eval()
    path = tmp_path / "cls.pt"
    state = {"model": model.state_dict(), "config": to_dict(cfg), "classes": [f"c{i}" for i in range(10)]}
    if ood:
        state["ood"] = dict(ood)
    save_checkpoint(path, state)
    return cfg, model, path


def _onnx(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inside(path, fmt) -> dict:
    """The description as the format itself stores it."""
    if fmt == "onnx":
        return json.loads(_onnx(path).get_modelmeta().custom_metadata_map["dnc"])
    if fmt == "safetensors":
        return read_safetensors(path)[1]
    files = {"dnc.json": ""}
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), _extra_files=files)
    else:
        torch.export.load(str(path), extra_files=files)
    return json.loads(files["dnc.json"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_describes_itself_and_is_0644(tmp_path, fmt):
    cfg, _, ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out" / f"model.{fmt}"
    old = os.umask(0o022)
    try:
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    side = out.with_name(out.name + ".json")
    meta = json.loads(side.read_text())
    assert _inside(out, fmt) == meta
    assert meta["classes"] == [f"c{i}" for i in range(10)] and meta["task"] == "classification"
    assert meta["source"] == {"file": "cls.pt", "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert meta["head"] == "dnc" and meta["temperature"] == cfg.model.dnc.temperature and meta["format"] == fmt
    assert meta["score"]["name"] == "cosine" and meta["score"]["threshold"] == 0.25
    pre = meta["preprocessing"]
    assert pre["resize"] == "shorter" and pre["size"] == 18 and pre["crop"] == [16, 16]  # int(16 / 0.875)
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3 and pre["interpolation"] == "bilinear"
    import dnc
    assert meta["dnc_version"] == dnc.__version__
    for f in (out, side):
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, side.name])
    if fmt in ("torchscript", "pt2"):  # the archive's folder is named after the file, not a temporary
        assert {n.split("/")[0] for n in zipfile.ZipFile(out).namelist()} == {"model"}


def test_an_uncalibrated_linear_model_names_its_score_without_threshold(tmp_path):
    _, _, ckpt = _checkpoint(tmp_path, LINEAR_CFG, ood=None, extra=("data.preset=cifar", "data.mean=null",
                                                                     "data.std=null", "data.img_size=null"))
    out = tmp_path / "m.safetensors"
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    meta = read_safetensors(out)[1]
    assert meta["head"] == "linear" and meta["temperature"] is None
    assert meta["score"]["name"] == "energy" and meta["score"]["threshold"] is None
    from dnc.data.transforms import CIFAR10_MEAN, CIFAR10_STD
    pre = meta["preprocessing"]  # null in the config: the preset's values, resolved
    assert pre["mean"] == list(CIFAR10_MEAN) and pre["std"] == list(CIFAR10_STD)
    assert pre["resize"] == "exact" and pre["size"] == [32, 32] and pre["crop"] is None


@needs_onnx
@pytest.mark.parametrize("config,kind", [(DNC_CFG, "cosine"), (DNC_CFG, "energy"), (LINEAR_CFG, "msp")])
def test_onnx_outputs_logits_and_the_score_predict_thresholds(tmp_path, config, kind):
    _, model, ckpt = _checkpoint(tmp_path, config, ood={**OOD, "score": kind})
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    session = _onnx(out)
    assert [o.name for o in session.get_outputs()] == ["logits", "score"]
    x = torch.randn(4, 3, 16, 16)
    logits, score = session.run(None, {"images": x.numpy()})
    ref_logits, ref_scores = image_scores(model, x)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(score, ref_scores[kind].numpy(), atol=1e-4)
    assert session.get_inputs()[0].shape[0] == "batch"


@needs_onnx
@pytest.mark.parametrize("head", ["dnc", "linear"])
def test_onnx_segmenter_gives_labels_and_score_maps_at_the_input_size(tmp_path, head):
    cfg = from_dict(Config, {"task": "segmentation", "data": {"dataset": "camvid", "num_classes": 4, "crop_size": [32, 48]},
                             "model": {"backbone": "resnet18", "decoder": "fcn", "decoder_channels": 8, "head": head,
                                       "dnc": {"num_subcentroids": 2}}, "train": {"iters": 1}})
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").eval()
    ckpt = tmp_path / "seg.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": to_dict(cfg), "classes": list("abcd")})
    out = tmp_path / "seg.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    session = _onnx(out)
    assert [o.name for o in session.get_outputs()] == ["logits", "labels", "score"]
    x = torch.randn(1, 3, 64, 80)
    logits, labels, score = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = model(x)
        up = torch.nn.functional.interpolate(ref, size=(64, 80), mode="bilinear", align_corners=False)
    assert labels.shape == (1, 64, 80) and score.shape == (1, 64, 80) and logits.shape == tuple(ref.shape)
    assert (labels == up.argmax(1).numpy()).mean() > 0.999
    np.testing.assert_allclose(score, pixel_scores(model, x, (64, 80)).numpy(), atol=1e-4)
    meta = json.loads((tmp_path / "seg.onnx.json").read_text())
    assert meta["score"]["name"] == ("cosine" if head == "dnc" else "msp") and meta["preprocessing"]["resize"] == "fit"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--with-preprocessing"]) == 1


@needs_onnx
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_onnx_with_preprocessing_takes_uint8_images_of_any_size(tmp_path, layout):
    from sklearn.datasets import load_sample_images
    cfg, model, ckpt = _checkpoint(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--with-preprocessing", layout]) == 0
    session = _onnx(out)
    inp = session.get_inputs()[0]
    assert inp.name == "image" and inp.type == "tensor(uint8)"
    assert inp.shape == (["batch", "height", "width", 3] if layout == "nhwc" else ["batch", 3, "height", "width"])
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["preprocessing"]["in_graph"] and meta["input"]["layout"] == layout.upper()
    transform = eval_transform(cfg)
    for photo in load_sample_images().images:  # 427 x 640 photos
        for img in (photo, photo[:300, :150], photo.transpose(1, 0, 2)):
            x = np.ascontiguousarray(img if layout == "nhwc" else img.transpose(2, 0, 1))[None]
            logits, score = session.run(None, {"image": x})
            ref_logits, ref_scores = image_scores(model, transform(Image.fromarray(img))[None])
            np.testing.assert_allclose(score, ref_scores["cosine"].numpy(), atol=0.02)
            np.testing.assert_allclose(logits, ref_logits.numpy(), atol=0.2)


def test_a_failed_export_names_out_and_leaves_nothing(tmp_path, capsys):
    _, _, ckpt = _checkpoint(tmp_path)
    out = tmp_path / "dir" / "m.onnx"
    capsys.readouterr()  # onnxruntime is not bit-identical to PyTorch: a zero tolerance fails the check
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--atol", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out}: the onnx export differs from PyTorch" in err
    assert ".export-" not in err and ".tmp" not in err
    assert list(out.parent.iterdir()) == []
    assert main(["export", str(ckpt), "--format", "pt2", "--out", str(out.with_suffix(".pt2")), "--with-preprocessing"]) == 1
    assert "needs --format onnx" in capsys.readouterr().err
