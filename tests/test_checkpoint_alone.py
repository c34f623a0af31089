"""Every command on a checkpoint takes it alone (its saved config), the config file being optional; and
``data.num_classes`` comes from the class folders when the config does not give it."""
from __future__ import annotations

import pytest

from dnc.cli import main
from dnc.engine import load_checkpoint

from openset_tiny import DNC_CFG, overrides, write_digits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = write_digits(tmp_path_factory.mktemp("digits"), train_per_class=20, val_per_class=8)
    work = tmp_path_factory.mktemp("work") / "dnc"
    without_classes = [o for o in overrides(root, iters=20) if not o.startswith("data.num_classes")]
    assert main(["train", DNC_CFG, "--work-dir", str(work), *without_classes, "data.num_classes=null"]) == 0
    return root, work / "last.pt"


def test_num_classes_comes_from_the_class_folders(trained, capsys):
    root, ckpt = trained
    assert load_checkpoint(ckpt)["config"]["data"]["num_classes"] == 6
    assert main(["train", DNC_CFG, "--work-dir", str(ckpt.parent.parent / "x"), *overrides(root, num_classes=7)]) == 1
    assert "has 6 classes but the config says num_classes=7" in capsys.readouterr().err


def test_calibrate_extend_and_explain_take_the_checkpoint_alone(trained, tmp_path):
    root, ckpt = trained
    assert main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal.pt")]) == 0
    assert load_checkpoint(tmp_path / "cal.pt")["ood"]["score"] == "cosine"
    assert main(["extend", str(ckpt), "--add", f"6={root / 'new' / '6'}", "--out", str(tmp_path / "ext.pt")]) == 0
    assert load_checkpoint(tmp_path / "ext.pt")["classes"][-1] == "6"
    assert main(["explain", str(ckpt), "--out", str(tmp_path / "explain"), "--top-m", "2", "--examples", "0"]) == 0
    assert (tmp_path / "explain" / "anchored.pt").is_file()
    # the config file, as before, with an override
    assert main(["calibrate", DNC_CFG, str(ckpt), "--out", str(tmp_path / "cal2.pt"), *overrides(root, iters=20),
                 "data.num_classes=null"]) == 0
