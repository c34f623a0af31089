"""The ``dnc`` command line: outputs of ``train``, ``test`` reproducing them, one-line errors."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import yaml
from PIL import Image

from dnc.cli import main
from dnc.config import PACKAGE_CONFIGS, load_config
from dnc.runconfig import resolve_config
from dnc.data.classification import Digits
from dnc_tiny import CONFIG, NUM_VAL, TINY, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

RUN = TINY + ["train.iters=30", "train.eval_interval=10"]


def error_line(capsys) -> str:
    """The one line ``dnc`` wrote to stderr (the progress bar aside), checked to be one clear line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line.strip() for line in err.splitlines() if line.strip() and not line.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("dnc: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    assert main(["train", CONFIG, "--work-dir", str(work), *RUN]) == 0
    return work


def test_train_writes_the_work_dir(trained):
    assert {p.name for p in trained.iterdir()} == {"config.yaml", "log.jsonl", "last.pt", "best.pt", "metrics.json"}
    # The saved config is complete: the config file's, with what it left open made explicit (no null mean/std).
    saved = load_config(str(trained / "config.yaml"))
    assert saved == resolve_config(load_config(CONFIG, tuple(RUN)))
    assert (saved.data.mean, saved.data.std) == ([0.5] * 3, [0.5] * 3)
    recs = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if r["mode"] == "val"] == [10, 20, 30]
    assert [r["iter"] for r in recs if r["mode"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(r["ce"]) and r["skipped"] == 0 for r in recs if r["mode"] == "train")


@pytest.mark.parametrize("which", ["best", "last"])
def test_test_reproduces_the_accuracy_training_reported(trained, tmp_path, capsys, which):
    recs = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["mode"] == "val"]
    if which == "best":  # best.pt holds the first evaluation with the highest top-1
        reported = max(val, key=lambda r: (r["top1"], -r["iter"]))
    else:
        reported = json.loads((trained / "metrics.json").read_text())
        assert reported == {k: val[-1][k] for k in ("top1", "top5")}
    out = tmp_path / "result.json"
    capsys.readouterr()
    assert main(["test", str(trained / "config.yaml"), str(trained / f"{which}.pt"), "--out", str(out),
                 "--metrics", "accuracy"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(out.read_text())
    assert result["top1"] == printed["top1"] == reported["top1"]
    assert result["top5"] == printed["top5"] == reported["top5"]

    # One prediction per held-out digit, each with its top-5 classes and their probabilities.
    preds = result["predictions"]
    targets = Digits(train=False, val_fraction=0.0501).targets
    assert len(preds) == NUM_VAL and [p["index"] for p in preds] == list(range(NUM_VAL))
    assert [p["label"] for p in preds] == targets
    for p in preds:
        assert len(p["topk"]) == 5 == len(set(p["topk"])) and p["pred"] == p["topk"][0]
        assert p["scores"] == sorted(p["scores"], reverse=True) and 0 <= p["scores"][-1] <= p["scores"][0] <= 1
    assert 100 * np.mean([p["pred"] == p["label"] for p in preds]) == pytest.approx(result["top1"], abs=1e-9)
    assert 100 * np.mean([p["label"] in p["topk"] for p in preds]) == pytest.approx(result["top5"], abs=1e-9)
    assert result["classes"] == [str(i) for i in range(10)]


def test_test_writes_pickle(trained, tmp_path):
    out_json, out_pkl = tmp_path / "r.json", tmp_path / "r.pkl"
    assert main(["test", CONFIG, str(trained / "last.pt"), "--out", str(out_pkl), *RUN]) == 0
    assert main(["test", CONFIG, str(trained / "last.pt"), "--out", str(out_json), *RUN]) == 0
    with open(out_pkl, "rb") as f:
        from_pkl = pickle.load(f)
    from_json = json.loads(out_json.read_text())
    assert from_pkl == from_json and len(from_pkl["predictions"]) == NUM_VAL


def test_test_rejects_a_bad_metric_or_output(trained, tmp_path, capsys):
    assert main(["test", CONFIG, str(trained / "last.pt"), "--metrics", "mIoU", *RUN]) == 1
    line = error_line(capsys)
    assert "mIoU" in line and "accuracy" in line
    assert main(["test", CONFIG, str(trained / "last.pt"), "--out", str(tmp_path / "r.txt")]) == 1
    assert "r.txt" in error_line(capsys)


def test_overrides_may_follow_options(tmp_path):
    """``dnc train CONFIG --work-dir DIR key=value`` and ``--resume key=value`` (as documented)."""
    work = tmp_path / "run"
    assert main(["train", CONFIG, "--work-dir", str(work), *RUN, "train.stop_after=3"]) == 0
    assert main(["train", CONFIG, "--work-dir", str(work), "--resume", *RUN, "train.stop_after=2"]) == 0
    recs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["iter"]) for r in recs if r["mode"] in ("stop", "resume")] == \
        [("stop", 3), ("resume", 3), ("stop", 5)]


# ------------------------------------------------------------------------------------- config errors
def _file_with(tmp_path, extra: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"_base_": str(PACKAGE_CONFIGS / CONFIG), **extra}))
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ({"file": {"train": {"bogus": 1}}}, ["'train.bogus'", "valid keys", "iters", "stop_after"]),
    ({"overrides": ["model.dnc.bogus=1"]}, ["'model.dnc.bogus'", "valid keys", "num_subcentroids"]),
    ({"overrides": ["bogus=1"]}, ["'bogus'", "valid keys", "task", "model", "train"]),
    ({"file": {"data": {"batch_size": "big"}}}, ["'data.batch_size'", "int", "big"]),
    ({"overrides": ["train.iters=ten"]}, ["'train.iters'", "int", "ten"]),
    ({"overrides": ["model.dnc=4"]}, ["'model.dnc'", "mapping"]),
    ({"overrides": ["model.head=knn"]}, ["'model.head'", "knn", "valid choices", "dnc", "linear"]),
    ({"overrides": ["sched.name=linear"]}, ["'sched.name'", "step", "exp", "cosine", "poly"]),
    ({"overrides": ["data.dataset=cifar10", "data.root=/nonexistent/cifar"]}, ["/nonexistent/cifar"]),
    ({"overrides": ["data.dataset=imagefolder", "data.root=/nonexistent/images"]}, ["/nonexistent/images"]),
    ({"overrides": ["data.dataset=imagefolder"]}, ["data.root", "imagefolder"]),
    ({"overrides": ["data.num_classes=12"]}, ["10", "12"]),
    ({"overrides": ["train.iters=5", "train.epochs=3"]}, ["train.epochs", "train.iters"]),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, case, expected):
    config = _file_with(tmp_path, case["file"]) if "file" in case else CONFIG
    rc = main(["train", config, "--work-dir", str(tmp_path / "run"), *case.get("overrides", [])])
    line = error_line(capsys)
    assert rc == 1
    for word in expected:
        assert word in line, (word, line)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- bad image files
@pytest.fixture()
def image_folder(tmp_path):
    """root/{train,val}/{a,b}/*.png, 8x8, with one corrupt JPEG among the 9 training images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, n in (("train", 4), ("val", 2)):
        for cls, base in (("a", 40), ("b", 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    config = tmp_path / "folder.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classification",
        "model": {"backbone": "tiny_cnn", "backbone_kwargs": {"width": 4, "num_features": 16}, "head": "dnc",
                  "dnc": {"num_subcentroids": 2}},
        "data": {"dataset": "imagefolder", "root": str(root), "num_classes": 2, "preset": "none", "batch_size": 3,
                 "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "device": "cpu", "log_interval": 1},
    }))
    return config, bad


@pytest.mark.timeout(180)  # DataLoader worker processes
@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_an_error_naming_the_file(image_folder, tmp_path, capsys, workers):
    config, bad = image_folder
    assert main(["train", str(config), "--work-dir", str(tmp_path / "run"), f"data.num_workers={workers}"]) == 1
    line = error_line(capsys)
    assert str(bad) in line and "cannot read image" in line, line


def test_corrupt_image_is_skipped_and_counted(image_folder, tmp_path):
    config, bad = image_folder
    work = tmp_path / "run"
    assert main(["train", str(config), "--work-dir", str(work), "data.on_bad_sample=skip"]) == 0
    recs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["mode"] == "train"]
    assert len(train) == 6  # 9 images in batches of 3, two epochs
    assert sum(r["skipped"] for r in train) == 2  # the broken file, once per epoch
    assert json.loads((work / "metrics.json").read_text())["top1"] >= 0


def test_a_batch_of_only_unreadable_images_is_skipped(image_folder, tmp_path):
    config, bad = image_folder
    work = tmp_path / "run"
    assert main(["train", str(config), "--work-dir", str(work), "data.on_bad_sample=skip", "data.batch_size=1"]) == 0
    recs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in recs if r["mode"] == "train") == 2


# ------------------------------------------------------------------------------------- dnc test
def test_test_without_a_config_equals_test_with_it(trained, tmp_path, capsys):
    """The checkpoint holds its config: ``dnc test CKPT`` scores exactly what ``dnc test CONFIG CKPT`` does,
    overrides included; the results carry per-class accuracy, the confusion matrix and image paths."""
    ckpt = str(trained / "last.pt")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["test", ckpt, "--out", str(a)]) == 0
    assert main(["test", CONFIG, ckpt, "--out", str(b), *RUN]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra.pop("config") is None and rb.pop("config") == CONFIG
    assert ra == rb
    assert ra["evaluated"]["split"] == "val" and ra["evaluated"]["samples"] == NUM_VAL
    cm = np.array(ra["confusion"])
    preds = ra["predictions"]
    labels, pred = np.array([p["label"] for p in preds]), np.array([p["pred"] for p in preds])
    assert cm.sum() == NUM_VAL and np.array_equal(cm, np.bincount(labels * 10 + pred, minlength=100).reshape(10, 10))
    per_class = [100 * cm[c, c] / cm[c].sum() for c in range(10)]
    assert ra["per_class_accuracy"] == pytest.approx(per_class)
    assert 100 * np.trace(cm) / NUM_VAL == pytest.approx(ra["top1"])
    assert [p["path"] for p in preds] == [Digits(train=False, val_fraction=0.0501).sample_name(p["index"]) for p in preds]
    # overrides apply to the saved config as they do to the file
    capsys.readouterr()
    assert main(["test", ckpt, "data.dataset_kwargs.val_fraction=0.2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(Digits(train=False))} samples" in out.splitlines()[0]
    assert json.loads(out.splitlines()[-1])["evaluated"]["samples"] == len(Digits(train=False))


def test_test_prints_per_class_figures(trained, capsys):
    capsys.readouterr()
    assert main(["test", str(trained / "last.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("scoring ") and f"{NUM_VAL} samples" in lines[0] and "digits" in lines[0]
    table = lines[lines.index(next(s for s in lines if s.startswith("class"))) + 1:][:10]
    assert [row.split()[0] for row in table] == [str(c) for c in range(10)]
    assert sum(int(row.split()[1]) for row in table) == NUM_VAL
    assert any(s.startswith("confusion matrix") for s in lines)


def test_a_checkpoint_without_a_config_needs_the_config_file(tmp_path, capsys):
    from dnc.engine import save_checkpoint
    from dnc.tasks import build_model
    save_checkpoint(tmp_path / "bare.pt", {"model": build_model(load_config(CONFIG, tuple(TINY))).state_dict()})
    assert main(["test", str(tmp_path / "bare.pt")]) == 1
    assert "no saved config" in error_line(capsys)
    assert main(["test", CONFIG, str(tmp_path / "bare.pt"), *TINY]) == 0


@pytest.fixture(scope="module")
def folder_with_test_split(tmp_path_factory):
    """root/{train,val,test}/{a,b,c}/*.png (7, 2 and 3 images per class) and a DNC model trained on it."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("folder") / "images"
    for split, n in (("train", 7), ("val", 2), ("test", 3)):
        for cls, base in (("a", 30), ("b", 130), ("c", 230)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.integers(-20, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{split}{i}.png")
    config = root.parent / "folder.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classification",
        "model": {"backbone": "tiny_cnn", "backbone_kwargs": {"width": 4, "num_features": 16}, "head": "dnc",
                  "dnc": {"num_subcentroids": 2}},
        "data": {"dataset": "imagefolder", "root": str(root), "num_classes": 3, "preset": "none", "batch_size": 7,
                 "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "device": "cpu", "log_interval": 1},
    }))
    work = root.parent / "run"
    assert main(["train", str(config), "--work-dir", str(work)]) == 0
    return root, work / "last.pt"


@pytest.mark.parametrize("split, per_class", [("test", 3), ("val", 2), ("train", 7)])
def test_split_scores_any_folder_of_an_image_folder(folder_with_test_split, tmp_path, split, per_class):
    root, ckpt = folder_with_test_split
    out = tmp_path / "r.json"
    assert main(["test", str(ckpt), "--split", split, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["evaluated"] == {"split": split, "root": str(root), "samples": 3 * per_class, "holdout": 0,
                                   "source": f"split '{split}' of {root}"}
    assert sorted(p["path"] for p in result["predictions"]) == sorted(str(f) for f in (root / split).rglob("*.png"))
    assert "top5" not in result and "top1" in result  # 3 classes: no top-5
    assert [sum(row) for row in result["confusion"]] == [per_class] * 3


def test_holdout_is_said_to_be_scored(folder_with_test_split, capsys):
    root, ckpt = folder_with_test_split
    capsys.readouterr()
    assert main(["test", str(ckpt), "data.holdout=3"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "3 training images held out" in first and "data.holdout=3" in first and "not its val/ folder" in first
    assert main(["test", str(ckpt), "--split", "nosuch"]) == 1
    assert str(root / "nosuch") in error_line(capsys)


def test_split_test_of_a_camvid_folder(tmp_path, capsys):
    """A segmentation checkpoint scored on CamVid's test/ split, with per-class IoU."""
    from dnc.config import Config, from_dict, to_dict
    from dnc.data.segmentation import CAMVID_CLASSES
    from dnc.engine import save_checkpoint
    from dnc.tasks import build_model
    import torch
    rng = np.random.default_rng(0)
    root = tmp_path / "camvid"
    for split, n in (("train", 1), ("val", 1), ("test", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 12, (24, 32), dtype=np.uint8)).save(root / split / "labels" / f"{i}.png")
    cfg = from_dict(Config, {"task": "segmentation",
                             "data": {"dataset": "camvid", "root": str(root), "num_classes": 11, "scale": None,
                                      "num_workers": 0},
                             "model": {"backbone": "resnet18", "decoder": "fcn", "decoder_channels": 16},
                             "train": {"iters": 1, "device": "cpu"}})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "seg.pt", {"model": build_model(cfg, pretrained="").state_dict(), "config": to_dict(cfg),
                                          "classes": list(CAMVID_CLASSES)})
    capsys.readouterr()
    assert main(["test", str(tmp_path / "seg.pt"), "--split", "test", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["evaluated"]["split"] == "test" and result["evaluated"]["samples"] == 2
    assert len(result["IoU"]) == 11 and "mIoU" in result
    assert "sky" in out and "IoU %" in out and "split 'test'" in out.splitlines()[0]


# ------------------------------------------------------------------------------------- small commands
def test_config_prints_the_resolved_config(capsys):
    capsys.readouterr()
    assert main(["config", CONFIG, *TINY]) == 0
    from dnc.config import Config, from_dict
    assert from_dict(Config, yaml.safe_load(capsys.readouterr().out)) == load_config(CONFIG, tuple(TINY))


def test_version_and_help_of_every_positional_argument(capsys):
    import argparse

    import dnc
    from dnc.cli import build_parser
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"dnc {dnc.__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "test", "explain", "predict", "config", "demo"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings:
                assert action.help, f"dnc {name}: positional {action.dest} has no help"


def test_readme_and_demo_help_state_the_same_demo_time():
    from pathlib import Path

    from dnc.cli import DEMO_TIME
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    make_demo = next(line for line in readme.splitlines() if line.startswith("make demo"))
    assert f"(CPU, {DEMO_TIME})" in make_demo
