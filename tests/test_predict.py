"""``dnc predict`` over folders and globs: one record per image, in batches, JSON and CSV outputs."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

import dnc
from dnc.cli import main
from dnc.config import load_config, to_dict
from dnc.data.classification import Digits
from dnc.engine import save_checkpoint
from dnc.data.images import find_images
from dnc_tiny import CONFIG, TINY, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A digits model (DNC head, untrained: predictions are still a fixed function of the image)."""
    cfg = load_config(CONFIG, tuple(TINY))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    save_checkpoint(path, {"model": dnc.build_model(cfg).state_dict(), "config": to_dict(cfg),
                           "classes": [str(i) for i in range(10)]})
    return path


@pytest.fixture()
def shots(tmp_path):
    """13 digit images in nested folders, some 8x8, some enlarged to 24x24, a hidden file and a text file."""
    digits = Digits(train=False)
    files = []
    for i in range(13):
        folder = tmp_path / "shots" / ("a" if i < 5 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(digits[i][0].permute(1, 2, 0).numpy())
        if i % 3 == 0:
            img = img.resize((24, 24), Image.NEAREST)
        files.append(folder / f"d{i:02d}.{'png' if i % 2 else 'jpg'}")
        img.save(files[-1])
    Image.new("RGB", (8, 8)).save(tmp_path / "shots" / "a" / ".hidden.png")
    (tmp_path / "shots" / "notes.txt").write_text("not an image")
    return tmp_path / "shots", sorted(map(str, files))


def _expected(checkpoint, paths):
    model, classes, transform = dnc.load_model(checkpoint)
    with torch.no_grad():
        probs = torch.cat([model(transform(Image.open(p).convert("RGB"))[None]).softmax(1) for p in paths])
    return classes, probs


def test_predict_over_a_folder_writes_one_json_record_per_image(checkpoint, shots, tmp_path, capsys):
    folder, files = shots
    out = tmp_path / "preds.json"
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(folder), "--out", str(out), "--topk", "3", "--batch-size", "4"]) == 0
    records = json.loads(out.read_text())
    assert [r["path"] for r in records] == files  # recursive, sorted, hidden and non-image files skipped
    classes, probs = _expected(checkpoint, files)
    for r, p in zip(records, probs):
        top_p, top_c = p.topk(3)
        assert [t["class"] for t in r["top"]] == [classes[c] for c in top_c] and r["pred"] == r["top"][0]["class"]
        assert [t["score"] for t in r["top"]] == pytest.approx(top_p.tolist(), abs=1e-5)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in printed] == files


def test_predict_expands_globs_and_writes_csv(checkpoint, shots, tmp_path):
    folder, files = shots
    out = tmp_path / "preds.csv"
    assert main(["predict", str(checkpoint), str(folder / "**" / "*.png"), files[0], "--out", str(out),
                 "--topk", "2"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    pngs = [f for f in files if f.endswith(".png")]
    assert [r["path"] for r in rows] == pngs + ([files[0]] if files[0] not in pngs else [])
    assert list(rows[0]) == ["path", "class_1", "score_1", "class_2", "score_2"]
    classes, probs = _expected(checkpoint, [r["path"] for r in rows])
    assert [r["class_1"] for r in rows] == [classes[int(i)] for i in probs.argmax(1)]


def test_find_images_and_bad_inputs(checkpoint, shots, tmp_path, capsys):
    folder, files = shots
    assert find_images([str(folder), files[3]]) == files  # a file already found is not listed twice
    for bad, words in ((str(tmp_path / "missing.png"), ["missing.png", "not found"]),
                       (str(folder / "*.gif"), ["*.gif", "matches no images"])):
        assert main(["predict", str(checkpoint), bad]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(checkpoint), str(tmp_path / "empty")]) == 1
    assert "holds no images" in capsys.readouterr().err
    assert main(["predict", str(checkpoint), files[0], "--out", str(tmp_path / "preds.txt")]) == 1
    assert ".json or .csv" in capsys.readouterr().err
    broken = folder / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["predict", str(checkpoint), str(folder), "--out", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert str(broken) in err and "cannot read image" in err and not (tmp_path / "p.json").exists()
