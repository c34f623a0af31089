"""Training loop, evaluation loop, checkpoints, distributed set-up and logging.

A plain loop in the style of torchvision's reference scripts. One process per device; under
``torchrun`` the process group is initialised from the environment (NCCL on GPUs, gloo on CPUs).
Resuming is exact: the data order and every augmentation are functions of (seed, epoch, sample), and
the checkpoint holds the model (sub-centroids, memory and step counters included), optimiser,
schedule, loss scaler, RNG states and the position inside the epoch.
"""
from __future__ import annotations

import dataclasses

import functools
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import Config, to_dict
from .files import atomic_write, remove_stale_temporaries

__all__ = ["DistInfo", "setup_distributed", "EpochSampler", "SeededDataset", "IndexedCollate", "make_loader",
           "build_optimizer", "build_scheduler", "save_checkpoint", "load_checkpoint", "load_resumable",
           "ignore_stop_signals", "CheckpointError", "TrainingError", "train_loop",
           "JsonLogger", "unwrap"]

CHECKPOINT_FORMAT = "dnc-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, reported as one line."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss), reported as one line."""


# --------------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment when it names several processes."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, dev)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _host_group():
    """A process group for small host-side agreements (stop flag, empty batch): the default group under
    gloo, a gloo group beside NCCL otherwise, so that agreeing never waits on the GPU. A collective:
    every process calls it at the same point."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _all_reduce_max(flag: bool, group=None) -> bool:
    """Whether any process's ``flag`` is set (a CPU tensor: no host-device synchronisation)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


# --------------------------------------------------------------------------------------------- data
class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for this process.

    Training: a permutation drawn from (seed, epoch), cut to a multiple of the number of processes and
    dealt round-robin, so every process has the same number of samples. Evaluation (``shuffle=False``):
    samples ``rank, rank + world, ...`` without padding, so every sample is counted exactly once.
    ``start`` skips the first samples of this process's share (resuming inside an epoch).
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def _indices(self) -> list:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)[: self.size - self.size % self.world]
        return perm[self.rank:: self.world].tolist()

    def __iter__(self) -> Iterator:
        return iter([(self.epoch, i) for i in self._indices()[self.start:]])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


class SeededDataset(Dataset):
    """Seeds the random transforms of each sample from (seed, epoch, index): augmentations do not
    depend on worker count, worker order or where a run was resumed.

    Returns ``(index, sample)``; with ``on_bad="skip"`` an unreadable sample (a ``ValueError`` naming
    its file, or ``None`` from the dataset) is ``(index, None)``, which :class:`IndexedCollate` drops.
    """

    def __init__(self, dataset: Dataset, seed: int, on_bad: str = "error"):
        self.dataset, self.seed, self.on_bad = dataset, seed, on_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what the transforms draw from): torch.manual_seed would also
            # seed CUDA lazily, which costs more than loading a small image.
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63))
            try:
                return index, self.dataset[index]
            except ValueError:
                if self.on_bad != "skip":
                    raise
                return index, None


class IndexedCollate:
    """Batches as ``(images, targets, number of skipped samples, dataset indices of the kept ones)``:
    ``collate_fn`` (returning ``(images, targets, skipped)``) sees the readable samples only. A batch
    whose samples were all skipped has empty ``images`` and ``targets``: callers skip it."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        kept = [(i, s) for i, s in batch if s is not None]
        if not kept:
            return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch), torch.empty(0, dtype=torch.long)
        images, targets, skipped = self.collate_fn([s for _, s in kept])
        return images, targets, len(batch) - len(kept) + skipped, torch.tensor([i for i, _ in kept])


def ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    """``worker_init_fn`` of every loader: a DataLoader worker ignores SIGINT/SIGTERM, so that a signal sent
    to the whole process group (a cluster scheduler, Ctrl-C) leaves stopping and saving to the main
    process instead of killing the workers under it. ``then``: a ``worker_init_fn`` of the caller's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, info: DistInfo, seed: int, num_workers: int,
                collate_fn: Callable, worker_init_fn: Optional[Callable[[int], None]] = None,
                on_bad: str = "error") -> DataLoader:
    """Batches ``(images, targets, skipped, indices)`` (:class:`IndexedCollate`) of this process's share."""
    sampler = EpochSampler(len(dataset), shuffle, seed, info.rank, info.world)
    return DataLoader(SeededDataset(dataset, seed, on_bad), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=IndexedCollate(collate_fn), drop_last=shuffle,
                      pin_memory=info.device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=functools.partial(ignore_stop_signals, then=worker_init_fn))


# --------------------------------------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD or AdamW; optionally no weight decay on norms, biases and parameters named in ``no_decay_keys``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (cfg.no_decay_norm_bias and p.ndim <= 1) or any(k in name for k in cfg.no_decay_keys)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(cfg, it: int, total: int, iters_per_epoch: int) -> float:
    """Learning-rate multiplier at iteration ``it`` (milestones and exp decay count epochs)."""
    epoch = it // max(iters_per_epoch, 1)
    if cfg.name == "constant":
        f = 1.0
    elif cfg.name == "step":
        f = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    elif cfg.name == "exp":
        f = cfg.gamma ** epoch
    elif cfg.name == "cosine":
        t = min(max(it - cfg.warmup_iters, 0) / max(total - cfg.warmup_iters, 1), 1.0)
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    else:  # poly
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - min(it / max(total, 1), 1.0)) ** cfg.power
    if it < cfg.warmup_iters:
        f *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / cfg.warmup_iters
    return f


def build_scheduler(optimizer, cfg, total: int, iters_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, total, iters_per_epoch))


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a ``dnc`` checkpoint without unpickling arbitrary objects (``weights_only``); ``mmap``: tensors
    are read from the file only when used."""
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- logging
class JsonLogger:
    """One JSON object per line in ``log.jsonl`` (rank 0 only); with ``tensorboard``, the numbers of
    each record also as TensorBoard scalars ``<mode>/<key>`` at step ``iter`` (in ``tensorboard``)."""

    def __init__(self, path: Optional[Path], tensorboard: Optional[Path] = None):
        self.path, self.board = path, None
        if path is not None and tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError("train.tensorboard=true needs the tensorboard package "
                                    "(pip install 'dnc[tensorboard]')") from None
            self.board = SummaryWriter(str(tensorboard))

    def __call__(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.board is not None and "iter" in record:
            for k, v in record.items():
                if k not in ("iter", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.board.add_scalar(f"{record['mode']}/{k}", v, record["iter"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request to save a resumable checkpoint and leave. A second signal more
    than a second later interrupts at once; one sooner is the same request arriving twice (a signal to the
    whole process group that torchrun also forwards to its workers)."""

    def __init__(self):
        self.signal, self.since = None, 0.0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.since = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - self.since > 1.0:  # asked again: stop at once
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _StopAgreement:
    """Whether every process stops after this step, the same answer everywhere, without a host-device
    synchronisation: ``None``, or the name of the signal that asked for the stop.

    One process: the signal flag itself, read in Python at every step. Several: each step starts an
    asynchronous all-reduce (max) of this process's signal number on a host-side group and reads the
    one started at the step before, so all processes stop together one step after the first signal.
    """

    def __init__(self, stop: _StopRequest, group=None):
        self.stop, self.group, self.pending = stop, group, None

    def __call__(self) -> Optional[str]:
        if not dist.is_initialized():
            return self.stop.signal
        agreed = None
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            number = int(flag.item())  # a CPU tensor
            agreed = signal.Signals(number).name if number else None
        flag = torch.tensor([float(signal.Signals[self.stop.signal]) if self.stop.signal else 0.0])
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight (every process has started the same number of them)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainState:
    it: int = 0           # optimisation steps done
    epoch: int = 0        # current epoch
    epoch_it: int = 0     # steps done inside the current epoch
    best: Optional[float] = None


def train_loop(cfg: Config, model: nn.Module, train_loader: DataLoader, info: DistInfo, work_dir: Path,
               evaluate: Callable[[nn.Module], dict], metric_key: str, resume: Optional[str] = None,
               classes: Optional[list] = None, before_training: Optional[Callable[[nn.Module], None]] = None,
               resume_state: Optional[dict] = None) -> dict:
    """Train ``model`` as ``cfg`` says; returns the final evaluation metrics, or ``{"stopped": True, "iter",
    "reason"}`` when a signal or ``train.stop_after`` stopped it with a resumable ``last.pt``.

    ``resume``: the checkpoint to continue from (``resume_state``: its contents, if already loaded).
    ``evaluate(model)`` runs on every process and returns the same metrics dict on each.
    """
    t = cfg.train
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise TrainingError(f"the training set is smaller than one batch ({cfg.data.batch_size} x {info.world} processes)")
    total = t.iters if t.iters else t.epochs * iters_per_epoch
    model.to(info.device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    sched, shortened = cfg.sched, None
    if sched.warmup_iters > total:  # a warm-up longer than the run would never reach the learning rate
        shortened = f"sched.warmup_iters={sched.warmup_iters} is longer than the run ({total} iterations): shortened to {total}"
        sched = dataclasses.replace(sched, warmup_iters=total)
    scheduler = build_scheduler(optimizer, sched, total, iters_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type, enabled=t.amp == "fp16")
    state = TrainState()
    log = JsonLogger(work_dir / "log.jsonl" if info.is_main else None,
                     work_dir / "tensorboard" if t.tensorboard else None)
    if shortened:
        if info.is_main:
            print(f"dnc: warning: {shortened}", file=sys.stderr, flush=True)
        log(mode="warning", message=shortened)
    if resume:
        ckpt = resume_state if resume_state is not None else load_resumable(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["train_state"])
        _set_rng_state(ckpt["rng"])
        _restore_per_process(model, ckpt, info, resume, log)
        state.best = _best_so_far(state.best, work_dir / "best.pt", metric_key, info)
        log(mode="resume", checkpoint=str(resume), iter=state.it, epoch=_epoch(state))
    elif before_training is not None:
        before_training(model)
    _sync_buffers(model)  # e.g. randomly initialised sub-centroids: every process starts from process 0's
    # Buffers are not broadcast at each step: each process keeps its own sub-centroid memory shard (and
    # BatchNorm statistics, which training does not read; they are synchronised before evaluating/saving).
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if info.world > 1 else model
    amp = torch.autocast(info.device.type, dtype=torch.bfloat16 if t.amp == "bf16" else torch.float16) \
        if t.amp != "none" else nullcontext()

    def checkpoint(name: str = "last.pt", metrics: Optional[dict] = None) -> None:
        _sync_buffers(model)
        per_process = _gather_per_process(model, info)  # a collective: before the rank-0-only part
        if info.is_main:
            save_checkpoint(work_dir / name, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "train_state": vars(state).copy(), "rng": _rng_state(), "config": to_dict(cfg),
                "classes": list(classes or []), "metrics": metrics or {},
                "world": info.world, "per_process": per_process})
        if dist.is_initialized():
            dist.barrier()

    def run_eval() -> dict:
        """Evaluate (after ``last.pt`` was saved: a failed evaluation loses no training) and keep the best."""
        _sync_buffers(model)  # every process evaluates the model that is saved (process 0's BatchNorm statistics)
        metrics = evaluate(model)
        if info.is_main:
            shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool))  # e.g. "skipped 1"
            print(f"epoch {_epoch(state)} iter {state.it}/{total}: {shown}", flush=True)
        log(mode="val", iter=state.it, epoch=_epoch(state), **{k: v for k, v in metrics.items() if not isinstance(v, list)})
        value = metrics.get(metric_key)
        if value is not None and (state.best is None or value > state.best):
            state.best = value
            checkpoint("best.pt", metrics)
        return metrics

    sampler: EpochSampler = train_loader.sampler
    stop = _StopRequest()
    group = _host_group() if dist.is_initialized() else None
    agree = _StopAgreement(stop, group)
    run_steps = 0
    bad_step = torch.full((), -1, dtype=torch.long, device=info.device)
    sums: dict = {}
    window = 0  # steps summed in ``sums``
    progress = _Progress(total, state.it, info.is_main)
    seen, started, logged_at = 0, time.perf_counter(), 0  # images, wall time and steps since the last log step
    # Nothing in a step reads a device value on the host (no synchronisation): the loss is checked and the
    # sums are read at log steps only, and the stop flag is a Python flag (agreed asynchronously under DDP).
    with stop, closing(progress):  # closed on errors too, so that an error message starts its own line
        while state.it < total:
            sampler.epoch, sampler.start = state.epoch, state.epoch_it * cfg.data.batch_size
            ddp.train()
            for images, targets, skipped, _ in train_loader:
                # A batch whose samples were all unreadable (data.on_bad_sample=skip) is a step without an
                # update; under DDP all processes skip it together, so that none waits for the others.
                empty = len(targets) == 0
                if info.world > 1 and cfg.data.on_bad_sample == "skip":
                    empty = _all_reduce_max(empty, group)
                if not empty:
                    images = images.to(info.device, non_blocking=True)
                    targets = targets.to(info.device, non_blocking=True)
                    if t.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    with amp:
                        _, losses = ddp(images, targets)
                    loss = sum(losses.values())
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.optim.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), state.it + 1, bad_step)
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                    window += 1
                    seen += len(targets)
                scheduler.step()
                sums["skipped"] = sums.get("skipped", 0) + skipped
                state.it += 1
                state.epoch_it += 1
                run_steps += 1
                progress.update(1)
                end = state.it >= total
                at_log = state.it % t.log_interval == 0 or end
                signalled = agree()
                if signalled or (t.stop_after and run_steps >= t.stop_after):
                    agree.close()
                    _check_finite(bad_step, state)
                    checkpoint()
                    reason = signalled or "stop_after"
                    log(mode="stop", iter=state.it, epoch=_epoch(state), reason=reason)
                    progress.close()
                    log.close()
                    return {"stopped": True, "iter": state.it, "reason": reason}
                if at_log:
                    _check_finite(bad_step, state)
                    record = {k: (v.item() if torch.is_tensor(v) else v) / (1 if k == "skipped" else max(window, 1))
                              for k, v in sums.items()}
                    record.update(_speed(seen * info.world, time.perf_counter() - started,
                                         run_steps - logged_at, total - state.it, info.device))
                    record["loss"] = sum(v for k, v in record.items() if k in sums and k != "skipped")
                    progress.report(_epoch(state), state.it, record)
                    record.update(_centroid_stats(model))
                    log(mode="train", iter=state.it, epoch=_epoch(state), lr=scheduler.get_last_lr()[0], **record)
                    sums, window, seen, started, logged_at = {}, 0, 0, time.perf_counter(), run_steps
                if t.iters and state.it % t.eval_interval == 0 and not end:
                    _check_finite(bad_step, state)  # never evaluate or checkpoint weights a NaN reached
                    paused = time.perf_counter()
                    checkpoint()
                    run_eval()
                    started += time.perf_counter() - paused  # the throughput is training's alone
                    ddp.train()
                if end:
                    break
            else:  # the epoch is over
                state.epoch += 1
                state.epoch_it = 0
                if t.epochs and state.epoch % t.eval_interval == 0 and state.it < total:
                    _check_finite(bad_step, state)
                    paused = time.perf_counter()
                    checkpoint()
                    run_eval()
                    started += time.perf_counter() - paused
                continue
            break
    agree.close()
    progress.close()
    _check_finite(bad_step, state)
    checkpoint()
    metrics = run_eval()
    checkpoint(metrics=metrics)  # the final metrics travel with last.pt
    log.close()
    return metrics


def _epoch(state: TrainState) -> int:
    """The epoch shown in logs, counted from 1: the one of the last step (a finished epoch until the
    next one starts), so that evaluations after epochs 1, 2 and at the end of 3 read 1, 2, 3."""
    return state.epoch + (state.epoch_it > 0)


def _speed(images: int, seconds: float, steps: int, left: int, device: torch.device) -> dict:
    """Throughput over the last log window, the time left at that pace and, on a GPU, the peak memory."""
    out = {"images_per_s": round(images / max(seconds, 1e-9), 2), "eta_s": round(left * seconds / max(steps, 1), 1)}
    if device.type == "cuda":
        out["max_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _centroid_stats(model: nn.Module) -> dict:
    """``centroid_cos``: how close the sub-centroids are to the means of the samples assigned to them
    at the last update (1 = converged), for every sub-centroid module of the model."""
    from .centroids import SubCentroids
    values = [m.alignment for m in model.modules() if isinstance(m, SubCentroids) and m.alignment is not None]
    return {"centroid_cos": round(float(sum(values) / len(values)), 5)} if values else {}


def _per_process_buffers(model: nn.Module) -> dict:
    """Buffers that differ between processes by design: the sub-centroid memory shards."""
    from .centroids import SubCentroids
    return {f"{name}.{b}" if name else b: t for name, m in model.named_modules() if isinstance(m, SubCentroids)
            for b, t in m.named_buffers(recurse=False) if b.startswith("memory_")}


def _sync_buffers(model: nn.Module) -> None:
    """Give every process process 0's buffers (sub-centroids, BatchNorm statistics), memory shards aside."""
    if not dist.is_initialized():
        return
    own = {id(t) for t in _per_process_buffers(model).values()}
    for t in model.buffers():
        if id(t) not in own:
            dist.broadcast(t, 0)


def _gather_per_process(model: nn.Module, info: DistInfo) -> Optional[dict]:
    """Under DDP: every process's memory shards and RNG state, on process 0 (``None`` elsewhere and
    with one process, where the model state and ``rng`` already hold them)."""
    if not dist.is_initialized() or info.world == 1:
        return None
    local = {"buffers": {k: v.detach().cpu() for k, v in _per_process_buffers(model).items()}, "rng": _rng_state()}
    parts = [None] * info.world if info.is_main else None
    dist.gather_object(local, parts, dst=0)
    return {"ranks": parts} if info.is_main else None


def _restore_per_process(model: nn.Module, ckpt: dict, info: DistInfo, path, log) -> None:
    """Resuming under DDP: each process takes back its own memory shard and RNG state when the number of
    processes is the one that saved the checkpoint; otherwise all keep process 0's, with a warning."""
    saved = ckpt.get("world", 1)
    if saved == info.world:
        if info.world > 1 and ckpt.get("per_process"):
            own = ckpt["per_process"]["ranks"][info.rank]
            for name, t in _per_process_buffers(model).items():
                t.copy_(own["buffers"][name])
            _set_rng_state(own["rng"])
        return
    message = (f"{path}: saved by {saved} processes, resumed with {info.world}: every process starts from the "
               f"sub-centroid memory and random state of process 0, so the run does not continue exactly")
    if info.is_main:
        print(f"dnc: warning: {message}", file=sys.stderr, flush=True)
    log(mode="warning", message=message)


def _best_so_far(best: Optional[float], path: Path, key: str, info: DistInfo) -> Optional[float]:
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


def _check_finite(bad_step: torch.Tensor, state: TrainState) -> None:
    """Raise on every process if any saw a non-finite loss (a collective: all processes call it at
    the same steps), naming the first such step."""
    step = int(bad_step.item())
    if dist.is_initialized():
        first = torch.where(bad_step < 0, torch.iinfo(torch.long).max, bad_step)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = -1 if int(first.item()) == torch.iinfo(torch.long).max else int(first.item())
    if step >= 0:
        raise TrainingError(f"non-finite loss at iteration {step} (epoch {state.epoch}); stopped without saving, "
                            f"the last checkpoint is the last good one")


def _clock(seconds: float) -> str:
    m, sec = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


class _Progress:
    """Progress of process 0: a tqdm bar on a terminal, otherwise a plain line at each log step."""

    def __init__(self, total: int, done: int, show: bool):
        self.total, self.show, self.bar = total, show, None
        if show and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, dynamic_ncols=True, desc="train", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, epoch: int, it: int, record: dict) -> None:
        if not self.show:
            return
        text = f"loss {record['loss']:.4f}, {record['images_per_s']:.1f} images/s, ETA {_clock(record['eta_s'])}"
        if "max_mem_mib" in record:
            text += f", peak memory {record['max_mem_mib']:.0f} MiB"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"epoch {epoch} iter {it}/{self.total}: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
