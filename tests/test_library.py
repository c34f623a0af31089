"""``import dnc`` as a library: the README's training-loop example, the Lightning example, the public
names, ``load_model`` reproducing ``dnc test``, ``py.typed`` shipped."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import dnc
from dnc.cli import main
from dnc.config import load_config, to_dict
from dnc.data.classification import Digits
from dnc.engine import save_checkpoint
from dnc_tiny import CONFIG, TINY, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
REPO = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block of the README section ``heading``."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_training_loop_example_runs_and_moves_the_subcentroids():
    code = readme_block("Use the head in your own training loop")
    ns: dict = {}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=r"dnc(\.|$)")  # e.g. a head called in training without labels
        exec(compile(code, "README.md", "exec"), ns)
    head = ns["head"]
    assert isinstance(head, dnc.DNCHead)
    assert head.centroids.steps == 3  # one sub-centroid update per training step
    norms = head.centroids.centroids.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert torch.isfinite(ns["loss"]) and ns["predicted"].shape == (16,)
    assert torch.equal(ns["predicted"], ns["model"](ns["images"]).argmax(1))


def test_lightning_example_trains_a_dnc_head():
    spec = importlib.util.spec_from_file_location("lightning_dnc", REPO / "examples" / "lightning_dnc.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["lightning_dnc"] = example
    spec.loader.exec_module(example)
    model, trainer = example.train(40, backbone="resnet10t", size=16, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(model.model, dnc.Classifier) and model.model.head.centroids.steps == 40
    assert trainer.callback_metrics["val_acc"].item() > 0.5  # 10 classes: chance is 0.1


def test_public_names():
    from dnc import centroids, heads, tasks
    assert dnc.DNCHead is heads.DNCHead and dnc.LinearHead is heads.LinearHead and dnc.PixelHead is heads.PixelHead
    assert dnc.SubCentroids is centroids.SubCentroids
    assert dnc.load_model is tasks.load_model and dnc.build_model is tasks.build_model
    assert set(dnc.__all__) <= set(dir(dnc))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dnc.nothing
    model = dnc.build_model(CONFIG, overrides=["model.dnc.num_subcentroids=3", *TINY])
    assert model.head.centroids.centroids.shape == (10, 3, 16)


def test_load_model_predicts_what_dnc_test_scores(tmp_path):
    """A checkpoint through ``load_model``: the model and transform give the predictions of ``dnc test``
    on the held-out digits, from uint8 tensors and from PIL images."""
    cfg = load_config(CONFIG, tuple(TINY))
    torch.manual_seed(0)
    state = {"model": dnc.build_model(cfg).state_dict(), "config": to_dict(cfg)}
    save_checkpoint(tmp_path / "m.pt", {**state, "classes": [str(i) for i in range(10)]})  # the digits' names
    assert main(["test", str(tmp_path / "m.pt"), "--out", str(tmp_path / "r.json")]) == 0
    expected = [p["pred"] for p in json.loads((tmp_path / "r.json").read_text())["predictions"]]

    save_checkpoint(tmp_path / "named.pt", {**state, "classes": [f"digit {i}" for i in range(10)]})
    assert dnc.load_model(tmp_path / "named.pt")[1] == [f"digit {i}" for i in range(10)]  # the checkpoint's names
    model, classes, transform = dnc.load_model(tmp_path / "m.pt")
    assert not model.training and classes == [str(i) for i in range(10)]
    val = Digits(train=False, val_fraction=0.0501)
    images = [val[i][0] for i in range(len(val))]  # uint8 (3, 8, 8)
    with torch.no_grad():
        same = model(torch.stack([transform(img) for img in images])).argmax(1)
    assert same.tolist() == expected
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    with torch.no_grad():
        assert int(model(transform(pil)[None]).argmax()) == expected[0]
    assert transform(Image.new("RGB", (40, 30))).shape == (3, 8, 8)  # any size comes in at the model's input size


def test_py_typed_ships_with_the_package():
    assert (REPO / "src" / "dnc" / "py.typed").is_file()
    package_data = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    assert re.search(r'^dnc = \[.*"py\.typed".*\]', package_data, re.M)
