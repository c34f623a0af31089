"""Stopping a run cleanly: SIGINT/SIGTERM become a request to save a resumable checkpoint and leave, and
under DDP all processes agree on the step to stop at."""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["StopRequest", "StopAgreement"]


class StopRequest:
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


class StopAgreement:
    """Whether every process stops after this step, the same answer everywhere, without a host-device
    synchronisation: ``None``, or the name of the signal that asked for the stop.

    One process: the signal flag itself, read in Python at every step. Several: each step starts an
    asynchronous all-reduce (max) of this process's signal number on a host-side group and reads the
    one started at the step before, so all processes stop together one step after the first signal.
    """

    def __init__(self, stop: StopRequest, group=None):
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
