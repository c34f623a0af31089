"""Checkpoints: written atomically, read without unpickling code, and what a resumable one holds beyond the
model: RNG states, and under DDP each process's own buffers (the sub-centroid memory shards)."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..files import atomic_write
from ..validate import check_finite
from .distributed import DistInfo

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_resumable",
           "rng_state", "set_rng_state", "sync_buffers", "gather_per_process", "restore_per_process", "best_so_far"]

CHECKPOINT_FORMAT = "dnc-checkpoint"
log_text = logging.getLogger("dnc")  # warnings (the command line prints them)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, reported as one line."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a ``dnc`` checkpoint without unpickling arbitrary objects (``weights_only``), every tensor of its
    model and optimiser state checked finite; ``mmap``: tensors are read from the file only when used."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or tampered files all end here
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable dnc checkpoint (truncated or foreign file?): {msg}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a dnc checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    try:
        check_finite({k: state[k] for k in ("model", "optimizer") if isinstance(state.get(k), dict)}, p)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return state


_TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler", "train_state", "rng", "config")


def load_resumable(path) -> dict:
    """A checkpoint that training can continue from (:func:`load_checkpoint` plus its training state)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in _TRAINING_STATE if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it: it holds no training state ({', '.join(missing)} "
                              f"missing); a model saved for testing or explaining can be tested, not resumed")
    return ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def per_process_buffers(model: nn.Module) -> dict:
    """Buffers that differ between processes by design: the sub-centroid memory shards."""
    from ..centroids import SubCentroids
    return {f"{name}.{b}" if name else b: t for name, m in model.named_modules() if isinstance(m, SubCentroids)
            for b, t in m.named_buffers(recurse=False) if b.startswith("memory_")}


def sync_buffers(model: nn.Module) -> None:
    """Give every process process 0's buffers (sub-centroids, BatchNorm statistics), memory shards aside."""
    if not dist.is_initialized():
        return
    own = {id(t) for t in per_process_buffers(model).values()}
    for t in model.buffers():
        if id(t) not in own:
            dist.broadcast(t, 0)


def gather_per_process(model: nn.Module, info: DistInfo) -> Optional[dict]:
    """Under DDP: every process's memory shards and RNG state, on process 0 (``None`` elsewhere and
    with one process, where the model state and ``rng`` already hold them)."""
    if not dist.is_initialized() or info.world == 1:
        return None
    local = {"buffers": {k: v.detach().cpu() for k, v in per_process_buffers(model).items()}, "rng": rng_state()}
    parts = [None] * info.world if info.is_main else None
    dist.gather_object(local, parts, dst=0)
    return {"ranks": parts} if info.is_main else None


def restore_per_process(model: nn.Module, ckpt: dict, info: DistInfo, path, log) -> None:
    """Resuming under DDP: each process takes back its own memory shard and RNG state when the number of
    processes is the one that saved the checkpoint; otherwise all keep process 0's, with a warning."""
    saved = ckpt.get("world", 1)
    if saved == info.world:
        if info.world > 1 and ckpt.get("per_process"):
            own = ckpt["per_process"]["ranks"][info.rank]
            for name, t in per_process_buffers(model).items():
                t.copy_(own["buffers"][name])
            set_rng_state(own["rng"])
        return
    message = (f"{path}: saved by {saved} processes, resumed with {info.world}: every process starts from the "
               f"sub-centroid memory and random state of process 0, so the run does not continue exactly")
    if info.is_main:
        log_text.warning(message)
    log(mode="warning", message=message)


def best_so_far(best: Optional[float], path: Path, key: str, info: DistInfo) -> Optional[float]:
    """The best evaluation of the run: ``last.pt`` is saved before each evaluation, so ``best.pt`` may
    hold a later, better one (every process gets process 0's answer)."""
    value = [best]
    if info.is_main and path.is_file():
        try:
            saved = load_checkpoint(path, mmap=True).get("metrics", {}).get(key)  # the metrics alone are read
        except CheckpointError:
            saved = None
        if saved is not None and (best is None or saved > best):
            value = [saved]
    if dist.is_initialized():
        dist.broadcast_object_list(value, 0)
    return value[0]
