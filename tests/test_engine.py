"""The training engine: exact resumption, signals, checkpoint safety, non-finite losses, schedules.

Runs go through ``dnc.cli.main`` (in this process) on the tiny digits recipe of ``dnc_tiny``.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dnc.cli import EXIT_STOPPED, main
from dnc.config import SchedConfig
from dnc.engine import build_scheduler, load_checkpoint, lr_factor
from dnc.models.classifier import Classifier
from dnc_tiny import (CONFIG, ITERS_PER_EPOCH, PYTHON, TINY, assert_same_training_state, one_thread,
                      sigterm_group_once_training)

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

STOP = 37  # inside the first epoch (53 steps), between two clustering updates (every 3 steps)


def train(work_dir: Path, *overrides: str, resume: bool = False) -> int:
    argv = ["train", CONFIG, "--work-dir", str(work_dir), *TINY, *overrides]
    return main(argv + (["--resume"] if resume else []))


def records(work_dir: Path) -> list:
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of 60 steps."""
    work = tmp_path_factory.mktemp("reference")
    assert train(work) == 0
    return work


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run, stopped after step 37 with a resumable last.pt (the template is copied, not used)."""
    work = tmp_path_factory.mktemp("stopped")
    assert train(work, f"train.stop_after={STOP}") == 0
    return work


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------- exact resume
def test_stop_and_resume_equals_uninterrupted_run(reference, stopped, tmp_path):
    work = copy_run(stopped, tmp_path / "run")
    stop = records(work)[-1]
    assert stop["mode"] == "stop" and stop["reason"] == "stop_after" and stop["iter"] == STOP
    ckpt = load_checkpoint(work / "last.pt")
    assert ckpt["train_state"]["epoch_it"] == STOP < ITERS_PER_EPOCH  # stopped in the middle of an epoch
    assert int(ckpt["model"]["head.centroids.step_count"]) == STOP and STOP % 3  # between two clustering updates:
    # the memory holds pending samples
    assert (ckpt["model"]["head.centroids.memory_y"] >= 0).all()

    assert train(work, resume=True) == 0

    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(work / "last.pt")
    assert_same_training_state(a, b)
    assert a["train_state"]["epoch"] == 1  # the resumed run crossed an epoch boundary
    assert json.loads((reference / "metrics.json").read_text()) == json.loads((work / "metrics.json").read_text())
    val = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs if r["mode"] == "val"]  # noqa: E731
    assert val(records(work)) == val(records(reference))  # evaluations at 25, 50 and 60 agree
    assert_same_training_state(load_checkpoint(reference / "best.pt"), load_checkpoint(work / "best.pt"))


@pytest.mark.timeout(420)  # a training process and its DataLoader workers
def test_sigterm_to_the_process_group_saves_a_resumable_checkpoint_with_loader_workers(tmp_path):
    """What a cluster scheduler does: SIGTERM to every process of the job, DataLoader workers included.
    The workers ignore it, the main process saves last.pt and exits with the "stopped" status (before the
    fix, the workers died and took the run with them: "DataLoader worker exited unexpectedly", no last.pt)."""
    work = tmp_path / "run"
    long = ["train.iters=3000", "train.log_interval=2"]
    returncode, out, err = sigterm_group_once_training([PYTHON, "-m", "dnc", "train", CONFIG, "--work-dir", str(work),
                                                        *TINY, *long, "data.num_workers=2"], work)
    assert returncode == EXIT_STOPPED, err
    assert "Traceback" not in err and "error" not in err, err
    stop = records(work)[-1]
    assert stop["mode"] == "stop" and stop["reason"] == "SIGTERM", stop
    assert 0 < stop["iter"] < 3000 and "stopped by SIGTERM" in out and "resume with" in out
    assert not (work / "metrics.json").exists()

    # The resumed run and an uninterrupted one, both ended 10 steps later (the schedule still spans 3000).
    ref = tmp_path / "reference"
    assert train(ref, *long, f"train.stop_after={stop['iter'] + 10}") == 0
    assert train(work, *long, "train.stop_after=10", resume=True) == 0
    assert_same_training_state(load_checkpoint(ref / "last.pt"), load_checkpoint(work / "last.pt"))


# ----------------------------------------------------------------------------------- checkpoint safety
def test_interrupted_checkpoint_write_keeps_the_previous_one(stopped, tmp_path, monkeypatch, capsys):
    work = copy_run(stopped, tmp_path / "run")
    before = (work / "last.pt").read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):  # the disk fills up half-way through the file
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    assert train(work, "train.stop_after=2", resume=True) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"dnc: error: no space left while writing {work / 'last.pt'}", err[-1]
    assert "Traceback" not in "".join(err)
    monkeypatch.undo()
    assert (work / "last.pt").read_bytes() == before
    assert load_checkpoint(work / "last.pt")["train_state"]["it"] == STOP
    assert sorted(p.name for p in work.iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.jsonl"]  # no temp file


class _Touch:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _foreign(kind: str, path: Path, good: Path, marker: Path) -> None:
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "pickled object":
        path.write_bytes(pickle.dumps(_Touch(marker)))
    elif kind == "torch-saved object":
        torch.save({"format": "dnc-checkpoint", "model": _Touch(marker)}, path)
    elif kind == "plain state dict":
        torch.save(load_checkpoint(good)["model"], path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("command", ["test", "resume"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "random bytes", "pickled object", "torch-saved object",
                                  "plain state dict"])
def test_foreign_or_truncated_checkpoint_is_one_clear_error(stopped, tmp_path, capsys, kind, command):
    bad, marker = tmp_path / "bad.pt", tmp_path / "unpickled-code-ran"
    _foreign(kind, bad, stopped / "last.pt", marker)
    capsys.readouterr()
    if command == "test":
        rc = main(["test", CONFIG, str(bad), *TINY])
    else:
        rc = main(["train", CONFIG, "--work-dir", str(tmp_path / "run"), "--resume", str(bad), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("dnc: error: ") and str(bad) in err[0], err
    assert not marker.exists(), "the checkpoint loader executed code from the file"


# ----------------------------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(stopped, tmp_path, monkeypatch, capsys):
    work = copy_run(stopped, tmp_path / "run")
    before = {name: (work / name).read_bytes() for name in ("last.pt", "best.pt")}
    forward, calls = Classifier.forward, []

    def poisoned(self, images, targets=None):
        out = forward(self, images, targets)
        if targets is None or not self.training:
            return out
        calls.append(1)
        logits, losses = out
        if len(calls) == 45 - STOP:  # training step 45
            losses = {**losses, "ce": losses["ce"] * float("nan")}
        return logits, losses

    monkeypatch.setattr(Classifier, "forward", poisoned)
    # Logs (where the loss is checked) only at 40 and 60, an evaluation and checkpoint at 50 in between.
    assert train(work, "train.log_interval=20", resume=True) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dnc: error: non-finite loss at iteration 45 "), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert {name: (work / name).read_bytes() for name in before} == before
    assert not any(r["mode"] == "val" and r["iter"] > STOP for r in records(work))


# ----------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name, kwargs, points", [
    # iters_per_epoch = 10, total = 110, no warm-up
    ("step", dict(milestones=[2, 4], gamma=0.1), {0: 1.0, 19: 1.0, 20: 0.1, 39: 0.1, 40: 0.01, 109: 0.01}),
    ("exp", dict(gamma=0.5), {0: 1.0, 9: 1.0, 10: 0.5, 25: 0.25, 109: 0.5 ** 10}),
    ("cosine", dict(), {0: 1.0, 55: 0.5, 110: 0.0, 200: 0.0}),
    ("cosine", dict(min_lr_ratio=0.1), {0: 1.0, 55: 0.55, 110: 0.1}),
    ("poly", dict(power=0.9), {0: 1.0, 55: 0.5 ** 0.9, 110: 0.0}),
    ("poly", dict(power=2.0, min_lr_ratio=0.2), {0: 1.0, 55: 0.2 + 0.8 * 0.25, 110: 0.2}),
    # linear warm-up over 10 steps from 0.1 (multiplies the schedule; the cosine starts after the warm-up)
    ("cosine", dict(warmup_iters=10, warmup_ratio=0.1), {0: 0.1, 5: 0.55, 10: 1.0, 60: 0.5, 110: 0.0}),
    ("step", dict(milestones=[1], warmup_iters=20, warmup_ratio=0.0), {0: 0.0, 5: 0.25, 10: 0.05, 20: 0.1}),
    ("poly", dict(power=1.0, warmup_iters=10, warmup_ratio=0.5), {0: 0.5, 5: 0.75 * (1 - 5 / 110), 10: 1 - 10 / 110}),
    ("constant", dict(warmup_iters=4, warmup_ratio=0.2), {0: 0.2, 2: 0.6, 4: 1.0, 100: 1.0}),
])
def test_lr_factor_at_hand_computed_points(name, kwargs, points):
    cfg = SchedConfig(name=name, **kwargs)
    for it, expected in points.items():
        assert math.isclose(lr_factor(cfg, it, 110, 10), expected, rel_tol=1e-9, abs_tol=1e-12), (it, expected)


def test_scheduler_sets_the_lr_of_each_step():
    """Step ``i`` (0-based) trains with ``lr * lr_factor(i)``, and that survives a state-dict round trip."""
    cfg = SchedConfig(name="cosine", warmup_iters=3, warmup_ratio=0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = build_scheduler(opt, cfg, 20, 5)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.4 * lr_factor(cfg, i, 20, 5) for i in range(8)], rel=1e-12)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched2 = build_scheduler(opt2, cfg, 20, 5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.4 * lr_factor(cfg, 9, 20, 5))
