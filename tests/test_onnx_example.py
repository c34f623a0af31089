"""examples/onnx_predict.py: an ONNX export alone, run where torch and dnc cannot be imported, gives the
classes and "unknown" verdicts of dnc predict; its PIL preprocessing is the evaluation transform's."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dnc.cli import main
from dnc.config import load_config
from dnc.predict import run_predict
from dnc.tasks import eval_transform, preprocessing

from openset_tiny import DNC_CFG, overrides, write_digits

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"
# the digits seen as small photos: resize the short side to 18, centre crop 16, normalisation of our own
PRESET = ["data.preset=imagenet", "data.img_size=16", "data.mean=[0.4,0.45,0.5]", "data.std=[0.3,0.25,0.2]"]


def _example_module():
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _images(root: Path, digits: Path) -> list:
    """scikit-learn's two sample photos, and digits (known and unknown classes) at varied sizes and
    aspect ratios, as PNG and JPEG, one of them rotated by its EXIF tag."""
    from sklearn.datasets import load_sample_images
    root.mkdir()
    paths = []
    for i, photo in enumerate(load_sample_images().images):
        paths.append(root / f"photo{i}.jpg")
        Image.fromarray(photo).save(paths[-1], quality=90)
    rng = np.random.default_rng(0)
    files = sorted((digits / "known" / "val").rglob("*.png"))[::4] + sorted((digits / "unknown").rglob("*.png"))[::3]
    for i, f in enumerate(files):
        h, w = (int(v) for v in rng.integers(12, 90, 2))
        img = Image.open(f).convert("RGB").resize((w, h), Image.BICUBIC)
        paths.append(root / f"d{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
        img.save(paths[-1], **({"quality": 95} if i % 3 == 0 else {}))
    upright = Image.open(files[0]).convert("RGB").resize((40, 24))
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says: turn back
    exif = rotated.getexif()
    exif[0x0112] = 6
    paths.append(root / "exif_rotated.jpg")
    rotated.save(paths[-1], exif=exif, quality=100)
    paths.append(root / "upright.jpg")
    upright.save(paths[-1], quality=100)
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny DNC classifier trained on six digits and calibrated, and the images to classify."""
    tmp = tmp_path_factory.mktemp("example")
    digits = write_digits(tmp / "digits")
    extra = overrides(digits, iters=40) + PRESET
    assert main(["train", DNC_CFG, "--work-dir", str(tmp / "run"), *extra]) == 0
    ckpt = tmp / "calibrated.pt"
    assert main(["calibrate", DNC_CFG, str(tmp / "run" / "last.pt"), "--out", str(ckpt), *extra]) == 0
    return ckpt, _images(tmp / "images", digits), tmp


def _blocked_env(tmp: Path) -> dict:
    """Environment in which torch, torchvision, timm and dnc cannot be imported."""
    blocked = tmp / "blocked"
    for name in ("torch", "torchvision", "timm", "dnc"):
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(blocked)
    return env


def _run_example(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("layout", [None, "nhwc", "nchw"])
def test_example_without_torch_agrees_with_dnc_predict(calibrated, layout, capsys):
    ckpt, paths, tmp = calibrated
    env = _blocked_env(tmp)
    for name in ("torch", "dnc"):  # the blocking works
        r = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "blocked in this test" in r.stderr
    model = tmp / f"model_{layout}.onnx"
    flag = ["--with-preprocessing", layout] if layout else []
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(model), *flag]) == 0
    out = tmp / f"example_{layout}.json"
    r = _run_example(env, model, *paths, "--out", out)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    ref = run_predict(ckpt, paths, out=tmp / "predict.json")
    capsys.readouterr()
    assert [g["path"] for g in got] == [p["path"] for p in ref] == paths
    same_class = np.mean([g["pred"] == p["pred"] for g, p in zip(got, ref)])
    same_verdict = np.mean([g["ood"]["unknown"] == p["ood"]["unknown"] for g, p in zip(got, ref)])
    assert same_class >= 0.97 and same_verdict >= 0.97, (same_class, same_verdict)
    assert 0 < sum(p["ood"]["unknown"] for p in ref) < len(ref)  # both verdicts occur: the comparison means something
    if layout is None:  # PIL's resize is torchvision's to one 8-bit step: everything agrees, probabilities too
        assert same_class == 1 and same_verdict == 1
        for g, p in zip(got, ref):
            assert [t["class"] for t in g["top"]] == [t["class"] for t in p["top"]]
            np.testing.assert_allclose([t["score"] for t in g["top"]], [t["score"] for t in p["top"]], atol=2e-3)
            assert abs(g["ood"]["score"] - p["ood"]["score"]) < 2e-3
    by_name = {Path(g["path"]).name: g for g in got}  # the EXIF orientation is applied
    assert by_name["exif_rotated.jpg"]["pred"] == by_name["upright.jpg"]["pred"]
    assert abs(by_name["exif_rotated.jpg"]["ood"]["score"] - by_name["upright.jpg"]["ood"]["score"]) < 0.02


def test_example_writes_the_csv_of_dnc_predict(calibrated, capsys):
    ckpt, paths, tmp = calibrated
    model = tmp / "model_csv.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(model)]) == 0
    r = _run_example(_blocked_env(tmp), model, *paths[:6], "--out", tmp / "example.csv", "--topk", "3")
    assert r.returncode == 0, r.stderr
    run_predict(ckpt, paths[:6], out=tmp / "predict.csv", topk=3)
    capsys.readouterr()
    rows = [line.split(",") for line in (tmp / "example.csv").read_text().splitlines()]
    ref = [line.split(",") for line in (tmp / "predict.csv").read_text().splitlines()]
    assert rows[0] == ref[0] == ["path", "class_1", "score_1", "class_2", "score_2", "class_3", "score_3", "unknown"]
    assert [(r[0], r[1], r[-1]) for r in rows] == [(r[0], r[1], r[-1]) for r in ref]


def test_example_refuses_a_file_without_metadata(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    r = _run_example(_blocked_env(tmp_path), tmp_path / "m.onnx", tmp_path / "a.png")
    assert r.returncode == 1 and "no 'dnc' metadata" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["data.preset=imagenet", "data.img_size=24"],
                                   ["data.preset=imagenet", "data.img_size=20", "data.crop_pct=0.95"],
                                   ["data.preset=swin", "data.img_size=16"],
                                   ["data.preset=cifar", "data.img_size=16", "data.interpolation=bicubic"],
                                   ["data.preset=digits"], ["data.preset=none"]])
def test_the_description_is_the_evaluation_transform(extra):
    """The example's PIL preprocessing, driven only by tasks.preprocessing(cfg), gives the tensors of
    tasks.eval_transform(cfg) to one 8-bit step, on images of many sizes (crop offsets rounding both ways)."""
    cfg = load_config(DNC_CFG, tuple(extra))
    pre, transform, example = preprocessing(cfg), eval_transform(cfg), _example_module()
    rng = np.random.default_rng(1)
    scale = 255 * np.asarray(pre["std"], np.float32)[:, None, None]
    for h, w in ((37, 53), (53, 37), (40, 41), (19, 96), (64, 64), (9, 9)):
        low = rng.integers(0, 256, (h // 3 + 2, w // 3 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        got = example.preprocess(img, pre)
        ref = transform(img).numpy()
        assert got.shape == ref.shape
        assert (np.abs(got - ref) * scale).max() <= 1.001, (h, w)
    if cfg.data.preset == "none":
        assert pre["input_size"] is None and pre["resize"] is None
    else:
        assert pre["input_size"] == list(ref.shape[-2:])
