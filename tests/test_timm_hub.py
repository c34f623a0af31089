"""Weights from every source a timm user has, loaded offline from a Hugging Face cache built here.

A small timm model whose ``pretrained_cfg`` has an odd mean/std/crop/interpolation/size is saved with
timm's ``save_for_hf`` (the offline half of ``push_to_hf_hub``) into the cache layout huggingface_hub
reads (``hub/models--ORG--NAME/snapshots/<hash>/`` + ``refs/main``) under a temporary ``HF_HOME``.
huggingface_hub reads ``HF_HOME`` once, at import (``huggingface_hub.constants.HF_HUB_CACHE``): in this
process the constant is patched with the variable; subprocesses get ``HF_HOME`` in their environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

import dnc
from dnc.config import load_config
from dnc.engine import load_checkpoint
from dnc.runconfig import resolve_config
from dnc.tasks import build_model, eval_transform
from dnc_tiny import one_thread, subprocess_env

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

REPO = "acme/tiny-resnet"
MEAN, STD = (0.31, 0.42, 0.53), (0.21, 0.26, 0.29)
SAVED = dict(mean=MEAN, std=STD, crop_pct=0.8, interpolation="bicubic", input_size=(3, 32, 32))
TAG = "test_resnet.r160_in1k"  # timm's own tag: its hub repository is timm/test_resnet.r160_in1k
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _save(hub: Path, repo: str, model: torch.nn.Module) -> Path:
    folder = hub / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("0123456789abcdef" * 3)[:40]
    timm.models.save_for_hf(model, snapshot, safe_serialization=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(snapshot.name)
    return snapshot


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_home")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    model.pretrained_cfg = dict(model.pretrained_cfg, **SAVED)
    snapshot = _save(root / "hub", REPO, model)
    tagged = timm.create_model(TAG)
    _save(root / "hub", "timm/" + TAG, tagged)
    return {"root": root, "snapshot": snapshot, "saved": model.state_dict(), "tagged": tagged.state_dict()}


@pytest.fixture
def offline(home, monkeypatch):
    import huggingface_hub.constants as hf
    monkeypatch.setenv("HF_HOME", str(home["root"]))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HOME", str(home["root"]))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home["root"] / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return home


def _same_backbone(model, saved: dict) -> None:
    got = model.backbone.state_dict()
    assert got.keys() == {k for k in saved if not k.startswith("fc.")}
    differ = [k for k in got if not torch.equal(got[k], saved[k])]
    assert not differ, differ


def _config(*overrides, root="unused"):
    return load_config("custom/imagefolder_dnc.yaml", ("model.backbone=test_resnet", "model.pretrained=null", "data.img_size=null",
                                                       f"data.root={root}",
                                                       "data.num_classes=3", *overrides))


def _normalised(cfg) -> torch.Tensor:
    """Channel values of the evaluation transform of a constant image (100, 150, 200)."""
    x = eval_transform(cfg)(Image.new("RGB", (40, 50), (100, 150, 200)))
    return x[:, x.shape[1] // 2, x.shape[2] // 2]


def _expected(mean, std) -> torch.Tensor:
    return (torch.tensor([100, 150, 200]) / 255 - torch.tensor(mean)) / torch.tensor(std)


# ------------------------------------------------------------------------ the Python API
def test_create_model_from_the_hub_loads_the_saved_tensors_and_config(offline):
    model = dnc.create_model(f"hf-hub:{REPO}", num_classes=3, pretrained=True)
    _same_backbone(model, offline["saved"])
    assert tuple(model.pretrained_cfg["mean"]) == MEAN and tuple(model.pretrained_cfg["std"]) == STD
    assert model.num_classes == 3 and type(model) is type(build_model(_config()))
    data = timm.data.resolve_data_config(model=model.backbone)
    assert tuple(data["mean"]) == MEAN and data["crop_pct"] == 0.8 and data["input_size"] == (3, 32, 32)
    fresh = dnc.create_model(f"hf-hub:{REPO}", num_classes=3)  # the architecture of the hub, no weights
    assert not torch.equal(fresh.backbone.conv1[0].weight, offline["saved"]["conv1.0.weight"])
    assert dnc.create_model(f"hf-hub:{REPO}", pretrained=True).num_classes == 1000  # the weights' classes


# ------------------------------------------------------------------------ model.pretrained in a config
@pytest.mark.parametrize("source", ["hf-hub", "snapshot", "cache-folder"])
def test_every_hub_source_loads_the_saved_tensors_and_their_preprocessing(offline, source):
    where = {"hf-hub": f"hf-hub:{REPO}", "snapshot": str(offline["snapshot"]),
             "cache-folder": str(offline["snapshot"].parents[1])}[source]
    cfg = resolve_config(_config(f"model.pretrained={where}"))
    _same_backbone(build_model(cfg), offline["saved"])
    d = cfg.data
    assert (tuple(d.mean), tuple(d.std), d.crop_pct, d.interpolation, d.img_size) == (MEAN, STD, 0.8, "bicubic", 32)
    assert eval_transform(cfg)(Image.new("RGB", (40, 50))).shape == (3, 32, 32)


@pytest.mark.parametrize("pretrained", ["timm", "true"])
def test_a_tag_in_the_backbone_name_loads_timms_weights_of_that_tag(offline, pretrained):
    cfg = resolve_config(_config(f"model.backbone={TAG}", f"model.pretrained={pretrained}"))
    assert cfg.model.pretrained == "timm"  # YAML true reads as timm's default weights
    _same_backbone(build_model(cfg), offline["tagged"])
    registry = timm.models.get_pretrained_cfg(TAG)  # the tag's preprocessing: timm's registry
    assert (tuple(cfg.data.mean), cfg.data.crop_pct, cfg.data.img_size) == (tuple(registry.mean), registry.crop_pct, 160)


def test_the_weights_normalisation_is_used_not_imagenets(offline):
    cfg = resolve_config(_config(f"model.pretrained=hf-hub:{REPO}"))
    got = _normalised(cfg)
    torch.testing.assert_close(got, _expected(MEAN, STD), atol=0.01, rtol=0)
    assert not torch.allclose(got, _expected(IMAGENET_MEAN, IMAGENET_STD), atol=0.1)
    # an unresolved config (e.g. dnc test CONFIG CHECKPOINT) gets the same values
    torch.testing.assert_close(_normalised(_config(f"model.pretrained=hf-hub:{REPO}")), got)
    # explicit values win
    own = resolve_config(_config(f"model.pretrained=hf-hub:{REPO}", "data.mean=[0.5,0.5,0.5]",
                                 "data.std=[0.5,0.5,0.5]", "data.crop_pct=1.0"))
    assert own.data.mean == [0.5] * 3 and own.data.crop_pct == 1.0 and own.data.interpolation == "bicubic"
    torch.testing.assert_close(_normalised(own), _expected((0.5,) * 3, (0.5,) * 3), atol=0.01, rtol=0)


def test_not_cached_offline_is_one_line_saying_how_to_fetch_it(offline):
    with pytest.raises(ValueError) as e:
        build_model(_config("model.pretrained=hf-hub:acme/missing"))
    msg = str(e.value)
    assert "\n" not in msg and "hf download acme/missing" in msg and str(offline["root"] / "hub") in msg
    with pytest.raises(ValueError, match="hf download timm/resnet10t.c3_in1k"):
        build_model(_config("model.backbone=resnet10t", "model.pretrained=timm"))
    with pytest.raises(ValueError, match="model.backbone=test_resnet"):  # weights of another architecture
        build_model(_config("model.backbone=resnet10t", f"model.pretrained=hf-hub:{REPO}"))
    with pytest.raises(FileNotFoundError, match=f"model.pretrained=hf-hub:{REPO}"):  # a repository without prefix
        build_model(_config(f"model.pretrained={REPO}"))


def test_a_segmentation_encoder_loads_the_hub_weights(offline):
    from dnc.models.encoders import build_encoder
    enc = build_encoder("test_resnet", output_stride=32, pretrained=f"hf-hub:{REPO}")
    got = enc.model.state_dict()
    assert got and all(torch.equal(v, offline["saved"][k]) for k, v in got.items())


# ------------------------------------------------------------------------ dnc train / test, in processes
def _folder(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (36, 44, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_dnc_train_with_hub_weights_saves_their_preprocessing_and_the_classes(home, tmp_path):
    data = _folder(tmp_path / "data")
    env = dict(subprocess_env(), HF_HOME=str(home["root"]))
    env.pop("HF_HUB_CACHE", None)
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "dnc", "train", "custom/imagefolder_dnc.yaml", "--work-dir", str(work),
           "model.backbone=test_resnet", f"model.pretrained=hf-hub:{REPO}", f"data.root={data}", "data.img_size=null",
           "data.batch_size=4", "data.num_workers=0", "train.epochs=0", "train.iters=2", "model.dnc.init_samples=8",
           "train.device=cpu"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if "warmup" in line]
    assert len(warnings) == 1 and "shortened to 2" in warnings[0]  # the config's 100 warm-up steps
    saved = yaml.safe_load((work / "config.yaml").read_text())["data"]
    ckpt = load_checkpoint(work / "last.pt")["config"]["data"]
    for d in (saved, ckpt):
        assert (tuple(d["mean"]), tuple(d["std"]), d["crop_pct"], d["interpolation"], d["img_size"], d["num_classes"]) \
            == (MEAN, STD, 0.8, "bicubic", 32, 3)
    # every later command reads the checkpoint alone, without the hub
    model, classes, transform = dnc.load_model(work / "last.pt")
    assert classes == ["ant", "bee", "cat"]
    x = transform(Image.new("RGB", (40, 50), (100, 150, 200)))
    torch.testing.assert_close(x[:, 16, 16], _expected(MEAN, STD), atol=0.01, rtol=0)
    env["HF_HOME"] = str(tmp_path / "empty")  # not even the cache is needed
    run = subprocess.run([sys.executable, "-m", "dnc", "test", str(work / "last.pt"), "data.num_workers=0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
