"""Reliability round 3: nothing lost, nothing silently wrong (issue 22).

Each test here failed before its fix: exports over the run's files, ``--force`` losing the old run,
two trainings in one work dir, NaN weights predicting class 0, formula cells in CSV files, hostile
class names, one bad image stopping a whole folder, decompression bombs, and DataLoader workers that
kept a finished process alive.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import dnc
from dnc.cli import main
from dnc.config import ConfigError, load_config, to_dict
from dnc.data.classification import Digits
from dnc.engine import load_checkpoint, save_checkpoint
from dnc.files import write_json
from dnc_tiny import CONFIG, PYTHON, TINY, one_thread, subprocess_env

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

SHORT = [*TINY, "train.iters=20", "train.eval_interval=10"]


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("train:")]
    assert len(err) == 1 and err[0].startswith("dnc: error: "), err
    assert "Traceback" not in err[0] and "[Errno" not in err[0], err
    return err[0][len("dnc: error: "):]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    assert main(["train", CONFIG, "--work-dir", str(work), *SHORT]) == 0
    return work


@pytest.fixture()
def images(tmp_path) -> list:
    """Six digit images, three of them enlarged."""
    digits = Digits(train=False)
    files = []
    for i in range(6):
        img = Image.fromarray(digits[i][0].permute(1, 2, 0).numpy())
        if i % 2:
            img = img.resize((24, 24), Image.NEAREST)
        files.append(tmp_path / "imgs" / f"d{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        img.save(files[-1])
    return files


# ------------------------------------------------------------------------------------ data loss
@pytest.mark.parametrize("target", ["last.pt", "metrics.json", "config.yaml"])
def test_export_never_writes_over_its_input_or_the_runs_files(finished, tmp_path, capsys, target):
    work = tmp_path / "run"
    work.mkdir()
    for name, data in snapshot(finished).items():
        (work / name).write_bytes(data)
    before = snapshot(work)
    capsys.readouterr()
    assert main(["export", str(work / "last.pt"), "--format", "safetensors", "--out", str(work / target)]) == 1
    msg = one_error(capsys)
    assert str(work / target) in msg and ".tmp" not in msg
    assert snapshot(work) == before


def test_export_refuses_an_existing_file_unless_forced_and_never_its_input(finished, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"someone else's file")
    capsys.readouterr()
    assert main(["export", str(finished / "last.pt"), "--format", "safetensors", "--out", str(out)]) == 1
    assert "--force" in one_error(capsys) and out.read_bytes() == b"someone else's file"
    assert main(["export", str(finished / "last.pt"), "--format", "safetensors", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"someone else's file"
    ckpt = finished / "last.pt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(ckpt), "--force"]) == 1
    assert "input" in one_error(capsys) and ckpt.read_bytes() == before


def test_force_keeps_the_old_run_until_the_new_one_has_started(finished, tmp_path, capsys):
    work = tmp_path / "run"
    work.mkdir()
    for name, data in snapshot(finished).items():
        (work / name).write_bytes(data)
    before = snapshot(work)
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a weights file")
    capsys.readouterr()
    assert main(["train", CONFIG, "--work-dir", str(work), *SHORT, f"model.pretrained={bad}", "--force"]) == 1
    assert str(bad) in one_error(capsys)
    assert snapshot(work) == before  # the old run is whole, its config included
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.") or p.name.startswith(".run")]


# --------------------------------------------------------------------------- one run per work dir
def _start(work: Path, *extra: str) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "dnc", "train", CONFIG, "--work-dir", str(work), *TINY, "train.iters=100000",
           "train.eval_interval=100000", *extra]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_training(proc: subprocess.Popen, work: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ((work / "log.jsonl").is_file() and '"mode": "train"' in (work / "log.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_work_dir_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    work = tmp_path / "run"
    proc = _start(work)
    try:
        _wait_training(proc, work)
        for extra in ([], ["--force"], ["--resume"]):
            capsys.readouterr()
            assert main(["train", CONFIG, "--work-dir", str(work), *SHORT, *extra]) == 1
            msg = one_error(capsys)
            assert str(work) in msg and str(proc.pid) in msg, msg
        assert proc.poll() is None  # the running training was not disturbed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    # killed without a chance to clean up: the lock died with it, and the run can be started over
    assert main(["train", CONFIG, "--work-dir", str(work), *SHORT, "train.stop_after=2", "--force"]) == 0


# ---------------------------------------------------------------------------- silently wrong output
@pytest.mark.parametrize("where", ["sub-centroid", "backbone"])
def test_non_finite_weights_are_refused_naming_the_tensor(finished, tmp_path, capsys, images, where):
    ckpt = load_checkpoint(finished / "last.pt")
    names = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()]
    name = next(k for k in names if ("centroids" in k) == (where == "sub-centroid") and "memory" not in k)
    ckpt["model"][name] = ckpt["model"][name].clone()
    ckpt["model"][name].view(-1)[0] = float("nan")
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k != "format"})
    for argv in (["test", str(bad)], ["predict", str(bad), str(images[0])],
                 ["calibrate", str(bad), "--out", str(tmp_path / "c.pt")]):
        capsys.readouterr()
        assert main(argv) == 1, argv
        msg = one_error(capsys)
        assert name in msg and str(bad) in msg, (argv, msg)
    assert not (tmp_path / "c.pt").exists()


def test_non_finite_pretrained_weights_are_refused(tmp_path, capsys):
    cfg = load_config(CONFIG, tuple(TINY))
    state = dnc.build_model(cfg).backbone.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][...] = float("inf")
    weights = tmp_path / "w.pt"
    torch.save(state, weights)
    capsys.readouterr()
    assert main(["train", CONFIG, "--work-dir", str(tmp_path / "run"), *SHORT, f"model.pretrained={weights}"]) == 1
    msg = one_error(capsys)
    assert key in msg and str(weights) in msg


def test_no_nan_is_written_as_json(tmp_path):
    out = tmp_path / "x.json"
    with pytest.raises(ValueError, match=str(out)):
        write_json(out, {"score": float("nan")})
    assert not out.exists()


@pytest.mark.parametrize("override, key", [("model.dnc.sinkhorn_eps=0", "model.dnc.sinkhorn_eps"),
                                           ("model.dnc.sinkhorn_eps=-1", "model.dnc.sinkhorn_eps"),
                                           ("model.dnc.sinkhorn_eps=.nan", "model.dnc.sinkhorn_eps"),
                                           ("model.dnc.temperature=.inf", "model.dnc.temperature"),
                                           ("optim.lr=.nan", "optim.lr")])
def test_invalid_numbers_are_refused_at_config_time(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, (override,))


def test_export_refuses_a_nan_tolerance(finished, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(finished / "last.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.ts"),
                 "--atol", "nan"]) == 1
    assert "--atol" in one_error(capsys)
    assert not (tmp_path / "m.ts").exists()


# --------------------------------------------------------------------------------------- security
def test_csv_cells_cannot_run_as_formulas(finished, tmp_path, images):
    ckpt = load_checkpoint(finished / "last.pt")
    ckpt["classes"] = ["=1+1", "+SUM(A1)", "-2", "@cmd", "four", "five", "six", "seven", "eight", "nine"]
    named = tmp_path / "named.pt"
    save_checkpoint(named, {k: v for k, v in ckpt.items() if k != "format"})
    evil = images[0].with_name("=HYPERLINK(1).png")
    evil.write_bytes(images[0].read_bytes())
    out = tmp_path / "p.csv"
    assert main(["predict", str(named), str(evil), *map(str, images), "--out", str(out), "--topk", "10"]) == 0
    cells = [c for row in csv.reader(out.open()) for c in row]
    assert cells and not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "'=1+1" in cells or any(c.startswith("'") for c in cells)
    # JSON keeps the names as they are
    assert main(["predict", str(named), *map(str, images), "--out", str(tmp_path / "p.json"), "--topk", "10"]) == 0
    recs = json.loads((tmp_path / "p.json").read_text())
    assert {t["class"] for r in recs for t in r["top"]} <= set(ckpt["classes"])


# ------------------------------------------------------------------------- one clear line each
def test_a_class_list_shorter_than_the_head_is_one_line(finished, tmp_path, capsys, images):
    ckpt = load_checkpoint(finished / "last.pt")
    ckpt["classes"] = ckpt["classes"][:3]
    bad = tmp_path / "short.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k != "format"})
    capsys.readouterr()
    assert main(["predict", str(bad), str(images[0])]) == 1
    msg = one_error(capsys)
    assert str(bad) in msg and "3" in msg and "10" in msg


@pytest.mark.parametrize("name", ["a\nb", "a/b", "..", ".", "a\x1bb"])
def test_hostile_class_names_are_refused_where_they_enter(finished, tmp_path, capsys, images, name):
    ckpt = load_checkpoint(finished / "last.pt")
    ckpt["classes"] = [name, *ckpt["classes"][1:]]
    bad = tmp_path / "names.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k != "format"})
    capsys.readouterr()
    if name == "a/b":  # a checkpoint's names may hold "/" (CamVid's "sign/symbol"); file names are sanitised
        assert main(["predict", str(bad), str(images[0]), "--out", str(tmp_path / "p.csv")]) == 0
    else:
        assert main(["predict", str(bad), str(images[0])]) == 1
        assert str(bad) in one_error(capsys)
    capsys.readouterr()
    assert main(["extend", str(finished / "last.pt"), "--add", f"{name}={images[0].parent}",
                 "--out", str(tmp_path / "x.pt")]) == 1
    one_error(capsys)
    assert not (tmp_path / "x.pt").exists()


def test_a_hostile_class_folder_is_refused_naming_it(tmp_path, capsys):
    root = tmp_path / "data"
    for cls in ("ok", "bad\nname"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "train" / cls / f"{i}.png")
    capsys.readouterr()
    assert main(["train", CONFIG, "--work-dir", str(tmp_path / "run"), *SHORT, "data.dataset=imagefolder",
                 f"data.root={root}", "data.num_classes=2", "data.holdout=2"]) == 1
    assert "bad" in one_error(capsys)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))


def test_very_large_and_bad_images_are_one_line_or_skipped(finished, tmp_path, capsys, images):
    bomb = tmp_path / "imgs" / "huge.png"
    _png_claiming(bomb, 12000, 12000)
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    capsys.readouterr()
    assert main(["predict", str(finished / "last.pt"), str(bomb)]) == 1
    msg = one_error(capsys)
    assert str(bomb) in msg and "12000" in msg
    assert main(["predict", str(finished / "last.pt"), str(tmp_path / "imgs")]) == 1
    assert str(broken) in one_error(capsys) or str(bomb) in capsys.readouterr().err
    out = tmp_path / "p.json"
    capsys.readouterr()
    assert main(["predict", str(finished / "last.pt"), str(tmp_path / "imgs"), "--out", str(out), "--skip-bad"]) == 0
    recs = json.loads(out.read_text())
    assert sorted(r["path"] for r in recs) == sorted(map(str, images))
    err = capsys.readouterr().err
    assert str(bomb) in err and str(broken) in err and "skipped 2" in err


# --------------------------------------------------------------------------------- hang at exit
@pytest.mark.timeout(120)
def test_a_process_with_a_live_multiworker_iterator_exits_promptly(tmp_path):
    """Workers ignore SIGTERM (a group SIGTERM must reach the main process first), so Python's exit,
    which terminates and then joins its daemonic children, once waited for them forever."""
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset
        from dnc.engine import DistInfo, make_loader

        collate = lambda b: (torch.stack([x[0] for x in b]), torch.zeros(len(b), dtype=torch.long), 0)
        loader = make_loader(TensorDataset(torch.arange(1000.)), 4, True, DistInfo(0, 1, torch.device("cpu")), 0, 2,
                             collate)
        it = iter(loader)
        next(it)
        raise SystemExit("leaving with a live iterator")
    """))
    start = time.monotonic()
    proc = subprocess.run([PYTHON, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1 and "leaving with a live iterator" in proc.stderr
    assert time.monotonic() - start < 60
