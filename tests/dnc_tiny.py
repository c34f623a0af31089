"""Shared helpers of the engine / CLI / DDP tests: a tiny digits recipe and a way to run ``dnc``.

The recipe is the shipped demo (``demo/digits_dnc.yaml``: DNC head, k-means++ initialisation) made
small: a 4-channel CNN, 16-dimensional embeddings, 91 held-out digits (an odd number, so that two
processes get unequal evaluation shares), 53 steps per epoch, and a sub-centroid memory of 80 (2.5
batches) clustered every 3 steps, so that every piece of training state (weights, sub-centroids,
memory, step counters, optimiser, schedule) matters for exact resumption: the first clustering after
a resume still sees samples pushed before the stop.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = "demo/digits_dnc.yaml"
TINY = ["model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16", "data.batch_size=32",
        "data.dataset_kwargs.val_fraction=0.0501", "model.dnc.init_samples=256", "model.dnc.memory_size=80",
        "model.dnc.update_interval=3", "sched.warmup_iters=5", "train.epochs=0", "train.iters=60",
        "train.eval_interval=25", "train.log_interval=5"]
NUM_VAL = 91
ITERS_PER_EPOCH = (1797 - NUM_VAL) // 32


def subprocess_env() -> dict:
    """Environment for ``python -m dnc`` / ``torchrun`` children: offline, one thread (the same
    arithmetic as the test process, see :func:`one_thread`), the package importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    env.pop("DNC_DEBUG", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_tensors(ckpt: dict) -> dict:
    """Every tensor of a checkpoint's model and optimiser state, flattened to ``name -> tensor``."""
    out = {f"model/{k}": v for k, v in ckpt["model"].items() if torch.is_tensor(v)}
    for pid, s in ckpt["optimizer"]["state"].items():
        out.update({f"optim/{pid}/{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical weights, sub-centroids, memory, step counters, optimiser and schedule."""
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"differ: {differ}"
    extra = [k for k in a["model"] if not torch.is_tensor(a["model"][k])]
    assert {k: a["model"][k] for k in extra} == {k: b["model"][k] for k in extra}  # sub-centroid step counts
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert a["train_state"] == b["train_state"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


PYTHON = sys.executable


def torchrun_cmd(*args: str) -> list:
    """``torchrun`` (this environment's) starting two processes on this machine, then ``args``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun) if torchrun.is_file() else shutil.which("torchrun"), "--nnodes", "1", "--nproc_per_node",
            "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def run_torchrun(*args: str, timeout: float, env=None) -> tuple:
    """Run :func:`torchrun_cmd` in a session of its own, so that a hang (a collective one process never
    reaches) is ended whole after ``timeout`` s, failing the test; checks it exits 0; ``(stdout, stderr)``."""
    import pytest
    proc = subprocess.Popen(torchrun_cmd(*args), env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:g} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, stderr


def one_thread():
    """Fixture body: run the test with one intra-op thread (CPU results depend on the thread count,
    and the machine is shared), restoring the previous count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigterm_group_once_training(cmd: list, work: Path, start_timeout: float = 180) -> tuple:
    """Run ``cmd`` (a ``dnc train`` into ``work``) in its own process group, send SIGTERM to the whole
    group (as a cluster scheduler does) once the first training record is logged, and return
    ``(returncode, stdout, stderr)``."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while not ((work / "log.jsonl").is_file() and '"mode": "train"' in (work / "log.jsonl").read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, err
