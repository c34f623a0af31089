"""The engine: what trains any model whose ``forward(images, targets)`` returns ``(logits, losses)``.

One module per job:

* :mod:`~dnc.engine.distributed`: processes and the host-side agreements between them;
* :mod:`~dnc.engine.loaders`: samplers, per-sample seeding, :func:`make_loader`;
* :mod:`~dnc.engine.optim`: optimiser and learning-rate schedule;
* :mod:`~dnc.engine.checkpoint`: the checkpoint format, RNG state and per-process buffers;
* :mod:`~dnc.engine.log`: ``log.jsonl``/TensorBoard, progress bar and lines;
* :mod:`~dnc.engine.stop`: signals and the stop agreement;
* :mod:`~dnc.engine.state` and :mod:`~dnc.engine.loop`: where a run stands, and the loop
  (:func:`train_loop`: :func:`train_one_epoch` and :func:`evaluate`).

Resuming is exact: the data order and every augmentation are functions of (seed, epoch, sample), and the
checkpoint holds the model (sub-centroids, memory and step counters included), optimiser, schedule, loss
scaler, RNG states and the position inside the epoch.
"""
from .checkpoint import CheckpointError, load_checkpoint, load_resumable, save_checkpoint
from .distributed import (DistInfo, check_one_process, gather_objects, setup_distributed, setup_one_process,
                          unwrap)
from .loaders import EpochSampler, IndexedCollate, SeededDataset, ignore_stop_signals, make_loader
from .log import JsonLogger
from .loop import train_loop
from .optim import build_optimizer, build_scheduler, lr_factor
from .state import TrainingError

__all__ = ["DistInfo", "setup_distributed", "check_one_process", "setup_one_process", "unwrap", "gather_objects",
           "EpochSampler", "SeededDataset", "IndexedCollate", "ignore_stop_signals", "make_loader",
           "build_optimizer", "build_scheduler", "lr_factor", "save_checkpoint", "load_checkpoint", "load_resumable",
           "CheckpointError", "TrainingError", "train_loop", "JsonLogger"]
