"""The configs for your own data (``configs/custom``): twins with one recipe, and each trains on a
folder of the documented layout given only ``data.root`` and ``data.num_classes`` (here with a tiny
backbone from scratch instead of the pretrained EfficientNet-Lite0, which needs its pip package)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dnc.cli import main
from dnc.config import load_config, to_dict
from dnc_tiny import one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.mark.parametrize("name", ["imagefolder", "segfolder"])
def test_twins_share_one_recipe_with_the_pretrained_backbone(name):
    dnc = to_dict(load_config(f"custom/{name}_dnc.yaml"))
    linear = to_dict(load_config(f"custom/{name}_linear.yaml"))
    assert (dnc["model"].pop("head"), linear["model"].pop("head")) == ("dnc", "linear")
    dnc["model"].pop("dnc"), linear["model"].pop("dnc")
    assert dnc == linear
    assert dnc["model"]["backbone"] == "tf_efficientnet_lite0" and dnc["model"]["pretrained"] == "imagenet"
    assert dnc["data"]["root"] is None


def test_the_data_root_is_required(tmp_path, capsys):
    assert main(["train", "custom/imagefolder_dnc.yaml", "--work-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.root" in err


def test_imagefolder_config_trains_on_a_class_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mine"
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for cls, base in (("cat", 40), ("dog", 140), ("eel", 240)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.clip(base + rng.integers(-20, 20, (20, 24, 3)), 0, 255).astype(np.uint8)).save(
                    root / split / cls / f"{i}.jpg")
    work = tmp_path / "run"
    small = ["model.backbone=tiny_cnn", "model.pretrained=null", "data.img_size=16", "data.batch_size=6",
             "data.num_workers=0", "train.epochs=1", "sched.warmup_iters=0", "model.dnc.init_samples=18"]
    assert main(["train", "custom/imagefolder_dnc.yaml", "--work-dir", str(work), f"data.root={root}",
                 "data.num_classes=3", *small]) == 0
    assert main(["test", str(work / "last.pt"), "--split", "test", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    preds = result["predictions"]
    assert result["evaluated"]["samples"] == 6 and len(preds) == 6
    assert sorted(p["label"] for p in preds) == [0, 0, 1, 1, 2, 2]
    assert result["top1"] == pytest.approx(100 * sum(p["pred"] == p["label"] for p in preds) / 6)


def test_segfolder_config_trains_on_an_image_and_mask_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mine"
    for split, n in (("train", 2), ("val", 1)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / "img_dir" / split / f"{i}.jpg")
            mask = rng.integers(0, 3, (32, 40), dtype=np.uint8)
            mask[:4] = 255
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i}.png")
    work = tmp_path / "run"
    small = ["model.backbone=resnet18", "model.pretrained=null", "model.decoder_channels=16", "data.crop_size=[32,32]",
             "data.scale=null", "data.batch_size=2", "data.num_workers=0", "train.iters=2", "train.eval_interval=2",
             "model.dnc.init_samples=500", "model.dnc.num_subcentroids=2"]
    assert main(["train", "custom/segfolder_dnc.yaml", "--work-dir", str(work), f"data.root={root}",
                 "data.num_classes=3", *small]) == 0
    metrics = json.loads((work / "metrics.json").read_text())
    present = [v for v in metrics["IoU"] if v is not None]
    assert len(metrics["IoU"]) == 3 and present and metrics["mIoU"] == pytest.approx(sum(present) / len(present))
