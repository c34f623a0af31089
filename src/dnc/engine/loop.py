"""The training loop, in the style of torchvision's reference scripts: :func:`train_loop` runs
:func:`train_one_epoch` until the last iteration, with :func:`evaluate` between epochs (or every
``train.eval_interval`` iterations) and at the end.

Nothing in a step reads a device value on the host (no synchronisation): the loss is checked and the sums
are read at log steps only, and the stop flag is a Python flag (agreed asynchronously under DDP).
"""
from __future__ import annotations

import time
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, to_dict
from .checkpoint import (best_so_far, gather_per_process, load_resumable, restore_per_process, rng_state,
                         save_checkpoint, set_rng_state, sync_buffers)
from .distributed import DistInfo, all_reduce_max, host_group
from .log import JsonLogger, Progress, centroid_stats, log_text, speed
from .optim import build_optimizer, build_scheduler, fit_warmup
from .state import TrainingError, TrainState, check_finite, epoch_shown
from .stop import StopAgreement, StopRequest

__all__ = ["train_loop", "train_one_epoch", "evaluate"]


class _Run:
    """What a training run carries from step to step: the model and its optimiser, schedule and loss scaler,
    where it stands (:class:`TrainState`), the logs, and the sums of the current log window."""

    def __init__(self, cfg: Config, model: nn.Module, loader: DataLoader, info: DistInfo, work_dir: Path,
                 evaluate: Callable[[nn.Module], dict], metric_key: str, classes: Optional[list],
                 on_saved: Optional[Callable[[], None]] = None):
        t = cfg.train
        self.cfg, self.model, self.loader, self.info, self.work_dir = cfg, model, loader, info, work_dir
        self.evaluate_fn, self.metric_key, self.classes = evaluate, metric_key, list(classes or [])
        self.on_saved = on_saved
        iters_per_epoch = len(loader)
        self.total = t.iters if t.iters else t.epochs * iters_per_epoch
        model.to(info.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, cfg.optim)
        sched, shortened = fit_warmup(cfg.sched, self.total)
        self.scheduler = build_scheduler(self.optimizer, sched, self.total, iters_per_epoch)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=t.amp == "fp16")
        self.state = TrainState()
        self.log = JsonLogger(work_dir / "log.jsonl" if info.is_main else None,
                              work_dir / "tensorboard" if t.tensorboard else None)
        if shortened:
            if info.is_main:
                log_text.warning(shortened)
            self.log(mode="warning", message=shortened)
        self.amp = torch.autocast(info.device.type, dtype=torch.bfloat16 if t.amp == "bf16" else torch.float16) \
            if t.amp != "none" else nullcontext()
        self.ddp = model
        self.steps = 0  # steps of this process's run (since the start or the resume)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=info.device)  # first non-finite loss

    def start(self, resume: Optional[str], resume_state: Optional[dict],
              before_training: Optional[Callable[[nn.Module], None]]) -> None:
        """Restore a resumed run's state, or prepare a new one; wrap the model in DDP; start the clocks."""
        model, info, state = self.model, self.info, self.state
        if resume:
            ckpt = resume_state if resume_state is not None else load_resumable(resume)
            model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = state = TrainState(**ckpt["train_state"])
            set_rng_state(ckpt["rng"])
            restore_per_process(model, ckpt, info, resume, self.log)
            state.best = best_so_far(state.best, self.work_dir / "best.pt", self.metric_key, info)
            self.log(mode="resume", checkpoint=str(resume), iter=state.it, epoch=epoch_shown(state))
        elif before_training is not None:
            before_training(model)
        sync_buffers(model)  # e.g. randomly initialised sub-centroids: every process starts from process 0's
        # Buffers are not broadcast at each step: each process keeps its own sub-centroid memory shard (and
        # BatchNorm statistics, which training does not read; they are synchronised before evaluating/saving).
        if info.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        self.stop = StopRequest()
        self.group = host_group() if dist.is_initialized() else None
        self.agree = StopAgreement(self.stop, self.group)
        self.progress = Progress(self.total, state.it, info.is_main)
        self._new_window()

    def _new_window(self) -> None:
        self.sums, self.window, self.seen = {}, 0, 0  # loss sums, steps summed, images since the last log step
        self.started, self.logged_at = time.perf_counter(), self.steps

    def checkpoint(self, name: str = "last.pt", metrics: Optional[dict] = None) -> None:
        """Save ``work_dir/name`` (every process takes part: buffers and per-process state are gathered)."""
        model, info = self.model, self.info
        sync_buffers(model)
        per_process = gather_per_process(model, info)  # a collective: before the rank-0-only part
        if info.is_main:
            save_checkpoint(self.work_dir / name, {
                "model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "train_state": vars(self.state).copy(), "rng": rng_state(), "config": to_dict(self.cfg),
                "classes": self.classes, "metrics": metrics or {},
                "world": info.world, "per_process": per_process})
            if self.on_saved is not None:
                self.on_saved()
        if dist.is_initialized():
            dist.barrier()

    def step(self, images: torch.Tensor, targets: torch.Tensor, skipped: int) -> None:
        """One iteration: an optimisation step (none for a batch whose samples were all unreadable, skipped
        by all processes together under DDP, so that none waits for the others) and the schedule."""
        empty = len(targets) == 0
        if self.info.world > 1 and self.cfg.data.on_bad_sample == "skip":
            empty = all_reduce_max(empty, self.group)
        if not empty:
            self._update(images, targets)
        self.scheduler.step()
        self.sums["skipped"] = self.sums.get("skipped", 0) + skipped
        self.state.it += 1
        self.state.epoch_it += 1
        self.steps += 1
        self.progress.update(1)

    def _update(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        dev, optimizer, scaler = self.info.device, self.optimizer, self.scaler
        images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.amp:
            _, losses = self.ddp(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss.detach()), self.state.it + 1,
                                    self.bad_step)
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.window += 1
        self.seen += len(targets)

    def log_window(self) -> None:
        """The mean losses, throughput and time left since the last log step: log line and progress."""
        check_finite(self.bad_step, self.state)
        state, sums = self.state, self.sums
        record = {k: (v.item() if torch.is_tensor(v) else v) / (1 if k == "skipped" else max(self.window, 1))
                  for k, v in sums.items()}
        record.update(speed(self.seen * self.info.world, time.perf_counter() - self.started,
                            self.steps - self.logged_at, self.total - state.it, self.info.device))
        record["loss"] = sum(v for k, v in record.items() if k in sums and k != "skipped")
        self.progress.report(epoch_shown(state), state.it, record)
        record.update(centroid_stats(self.model))
        self.log(mode="train", iter=state.it, epoch=epoch_shown(state), lr=self.scheduler.get_last_lr()[0], **record)
        self._new_window()

    def stopped(self, reason: str) -> dict:
        """Save a resumable ``last.pt`` and leave (a signal or ``train.stop_after``)."""
        self.agree.close()
        check_finite(self.bad_step, self.state)
        self.checkpoint()
        self.log(mode="stop", iter=self.state.it, epoch=epoch_shown(self.state), reason=reason)
        self.progress.close()
        self.log.close()
        return {"stopped": True, "iter": self.state.it, "reason": reason}

    def pause_for_evaluation(self) -> None:
        """``last.pt`` then :func:`evaluate` in the middle of training; the throughput is training's alone."""
        check_finite(self.bad_step, self.state)  # never evaluate or checkpoint weights a NaN reached
        paused = time.perf_counter()
        self.checkpoint()
        evaluate(self)
        self.started += time.perf_counter() - paused

    def finish(self) -> dict:
        """The last ``last.pt``, the final evaluation, and ``last.pt`` again with the final metrics."""
        self.agree.close()
        self.progress.close()
        check_finite(self.bad_step, self.state)
        self.checkpoint()
        metrics = evaluate(self)
        self.checkpoint(metrics=metrics)  # the final metrics travel with last.pt
        self.log.close()
        return metrics


def evaluate(run: _Run) -> dict:
    """Evaluate (after ``last.pt`` was saved: a failed evaluation loses no training) and keep the best."""
    state, info = run.state, run.info
    sync_buffers(run.model)  # every process evaluates the model that is saved (process 0's BatchNorm statistics)
    metrics = run.evaluate_fn(run.model)
    if info.is_main:
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool))  # e.g. "skipped 1"
        log_text.info(f"epoch {epoch_shown(state)} iter {state.it}/{run.total}: {shown}")
    run.log(mode="val", iter=state.it, epoch=epoch_shown(state),
            **{k: v for k, v in metrics.items() if not isinstance(v, list)})
    value = metrics.get(run.metric_key)
    if value is not None and (state.best is None or value > state.best):
        state.best = value
        run.checkpoint("best.pt", metrics)
    return metrics


def train_one_epoch(run: _Run) -> Optional[dict]:
    """The steps of the current epoch, from where it stands, until it ends or the run does (then the epoch
    is not counted as over). Returns the ``stopped`` result when a signal or ``train.stop_after`` stops it."""
    state, t = run.state, run.cfg.train
    sampler = run.loader.sampler
    sampler.epoch, sampler.start = state.epoch, state.epoch_it * run.cfg.data.batch_size
    run.ddp.train()
    for images, targets, skipped, _ in run.loader:
        run.step(images, targets, skipped)
        end = state.it >= run.total
        signalled = run.agree()
        if signalled or (t.stop_after and run.steps >= t.stop_after):
            return run.stopped(signalled or "stop_after")
        if state.it % t.log_interval == 0 or end:
            run.log_window()
        if end:
            return None
        if t.iters and state.it % t.eval_interval == 0:
            run.pause_for_evaluation()
            run.ddp.train()
    state.epoch += 1
    state.epoch_it = 0
    if t.epochs and state.epoch % t.eval_interval == 0 and state.it < run.total:
        run.pause_for_evaluation()
    return None


def train_loop(cfg: Config, model: nn.Module, train_loader: DataLoader, info: DistInfo, work_dir: Path,
               evaluate: Callable[[nn.Module], dict], metric_key: str, resume: Optional[str] = None,
               classes: Optional[list] = None, before_training: Optional[Callable[[nn.Module], None]] = None,
               resume_state: Optional[dict] = None, on_saved: Optional[Callable[[], None]] = None) -> dict:
    """Train ``model`` as ``cfg`` says; returns the final evaluation metrics, or ``{"stopped": True, "iter",
    "reason"}`` when a signal or ``train.stop_after`` stopped it with a resumable ``last.pt``.

    ``resume``: the checkpoint to continue from (``resume_state``: its contents, if already loaded).
    ``evaluate(model)`` runs on every process and returns the same metrics dict on each; ``on_saved()``
    runs on process 0 after each checkpoint is written.
    """
    if len(train_loader) == 0:
        raise TrainingError(f"the training set is smaller than one batch ({cfg.data.batch_size} x {info.world} processes)")
    run = _Run(cfg, model, train_loader, info, work_dir, evaluate, metric_key, classes, on_saved)
    run.start(resume, resume_state, before_training)
    with run.stop, closing(run.progress):  # closed on errors too, so that an error message starts its own line
        while run.state.it < run.total:
            stopped = train_one_epoch(run)
            if stopped is not None:
                return stopped
    return run.finish()
