"""Evaluation metrics: top-k accuracy, a confusion matrix and MMSegmentation-style mIoU, DDP-aware.

All accumulate integer counts on ``device`` without host synchronisation in ``update``, and sum
them over processes with ``torch.distributed.all_reduce`` in ``compute`` when a process group is
initialised (each sample must be evaluated by exactly one process); ``compute`` is then a
collective call that every process must make. ``compute`` does not modify the state, so it may be
called repeatedly; ``reset`` clears it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ["Accuracy", "ConfusionMatrix", "SegMetric"]


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A summed copy of ``tensor`` over all processes (the tensor itself is left untouched)."""
    tensor = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class Accuracy:
    """Top-k classification accuracy in percent.

    ``update(logits (N, C), target (N,))``; ``compute() -> {'top1': ..., 'top5': ...}``. A ``k``
    larger than the number of classes C counts as ``k = C`` (always correct), but keeps its key.
    """

    def __init__(self, topk: Sequence[int] = (1, 5), device: Union[str, torch.device] = "cpu"):
        self.topk = tuple(int(k) for k in topk)
        if not self.topk or min(self.topk) < 1:
            raise ValueError(f"topk: expected positive integers, got {tuple(topk)!r}")
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        # counts[:-1] = correct predictions per k, counts[-1] = samples seen
        self.counts = torch.zeros(len(self.topk) + 1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(f"Accuracy.update: expected logits (N, C) and target (N,), "
                             f"got {tuple(logits.shape)} and {tuple(target.shape)}")
        num_classes = logits.shape[1]
        maxk = min(max(self.topk), num_classes)
        pred = logits.topk(maxk, dim=1).indices                      # (N, maxk)
        hit = (pred == target.view(-1, 1)).cumsum(dim=1).clamp_(max=1)  # hit[:, j]: within top j+1
        correct = hit.sum(dim=0)                                      # (maxk,)
        ks = torch.tensor([min(k, num_classes) - 1 for k in self.topk], device=correct.device)
        counts = torch.cat([correct[ks], correct.new_tensor([target.numel()])])
        self.counts += counts.to(self.device)

    def compute(self) -> Dict[str, float]:
        counts = _all_reduce_sum(self.counts).double()
        total = counts[-1].item()
        values = (100.0 * counts[:-1] / total).tolist() if total else [float("nan")] * len(self.topk)
        return {f"top{k}": v for k, v in zip(self.topk, values)}


class ConfusionMatrix:
    """``confusion[label, pred]``: a C x C count matrix over integer predictions and labels of any
    (equal) shape; labels equal to ``ignore_index`` are skipped. ``compute()`` returns it summed over
    processes, int64 on the CPU."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None, device: Union[str, torch.device] = "cpu"):
        self.num_classes = int(num_classes)
        if self.num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"{type(self).__name__}.update: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             f"must have the same shape")
        c = self.num_classes
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        labelled = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        bad = labelled & ((target < 0) | (target >= c) | (pred < 0) | (pred >= c))
        if bad.any():  # one host sync per update; evaluation is not the hot path
            t, p = target[bad], pred[bad]
            raise ValueError(f"{type(self).__name__}.update: label(s) {sorted(set(t.tolist()))[:10]} / prediction(s) "
                             f"{sorted(set(p.tolist()))[:10]} outside 0..{c - 1} (ignore index {self.ignore_index})")
        index = target[labelled] * c + pred[labelled]
        self.confusion += torch.bincount(index, minlength=c * c).view(c, c).to(self.device)

    def compute(self) -> torch.Tensor:
        return _all_reduce_sum(self.confusion).cpu()

    @staticmethod
    def recall(confusion: torch.Tensor) -> List[Optional[float]]:
        """Per class, correct / labelled in percent (the per-class accuracy); None where never labelled."""
        cm = confusion.double()
        acc = 100.0 * cm.diagonal() / cm.sum(dim=1)
        return [None if v != v else v for v in acc.tolist()]


class SegMetric(ConfusionMatrix):
    """Semantic-segmentation metrics from a dataset-level confusion matrix (MMSeg semantics).

    ``update(pred (N, H, W), target (N, H, W))`` adds to a C x C matrix ``confusion[label, pred]``
    (pixels whose target is ``ignore_index`` are skipped). ``compute()`` returns, in percent:

    - ``IoU``: per class, intersection / union summed over the whole dataset; ``None`` for a class
      absent from both predictions and labels (union 0). A class predicted but never labelled has
      IoU 0 and counts in the mean.
    - ``Acc``: per class, recall (correct / labelled pixels); ``None`` where never labelled.
    - ``mIoU`` / ``mAcc``: the mean over the classes that are not ``None``.
    - ``aAcc``: correct / all labelled pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Union[str, torch.device] = "cpu"):
        super().__init__(num_classes, ignore_index, device)

    def compute(self) -> Dict[str, Union[float, List[Optional[float]]]]:
        cm = super().compute().double()
        intersect = cm.diagonal()
        area_label, area_pred = cm.sum(dim=1), cm.sum(dim=0)
        union = area_label + area_pred - intersect
        iou = 100.0 * intersect / union            # 0 / 0 -> NaN for classes absent everywhere
        acc = 100.0 * intersect / area_label       # NaN for classes never labelled
        total = area_label.sum()
        return {
            "aAcc": (100.0 * intersect.sum() / total).item() if total > 0 else float("nan"),
            "mIoU": iou.nanmean().item(),
            "mAcc": acc.nanmean().item(),
            "IoU": [None if v != v else v for v in iou.tolist()],
            "Acc": [None if v != v else v for v in acc.tolist()],
        }
