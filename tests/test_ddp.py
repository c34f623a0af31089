"""Two CPU processes (gloo) under torchrun: the sub-centroid update, training, evaluation and
resumption agree with one process and across processes.

One torchrun launch runs every multi-process step (``ddp_runner.py``); the tests below check its
outputs against single-process computations made here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddp_runner import SCENARIOS, make_subcentroids, scenario_batches
from dnc.cli import EXIT_STOPPED, main
from dnc.engine import load_checkpoint
from dnc_tiny import (CONFIG, NUM_VAL, TINY, assert_same_training_state, one_thread, run_torchrun,
                      sigterm_group_once_training, torchrun_cmd)

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
# torchrun: the module's launch (its own limit: 300 s) runs in the first test's setup
pytestmark = pytest.mark.timeout(480)

STOP = 37  # mid-epoch
SIGTERM_AT = 7  # process 1 alone receives SIGTERM during step 7, far from a log step (every 50)
MEMORY = ("memory_z", "memory_y", "memory_ok")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    train = ["train", CONFIG, *TINY]
    spec = [
        {"tag": "full", "argv": [*train, "--work-dir", str(out / "full")]},
        {"tag": "random", "argv": [*train, "--work-dir", str(out / "random"), "model.dnc.init=random", "train.iters=6"]},
        {"tag": "units", "units": True},
        {"tag": "stop", "argv": [*train, "--work-dir", str(out / "stop"), f"train.stop_after={STOP}"]},
        {"tag": "resumed", "argv": [*train, "--work-dir", str(out / "resumed"), "--resume", str(out / "stop" / "last.pt")]},
        {"tag": "test", "argv": ["test", CONFIG, str(out / "full" / "last.pt"), "--out", str(out / "preds.json"), *TINY]},
        {"tag": "sigterm", "argv": [*train, "--work-dir", str(out / "sigterm"), "train.log_interval=50"],
         "sigterm": [1, SIGTERM_AT], "expect": EXIT_STOPPED},
        # process 1 alone sees a NaN loss at step 5, a log step (where the loss is checked)
        {"tag": "nan", "argv": [*train, "--work-dir", str(out / "nan"), "train.iters=10"], "nan": [1, 5], "expect": 1},
    ]
    (out / "spec.json").write_text(json.dumps(spec))
    stdout, stderr = run_torchrun(Path(__file__).with_name("ddp_runner.py"), out, out / "spec.json", timeout=300)
    for step in spec:
        expect = str(step.get("expect", 0))
        assert [(out / f"{step['tag']}_rank{r}.rc").read_text() for r in (0, 1)] == [expect, expect], step["tag"]
    (out / "stderr.txt").write_text(stderr)
    (out / "stdout.txt").write_text(stdout)
    return out


def ranks(ddp: Path, tag: str) -> list:
    return [torch.load(ddp / f"{tag}_rank{r}.pt", weights_only=True) for r in (0, 1)]


# --------------------------------------------------------------------------------- SubCentroids.update
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_update_on_two_processes_equals_one_process_on_the_global_batch(ddp, name):
    per_rank = [r[name] for r in ranks(ddp, "units")]
    single = make_subcentroids(name, world=1)
    for s, (z, labels, correct, parts) in enumerate(scenario_batches(name)):
        idx = torch.cat(parts)
        expected_assign = single.update(z[idx], labels[idx], correct[idx], single.similarities(z[idx]))
        a, b = per_rank[0]["steps"][s], per_rank[1]["steps"][s]
        assert torch.equal(a["centroids"], b["centroids"]), f"step {s}: processes disagree"
        torch.testing.assert_close(a["centroids"], single.centroids, rtol=0, atol=1e-6)
        if expected_assign is not None:
            assert torch.equal(torch.cat([a["assign"], b["assign"]]), expected_assign)
    assert not torch.equal(single.centroids, make_subcentroids(name).centroids)  # the sub-centroids did move
    if name == "memory":  # each process keeps its own shard; together they are the single process's memory
        shards = [r["state"] for r in per_rank]
        assert not torch.equal(shards[0]["memory_z"], shards[1]["memory_z"])
        key = lambda z: sorted(map(tuple, z.tolist()))  # noqa: E731 - the memory as a set of rows
        assert key(torch.cat([s["memory_z"] for s in shards])) == key(single.memory_z)


# --------------------------------------------------------------------------------- dnc train / test
@pytest.mark.parametrize("tag", ["full", "random"])
def test_processes_end_identical_except_their_memory_shards(ddp, tag):
    a, b = ranks(ddp, tag)
    shared = [k for k in a["model"] if torch.is_tensor(a["model"][k]) and k.rsplit(".", 1)[-1] not in MEMORY]
    differ = [k for k in shared if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"processes differ in {differ}"
    assert not torch.equal(a["model"]["head.centroids.memory_z"], b["model"]["head.centroids.memory_z"])
    saved = load_checkpoint(ddp / tag / "last.pt")["model"]
    assert all(torch.equal(saved[k], a["model"][k]) for k in a["model"] if torch.is_tensor(a["model"][k]))


def test_evaluation_counts_every_sample_once(ddp, tmp_path):
    result = json.loads((ddp / "preds.json").read_text())
    assert [p["index"] for p in result["predictions"]] == list(range(NUM_VAL))  # 46 + 45, none twice
    reported = json.loads((ddp / "full" / "metrics.json").read_text())
    assert result["top1"] == reported["top1"] and result["top5"] == reported["top5"]
    # One process evaluating the same checkpoint predicts the same for every sample.
    assert main(["test", CONFIG, str(ddp / "full" / "last.pt"), "--out", str(tmp_path / "one.json"), *TINY]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["top1"] == result["top1"]
    assert [p["pred"] for p in one["predictions"]] == [p["pred"] for p in result["predictions"]]


def test_resume_under_ddp_is_exact_memory_shards_included(ddp):
    stop = [json.loads(line) for line in (ddp / "stop" / "log.jsonl").read_text().splitlines()][-1]
    assert stop["mode"] == "stop" and stop["iter"] == STOP
    for full, resumed in zip(ranks(ddp, "full"), ranks(ddp, "resumed")):
        differ = [k for k, v in full["model"].items() if torch.is_tensor(v) and not torch.equal(v, resumed["model"][k])]
        assert not differ, f"the resumed run differs in {differ}"
        assert torch.equal(full["rng"], resumed["rng"])
    assert_same_training_state(load_checkpoint(ddp / "full" / "last.pt"), load_checkpoint(ddp / "resumed" / "last.pt"))


def test_resume_with_another_number_of_processes_warns_and_uses_shard_0(ddp, tmp_path):
    work = tmp_path / "one"
    ckpt = load_checkpoint(ddp / "stop" / "last.pt")
    assert main(["train", CONFIG, "--work-dir", str(work), "--resume", str(ddp / "stop" / "last.pt"), *TINY,
                 "train.stop_after=1"]) == 0
    recs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    warning = [r for r in recs if r["mode"] == "warning"]
    assert len(warning) == 1 and "2 processes" in warning[0]["message"], recs
    # One step later the memory is shard 0 with one batch of 32 written at its pointer.
    after = load_checkpoint(work / "last.pt")["model"]
    ptr = int(ckpt["model"]["head.centroids.memory_ptr"])
    kept = [(ptr + 32 + i) % 80 for i in range(80 - 32)]
    assert torch.equal(after["head.centroids.memory_z"][kept], ckpt["model"]["head.centroids.memory_z"][kept])


def test_a_sigterm_on_one_process_stops_every_process_at_the_next_step(ddp):
    """Under torchrun a stop request is agreed at every step (asynchronously: the flag of step t is read at
    step t+1), not only at log steps: before the fix this run went on to step 50, its first log step."""
    stop = [json.loads(line) for line in (ddp / "sigterm" / "log.jsonl").read_text().splitlines()][-1]
    assert stop["mode"] == "stop" and stop["reason"] == "SIGTERM" and stop["iter"] == SIGTERM_AT + 1, stop
    ckpt = load_checkpoint(ddp / "sigterm" / "last.pt")
    assert ckpt["train_state"]["it"] == SIGTERM_AT + 1 and ckpt["world"] == 2
    assert "stopped by SIGTERM" in (ddp / "stdout.txt").read_text()


def test_a_nan_loss_on_one_process_stops_every_process(ddp):
    """Both processes stop at the same check with the same message (before the fix, the process that saw
    the NaN raised alone and the other waited for it forever)."""
    text = (ddp / "stderr.txt").read_text()  # both processes write to it: their lines may interleave
    assert text.count("dnc: error:") == 2 and text.count("dnc: error: non-finite loss at iteration 5 ") == 2, text
    assert not (ddp / "nan" / "last.pt").exists()


def test_sigterm_to_torchrun_and_all_its_processes_saves_the_run(tmp_path):
    """What a cluster scheduler does to a torchrun job: SIGTERM to the whole process group (torchrun, which
    forwards it once more, its workers and their DataLoader workers). Before the fix the DataLoader
    workers died, and the workers with them, without a checkpoint."""
    work = tmp_path / "run"
    cmd = torchrun_cmd("-m", "dnc", "train", CONFIG, "--work-dir", work, *TINY, "train.iters=3000",
                       "train.log_interval=2", "data.num_workers=1")
    _, out, err = sigterm_group_once_training(cmd, work, start_timeout=240)
    assert "DataLoader worker" not in err and "dnc: error" not in err, err[-3000:]
    stop = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()][-1]
    assert stop["mode"] == "stop" and stop["reason"] == "SIGTERM", stop
    ckpt = load_checkpoint(work / "last.pt")
    assert ckpt["train_state"]["it"] == stop["iter"] < 3000 and len(ckpt["per_process"]["ranks"]) == 2
    assert "stopped by SIGTERM" in out

