"""dnc export: every format, classifiers and segmenters, dynamic shapes, and a check that can fail."""
import importlib.util

import pytest
import torch

from dnc.cli import main
from dnc.config import Config, from_dict, load_config, to_dict
from dnc.engine import save_checkpoint
from dnc.export import check_export, example_inputs, export_model, read_safetensors
from dnc.tasks import build_model

from openset_tiny import DNC_CFG, LINEAR_CFG

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
FORMATS = ["torchscript", "pt2", "safetensors",
           pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs the 'export' extra"))]
TINY = ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16")


def _classifier(tmp_path, config=DNC_CFG, seed=0):
    cfg = load_config(config, TINY)
    torch.manual_seed(seed)
    model = build_model(cfg, pretrained="").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "cls.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "classes": [str(i) for i in range(10)]})
    return cfg, model, path


def _segmenter(tmp_path):
    cfg = from_dict(Config, {"task": "segmentation", "data": {"dataset": "camvid", "num_classes": 4, "crop_size": [32, 48]},
                             "model": {"backbone": "resnet18", "decoder": "fcn", "decoder_channels": 8,
                                       "dnc": {"num_subcentroids": 2}}, "train": {"iters": 1}})
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").eval()
    path = tmp_path / "seg.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "classes": list("abcd")})
    return cfg, model, path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("head", ["dnc", "linear"])
def test_classifier_exports_match_pytorch_on_several_batch_sizes(tmp_path, capsys, fmt, head):
    cfg, model, ckpt = _classifier(tmp_path, DNC_CFG if head == "dnc" else LINEAR_CFG)
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    assert "largest difference from PyTorch" in capsys.readouterr().out and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    # an independent check, on a batch size the export never saw
    x = torch.randn(5, 3, 8, 8)
    assert check_export(fmt, out, model, [x], cfg, 1e-4) <= 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "pt2",
                                 pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs onnx"))])
def test_segmenter_export_has_dynamic_height_and_width(tmp_path, fmt):
    cfg, model, ckpt = _segmenter(tmp_path)
    out = tmp_path / f"seg.{fmt}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    assert [tuple(x.shape[-2:]) for x in example_inputs(cfg)] == [(32, 48), (32, 48), (64, 112)]
    assert check_export(fmt, out, model, [torch.randn(2, 3, 96, 64)], cfg, 1e-3) <= 1e-3


def test_safetensors_holds_plain_tensors_and_the_metadata(tmp_path):
    cfg, model, ckpt = _classifier(tmp_path)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    state, meta = read_safetensors(out)
    assert meta["classes"] == [str(i) for i in range(10)] and meta["config"]["model"]["head"] == "dnc"
    fresh = build_model(cfg, pretrained="")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.head.centroids.centroids, model.head.centroids.centroids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_check_fails_when_the_export_does_not_match(tmp_path, fmt):
    cfg, model, _ = _classifier(tmp_path)
    inputs = example_inputs(cfg)
    out = tmp_path / f"m.{fmt}"
    export_model(model, fmt, out, inputs[1], False)
    assert check_export(fmt, out, model, inputs, cfg, 1e-4) <= 1e-4
    with torch.no_grad():  # the reference moves away from what was exported
        model.head.centroids.centroids = torch.roll(model.head.centroids.centroids, 1, 0)
    with pytest.raises(ValueError, match=rf"m\.{fmt}: the {fmt} export differs from PyTorch by up to"):
        check_export(fmt, out, model, inputs, cfg, 1e-3)


@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx")
def test_a_corrupted_onnx_file_is_caught(tmp_path):
    import onnx
    from onnx import numpy_helper
    cfg, model, _ = _classifier(tmp_path)
    inputs = example_inputs(cfg)
    out = tmp_path / "m.onnx"
    export_model(model, "onnx", out, inputs[1], False)
    proto = onnx.load(str(out))
    init = max(proto.graph.initializer, key=lambda t: len(numpy_helper.to_array(t).reshape(-1)))
    arr = numpy_helper.to_array(init).copy()
    arr.reshape(-1)[: arr.size // 2] *= -1
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(out))
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check_export("onnx", out, model, inputs, cfg, 1e-3)


@pytest.mark.skipif(not HAS_ONNX, reason="needs the 'export' extra")
def test_failed_check_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, capsys):
    _, _, ckpt = _classifier(tmp_path)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    capsys.readouterr()  # onnxruntime's arithmetic is not bit-identical to PyTorch's: a zero tolerance fails
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--atol", "0", "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from PyTorch" in err
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls.pt", "m.onnx"]
