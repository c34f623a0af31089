"""Where a training run stands (steps, epoch, best evaluation) and whether it can go on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["TrainingError", "TrainState", "epoch_shown", "check_finite"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss), reported as one line."""


@dataclass
class TrainState:
    it: int = 0           # optimisation steps done
    epoch: int = 0        # current epoch
    epoch_it: int = 0     # steps done inside the current epoch
    best: Optional[float] = None


def epoch_shown(state: TrainState) -> int:
    """The epoch shown in logs, counted from 1: the one of the last step (a finished epoch until the
    next one starts), so that evaluations after epochs 1, 2 and at the end of 3 read 1, 2, 3."""
    return state.epoch + (state.epoch_it > 0)


def check_finite(bad_step: torch.Tensor, state: TrainState) -> None:
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
