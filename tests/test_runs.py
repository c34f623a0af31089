"""Work dirs and resuming (issue 11, items 3, 7 and 9): ``--resume`` continues the run that was started,
a finished work dir is not overwritten by accident, a failed evaluation or a full disk loses nothing,
and what ``dnc train`` writes is readable by others (0644 under the usual umask).

Runs go through ``dnc.cli.main`` (in this process) on the tiny digits recipe of ``dnc_tiny``.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from dnc.cli import main
from dnc.engine import load_checkpoint, save_checkpoint
from dnc_tiny import CONFIG, TINY, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

SHORT = [*TINY, "train.iters=20", "train.eval_interval=10"]


FOLDER = ["data.dataset=imagefolder", "data.num_classes=2", "data.batch_size=8", "model.backbone_kwargs.width=4",
          "model.backbone_kwargs.num_features=16", "model.dnc.init_samples=64", "train.epochs=0", "sched.warmup_iters=2"]


def train(work: Path, *args: str) -> int:
    return main(["train", CONFIG, "--work-dir", str(work), *args])


def records(work: Path, mode: str) -> list:
    return [r for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if r["mode"] == mode]


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dnc: error: "), err
    return err[0][len("dnc: error: "):]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    assert train(work, *SHORT) == 0
    return work


# ----------------------------------------------------------------------------------------- resume
def test_the_resume_hint_continues_the_run_that_was_started(tmp_path, capsys):
    """Before the fix the hint dropped the overrides, and following it trained a 20-step run toward the
    config file's 60 steps, rewriting config.yaml."""
    work = tmp_path / "run"
    assert train(work, *SHORT, "train.stop_after=7") == 0
    out = capsys.readouterr().out.strip().splitlines()
    # the k-means++ start says what it does before the first step (issue 20: it was silent for minutes)
    assert out.index("k-means++ start: embedding up to 256 training samples") < next(
        i for i, line in enumerate(out) if line.startswith("k-means++ start: 256 embeddings clustered (")) < next(
        i for i, line in enumerate(out) if line.startswith("epoch 1 iter"))
    hint = out[-1].split("resume with: ", 1)[1]
    argv = shlex.split(hint)
    assert argv[:2] == ["dnc", "train"] and "train.iters=20" in argv
    for _ in range(2):  # the same command with --resume: 7 more steps each time (train.stop_after=7), up to 20
        assert main(argv[1:]) == 0
    assert [r["iter"] for r in records(work, "stop")] == [7, 14]
    assert records(work, "val")[-1]["iter"] == 20 and (work / "metrics.json").is_file()
    assert load_checkpoint(work / "last.pt")["train_state"]["it"] == 20


def test_resume_without_overrides_uses_the_saved_config(tmp_path):
    work = tmp_path / "run"
    assert train(work, *SHORT, "train.stop_after=7") == 0
    assert train(work, "--resume") == 0  # the config file alone says 60 steps, a bigger model...
    assert load_checkpoint(work / "last.pt")["train_state"]["it"] == 20
    saved = (work / "config.yaml").read_text()
    assert "iters: 20" in saved and "stop_after: 0" in saved


def test_resume_refuses_an_override_that_changes_the_run(tmp_path, capsys):
    work = tmp_path / "run"
    assert train(work, *SHORT, "train.stop_after=7") == 0
    before = (work / "last.pt").read_bytes()
    capsys.readouterr()
    assert train(work, "--resume", "train.iters=40") == 1
    msg = one_error(capsys)
    assert msg.startswith("train.iters=40: --resume continues the run of") and "train.iters=20" in msg, msg
    assert train(work, "--resume", "data.batch_size=16") == 1
    assert one_error(capsys).startswith("data.batch_size=16:")
    assert (work / "last.pt").read_bytes() == before
    # What may change takes effect; an optimiser setting is ignored, with one warning line.
    assert train(work, "--resume", "optim.lr=0.5", "train.log_interval=2", "train.stop_after=4") == 0
    err = capsys.readouterr().err
    assert "dnc: warning: optim.lr=0.5 is ignored when resuming" in err
    assert [r["iter"] for r in records(work, "train")][-2:] == [8, 10] and records(work, "stop")[-1]["iter"] == 11
    assert load_checkpoint(work / "last.pt")["optimizer"]["param_groups"][0]["initial_lr"] != 0.5


def test_a_finished_work_dir_is_not_overwritten_without_force(finished, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(finished, work)
    files = {p.name: p.read_bytes() for p in work.iterdir()}
    capsys.readouterr()
    assert train(work, *SHORT) == 1
    msg = one_error(capsys)
    assert msg.startswith(f"{work} already holds a run (last.pt, best.pt, metrics.json)") and "--force" in msg
    assert {p.name: p.read_bytes() for p in work.iterdir()} == files
    assert train(work, *SHORT, "train.stop_after=3", "--force") == 0  # starts over: nothing of the old run is left
    assert sorted(p.name for p in work.iterdir()) == ["config.yaml", "last.pt", "log.jsonl"]
    assert records(work, "stop")[0]["iter"] == 3 and not records(work, "val")


@pytest.mark.parametrize("kind", ["model only", "another run"])
def test_resuming_from_a_checkpoint_that_cannot_continue_is_one_line(finished, tmp_path, capsys, kind):
    bad = tmp_path / "bad.pt"
    ckpt = load_checkpoint(finished / "last.pt")
    if kind == "model only":  # what dnc explain writes (anchored.pt): a model to test, not a run to continue
        save_checkpoint(bad, {"model": ckpt["model"], "config": ckpt["config"], "classes": ckpt["classes"]})
        expected = f"{bad}: cannot resume from it: it holds no training state"
    else:
        ckpt["config"]["model"]["head"] = "linear"
        save_checkpoint(bad, {k: v for k, v in ckpt.items() if k != "format"})
        expected = f"{bad}: a checkpoint of another run (model.head is 'linear' there, 'dnc' in {CONFIG})"
    capsys.readouterr()
    assert train(tmp_path / "run", "--resume", str(bad), *SHORT) == 1
    assert one_error(capsys).startswith(expected)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- files
def test_outputs_are_written_with_the_usual_permissions(finished):
    """Atomic writes once went through mkstemp, which creates 0600 files: config.yaml and metrics.json
    were unreadable by the group, unlike the checkpoints."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "metrics.json", "last.pt", "best.pt"):
        assert stat.S_IMODE((finished / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.timeout(180)  # a child process
def test_temporaries_of_a_killed_save_are_removed_at_the_next_start(finished, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(finished, work)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that no longer runs
    alive = subprocess.Popen(["sleep", "60"])
    try:
        (work / f".last.pt.tmp{gone.pid}").write_bytes(b"half a checkpoint")
        (work / f".best.pt.tmp{alive.pid}").write_bytes(b"being written by a live process")
        assert train(work, "--resume", "train.stop_after=1") == 0
    finally:
        alive.kill()
        alive.wait()
    assert not (work / f".last.pt.tmp{gone.pid}").exists()
    assert (work / f".best.pt.tmp{alive.pid}").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(finished, tmp_path, capsys):
    """The checkpoint's temporary file is /dev/full, where every write fails with ENOSPC (a real full disk)."""
    work = tmp_path / "run"
    shutil.copytree(finished, work)
    before = (work / "last.pt").read_bytes()
    (work / f".last.pt.tmp{os.getpid()}").symlink_to("/dev/full")
    capsys.readouterr()
    assert train(work, "--resume", "train.stop_after=1") == 1
    assert one_error(capsys) == f"no space left while writing {work / 'last.pt'}"
    assert (work / "last.pt").read_bytes() == before
    assert not any(p.name.startswith(".") for p in work.iterdir())


# ----------------------------------------------------------------------------------------- evaluation
def image_folder(root: Path, *bad: str) -> None:
    """A two-class image folder of 8x8 images with a train and a val split; ``bad`` are corrupt files."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("val", 3)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    for name in bad:
        (root / name).write_bytes(b"not an image")


def test_a_failed_evaluation_keeps_the_training_before_it(tmp_path, capsys):
    """Before the fix the checkpoint was written after the evaluation: a corrupt validation image lost
    every step since the previous checkpoint."""
    image_folder(tmp_path / "data", "val/b/1.png")
    work = tmp_path / "run"
    rc = train(work, *FOLDER, f"data.root={tmp_path / 'data'}", "train.iters=6", "train.eval_interval=4")
    assert rc == 1
    msg = one_error(capsys)
    assert msg.startswith(f"{tmp_path / 'data' / 'val' / 'b' / '1.png'}: cannot read image"), msg
    assert load_checkpoint(work / "last.pt")["train_state"]["it"] == 4
    assert train(work, "--resume", "train.stop_after=1") == 0  # and the run goes on from there


# ----------------------------------------------------------------------------------------- logs
def test_the_log_carries_throughput_eta_and_plain_progress_lines(finished):
    train_records = records(finished, "train")
    assert [r["iter"] for r in train_records] == [5, 10, 15, 20]
    assert all(r["images_per_s"] > 0 and r["eta_s"] >= 0 and math.isfinite(r["loss"]) for r in train_records)
    assert train_records[-1]["eta_s"] == 0 and train_records[0]["eta_s"] > 0
    assert "max_mem_mib" not in train_records[0]  # the CPU: no GPU memory to report


def test_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
    assert train(tmp_path / "run", *SHORT, "train.stop_after=12") == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if "images/s" in line]
    assert len(lines) == 2 and lines[0].startswith("epoch 1 iter 5/20: loss ") and "ETA 0:00:" in lines[0], out
    assert "train:" not in err  # no progress bar written to a file or pipe


def test_epochs_are_numbered_the_same_in_every_evaluation(tmp_path, capsys):
    """Before the fix the evaluations after epochs 1 and 2 and at the end of epoch 3 said 1, 2, 2."""
    work = tmp_path / "run"
    assert train(work, *TINY, "data.batch_size=256", "train.iters=0", "train.epochs=3", "train.eval_interval=1") == 0
    assert [r["epoch"] for r in records(work, "val")] == [1, 2, 3]
    assert [line.split(" iter")[0] for line in capsys.readouterr().out.splitlines() if ": top1" in line] == \
        ["epoch 1", "epoch 2", "epoch 3"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_log_reports_peak_gpu_memory(tmp_path):
    work = tmp_path / "run"
    assert train(work, *SHORT, "train.device=cuda", "train.stop_after=10") == 0
    assert all(r["max_mem_mib"] > 0 for r in records(work, "train"))


def test_tensorboard_scalars_mirror_the_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    work = tmp_path / "run"
    assert train(work, *SHORT, "train.tensorboard=true") == 0
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/images_per_s", "train/lr", "val/top1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/top1")] == [r["iter"] for r in records(work, "val")]
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["top1"] for r in records(work, "val")])


def test_check_classes_refuses_a_checkpoint_of_other_class_names():
    from dnc.config import ConfigError
    from dnc.tasks import check_classes
    check_classes(["cat", "dog"], ["cat", "dog"], "m.pt")
    check_classes([], ["cat", "dog"], "m.pt")  # an old checkpoint without names: nothing to compare
    with pytest.raises(ConfigError, match=r"^m\.pt: class 1 is 'dog' in the checkpoint but 'fox' in the dataset"):
        check_classes(["cat", "dog"], ["cat", "fox"], "m.pt")
    with pytest.raises(ConfigError, match=r"^m\.pt: trained on 2 classes, the dataset has 3$"):
        check_classes(["cat", "dog"], ["cat", "dog", "fox"], "m.pt")


def test_resuming_after_a_kill_during_evaluation_keeps_the_best_checkpoint(tmp_path):
    """last.pt is saved before each evaluation, so a run killed during or just after one resumes with an
    older best value than best.pt holds: a worse later evaluation must not replace best.pt."""
    work = tmp_path / "run"
    assert train(work, *SHORT, "train.stop_after=12") == 0
    last, best = load_checkpoint(work / "last.pt"), load_checkpoint(work / "best.pt")
    last["train_state"]["best"] = None  # as saved just before the evaluation at step 10
    best["metrics"]["top1"] = 101.0  # and that evaluation was the best any can be
    save_checkpoint(work / "last.pt", {k: v for k, v in last.items() if k != "format"})
    save_checkpoint(work / "best.pt", {k: v for k, v in best.items() if k != "format"})
    before = (work / "best.pt").read_bytes()
    assert train(work, "--resume") == 0
    assert (work / "best.pt").read_bytes() == before
