"""``data.on_bad_sample=skip`` (issue 11, item 4): unreadable samples are left out and counted in training
and evaluation, for classification and segmentation alike, and ``dnc test --out`` records carry the
dataset index of the sample they describe."""
from __future__ import annotations

import json

import pytest

from dnc.cli import main
from dnc_tiny import CONFIG, one_thread
from test_runs import FOLDER, image_folder, records
from test_segmentation import make_camvid

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_skipped_images_are_counted_and_records_keep_their_dataset_index(tmp_path):
    """Before the fix the records after a skipped image were shifted (each took its batch neighbour's
    index), skipped evaluation images were not counted, and a batch whose images were all skipped reached
    the model as an empty tensor."""
    image_folder(tmp_path / "data", "val/b/0.png", "train/a/5.png")  # val: a/0 a/1 a/2 b/0 b/1 b/2
    work, data = tmp_path / "run", [*FOLDER, f"data.root={tmp_path / 'data'}", "data.on_bad_sample=skip"]
    assert main(["train", CONFIG, "--work-dir", str(work), *data, "train.iters=20", "train.log_interval=10"]) == 0
    assert sum(r["skipped"] for r in records(work, "train")) == 2  # the bad training image, in epochs 1 and 2
    assert json.loads((work / "metrics.json").read_text())["skipped"] == 1
    for batch in ("2", "1"):  # a batch of one: the bad image's batch is empty
        out = tmp_path / f"preds{batch}.json"
        argv = ["test", CONFIG, str(work / "last.pt"), "--out", str(out), *data, "train.iters=20"]
        assert main([*argv, f"data.eval_batch_size={batch}"]) == 0
        result = json.loads(out.read_text())
        assert result["skipped"] == 1
        assert [(p["index"], p["label"]) for p in result["predictions"]] == [(0, 0), (1, 0), (2, 0), (4, 1), (5, 1)]


def test_segmentation_skips_unreadable_images_when_asked(tmp_path, capsys):
    """Segmentation used to ignore data.on_bad_sample: one unreadable image stopped the run."""
    make_camvid(tmp_path / "camvid")
    (tmp_path / "camvid" / "val" / "images" / "2.jpg").write_bytes(b"not a jpeg")
    work = tmp_path / "work"
    config = "configs/segmentation/camvid/fcn_r18-d8_1x16_176x176_2k_camvid_dnc.yaml"
    overrides = [f"data.root={tmp_path / 'camvid'}", "data.crop_size=[32,32]", "data.batch_size=2", "data.num_workers=0",
                 "model.decoder_channels=16", "train.iters=2", "train.eval_interval=2", "train.amp=none",
                 "model.backbone=resnet18d", "data.check_labels=false"]
    assert main(["train", config, "--work-dir", str(work), *overrides]) == 1
    assert "2.jpg: cannot read image" in capsys.readouterr().err
    assert main(["train", config, "--work-dir", str(work), "--force", *overrides, "data.on_bad_sample=skip"]) == 0
    assert json.loads((work / "metrics.json").read_text())["skipped"] == 1
