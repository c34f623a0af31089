"""What a training run reports: ``log.jsonl`` (and TensorBoard), the progress bar or progress lines, the
throughput and the sub-centroids' convergence."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .state import TrainingError

__all__ = ["JsonLogger", "Progress", "speed", "centroid_stats"]

log_text = logging.getLogger("dnc")  # progress lines (the command line prints them)


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


def speed(images: int, seconds: float, steps: int, left: int, device: torch.device) -> dict:
    """Throughput over the last log window, the time left at that pace and, on a GPU, the peak memory."""
    out = {"images_per_s": round(images / max(seconds, 1e-9), 2), "eta_s": round(left * seconds / max(steps, 1), 1)}
    if device.type == "cuda":
        out["max_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def centroid_stats(model: nn.Module) -> dict:
    """``centroid_cos``: how close the sub-centroids are to the means of the samples assigned to them
    at the last update (1 = converged), for every sub-centroid module of the model."""
    from ..centroids import SubCentroids
    values = [m.alignment for m in model.modules() if isinstance(m, SubCentroids) and m.alignment is not None]
    return {"centroid_cos": round(float(sum(values) / len(values)), 5)} if values else {}


def _clock(seconds: float) -> str:
    m, sec = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


class Progress:
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
            log_text.info(f"epoch {epoch} iter {it}/{self.total}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
