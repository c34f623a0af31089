"""Output heads: the DNC head (nearest sub-centroid) and the parametric linear baseline.

Every head maps features to class logits with one interface, for images ``(N, D)`` and, through
``PixelHead``, for pixels ``(B, D, H, W)``:

* ``head(x)`` returns logits;
* ``head(x, target)`` returns ``(logits, losses)``, where ``losses`` holds any loss beyond the
  cross-entropy on the logits (which the model computes, at its own resolution); in training mode the
  DNC head's sub-centroids move with the labels, in eval mode nothing moves and ``losses`` is empty.

Inputs are checked: features of another width than the head's are a ``ValueError`` naming both, and
labels outside ``[0, C)`` other than the ignore value (-1; ``PixelHead``'s ``ignore_index``) a
``ValueError`` naming them, raised before anything moves. The label check reads one flag on the host:
on a GPU that is a synchronisation per step. ``dnc train`` checks every label of the dataset before
training (``data.check_labels``) and then turns the per-step check off (``head.check_labels = False``);
a training loop of your own keeps it unless it turns it off the same way.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .centroids import SubCentroids

__all__ = ["DNCHead", "LinearHead", "PixelHead", "build_head", "check_labels"]

_TORCH_NN = os.path.dirname(nn.__file__) + os.sep


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, called from a method of this module, of the code that called
    the head: the first frame outside this module and ``torch.nn`` (whose ``Module.__call__`` adds a
    number of frames that depends on the torch version)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_NN)):
        frame, level = frame.f_back, level + 1
    return level


def _check_width(x: torch.Tensor, in_dim: int, head: str) -> None:
    if torch.jit.is_tracing():  # a traced export: the shapes were checked when the model ran in PyTorch
        return
    if x.dim() < 1 or x.shape[-1] != in_dim:
        raise ValueError(f"{head}: features of shape {tuple(x.shape)} have width {x.shape[-1] if x.dim() else 0}, "
                         f"the head takes {in_dim}")


def check_labels(target: torch.Tensor, num_classes: int, head: str) -> None:
    """``ValueError`` naming the labels outside ``[0, num_classes)`` other than -1 (ignored). One host
    read of a combined flag (a synchronisation on a GPU); the offending values are gathered only then."""
    bad = (target < -1) | (target >= num_classes)
    if bad.any():
        values = torch.unique(target[bad]).tolist()
        raise ValueError(f"{head}: label(s) {values[:10]}{' ...' if len(values) > 10 else ''} outside "
                         f"[0, {num_classes}) ({int(bad.sum())} of {target.numel()}); nothing was updated")


class DNCHead(nn.Module):
    """Deep Nearest Centroids classifier: ``logits[n, c] = max_k <z_n, p(c, k)> / tau``.

    ``z = l2_normalize(LayerNorm(x))`` (the LayerNorm is optional). With ``calibration="layernorm"``
    the class scores go through a LayerNorm over the C classes with a learned per-class affine instead
    of the fixed temperature, as in the original code; the prediction is then no longer exactly the
    class of the nearest sub-centroid.

    Training: the sub-centroids move only when the head sees the labels. In a training loop of your
    own, call it as ``logits, losses = head(x, target)`` (``losses``: the weighted auxiliary losses,
    to add to your cross-entropy on ``logits``); ``head(x)`` in training mode returns logits and moves
    nothing (it warns once). In eval mode ``head(x, target)`` returns ``(logits, {})`` and moves nothing.
    Labels are in ``[0, C)``; -1 marks a sample that takes no part in the clustering (an ignored pixel).
    Under ``DistributedDataParallel`` with a memory, wrap the model with
    ``broadcast_buffers=False`` (each process keeps its own memory shard; checked at the second step).

    Args:
        in_dim: D, the feature size. num_classes: C. num_subcentroids: K.
        feat_norm: a LayerNorm on the features before the normalisation.
        calibration: ``"temperature"`` (``scores / temperature``) or ``"layernorm"``.
        contrast_weight: weight of the sub-centroid contrast loss (cross-entropy over all C*K
            sub-centroid logits against the assigned sub-centroid); 0: off.
        compact_weight: weight of the compactness loss (mean of ``(1 - <z, assigned p>)^2``); 0: off.
            Both need the step's own assignment, so not with a memory.
        momentum: gamma of the sub-centroid update ``p <- normalize(gamma p + (1 - gamma) normalize(S))``.
        sinkhorn_eps, sinkhorn_iters: entropic regularisation and iterations of the balanced assignment.
        correct_only: only correctly classified samples move the sub-centroids.
        memory_size: if > 0, cluster a FIFO of the latest this many embeddings instead of the batch.
        update_interval: cluster every this many training steps.
        max_per_class: if > 0, at most this many random samples (pixels) per class enter a clustering step.
    """

    def __init__(self, in_dim: int, num_classes: int, num_subcentroids: int = 4, feat_norm: bool = True,
                 calibration: str = "temperature", temperature: float = 0.1, contrast_weight: float = 0.0,
                 compact_weight: float = 0.0, momentum: float = 0.999, sinkhorn_eps: float = 0.05,
                 sinkhorn_iters: int = 3, correct_only: bool = True, memory_size: int = 0,
                 update_interval: int = 1, max_per_class: int = 0):
        super().__init__()
        if calibration not in ("temperature", "layernorm"):
            raise ValueError(f"calibration must be 'temperature' or 'layernorm', got {calibration!r}")
        if (contrast_weight or compact_weight) and memory_size:
            raise ValueError("contrast_weight/compact_weight need the step's own assignment: use memory_size=0")
        self.in_dim, self.num_classes, self.temperature = in_dim, num_classes, temperature
        self.check_labels = True
        self.contrast_weight, self.compact_weight = contrast_weight, compact_weight
        self.feat_norm = nn.LayerNorm(in_dim) if feat_norm else nn.Identity()
        self.centroids = SubCentroids(num_classes, in_dim, num_subcentroids, momentum=momentum,
                                      sinkhorn_eps=sinkhorn_eps, sinkhorn_iters=sinkhorn_iters,
                                      correct_only=correct_only, memory_size=memory_size,
                                      update_interval=update_interval, max_per_class=max_per_class)
        self.mask_norm = nn.LayerNorm(num_classes) if calibration == "layernorm" else None
        self._warned_no_target = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(N, D)``."""
        return F.normalize(self.feat_norm(x).float(), dim=-1)

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        return self.mask_norm(scores) if self.mask_norm is not None else scores / self.temperature

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        _check_width(x, self.in_dim, "DNCHead")
        if target is not None and self.check_labels:
            check_labels(target, self.num_classes, "DNCHead")
        z = self.embed(x)
        sims = self.centroids.similarities(z)
        if not self.training or target is None:
            if self.training and not self._warned_no_target:
                self._warned_no_target = True
                warnings.warn("DNCHead called in training mode without labels: the sub-centroids do not move. "
                              "Call it as `logits, losses = head(x, target)` in training steps.", UserWarning,
                              stacklevel=_caller_stacklevel())
            logits = self.calibrate(sims.amax(-1).float())  # plain ops: traceable and exportable
            return logits if target is None else (logits, {})
        nearest = sims.detach().argmax(-1, keepdim=True)  # (N, C, 1): each class's nearest sub-centroid
        with torch.no_grad():  # the clustering needs the prediction before the differentiable scores
            correct = self.calibrate(sims.gather(-1, nearest).squeeze(-1).float()).argmax(1) == target
        assign = self.centroids.update(z.detach(), target, correct, sims.detach())
        if assign is None or not (self.contrast_weight or self.compact_weight):
            return self.calibrate(_Scores.apply(sims, nearest).float()), {}
        # The auxiliary losses, averaged over the samples that took part in the clustering:
        # contrast = logsumexp(sims / tau) - own / tau over the C*K sub-centroids and compact =
        # (1 - own)^2, own the similarity to the assigned sub-centroid.
        taken = assign >= 0
        n_taken = taken.sum().clamp_min(1)
        own_index = target.clamp_min(0) * self.centroids.k + assign.clamp_min(0)
        scores, lse, own = _ScoresAndTerms.apply(sims, nearest, own_index, self.temperature)
        losses = {}
        if self.contrast_weight:
            losses["contrast"] = self.contrast_weight * ((lse - own / self.temperature) * taken).sum() / n_taken
        if self.compact_weight:
            losses["compact"] = self.compact_weight * ((1 - own) ** 2 * taken).sum() / n_taken
        return self.calibrate(scores.float()), losses


class _Scores(torch.autograd.Function):
    """Class scores ``s[n, c, nearest[n, c]]`` (the max over K) of ``s (N, C, K)``, with a lean
    backward: it keeps only the ``(N, C)`` index and writes the gradient in place into one zero
    ``(N, C, K)`` tensor. (``amax`` keeps the input and builds masks; ``max(-1).values`` scatters out
    of place, two such tensors at once; ``gather`` keeps its input.)"""

    @staticmethod
    def forward(ctx, s: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(nearest)
        ctx.shape = s.shape
        return s.gather(-1, nearest).squeeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        nearest, = ctx.saved_tensors
        return g.new_zeros(ctx.shape).scatter_add_(-1, nearest, g.unsqueeze(-1)), None


class _ScoresAndTerms(torch.autograd.Function):
    """The class scores of :class:`_Scores` and, over the flattened ``(N, C*K)`` similarities,
    ``lse[n] = logsumexp_j(s[n, j] / tau)`` and ``own[n] = s[n, own_index[n]]`` (fp32, or fp64 for fp64
    ``s``), in one function so that the backward writes one gradient for all three.

    Autograd through ``s / tau``, ``logsumexp``, ``gather`` and the max would keep a scaled copy of
    ``s``, allocate an exponential of it, and produce three full-size gradients. Here the forward keeps
    ``s`` itself (already alive), the index and ``lse``; both passes work in row chunks of
    ``CHUNK`` elements.
    """

    CHUNK = 1 << 20  # elements per chunk (4 MiB of fp32)

    @staticmethod
    def forward(ctx, s: torch.Tensor, nearest: torch.Tensor, own_index: torch.Tensor, tau: float):
        flat = s.flatten(1)
        step = max(1, _ScoresAndTerms.CHUNK // max(1, flat.shape[1]))
        dt = torch.promote_types(s.dtype, torch.float32)
        lse = torch.cat([torch.logsumexp(c.to(dt) / tau, 1) for c in flat.split(step)]) if s.shape[0] else \
            s.new_zeros(0, dtype=dt)
        own = flat.gather(1, own_index[:, None]).squeeze(1).to(dt)
        ctx.save_for_backward(s, nearest, own_index, lse)
        ctx.tau, ctx.step = tau, step
        return s.gather(-1, nearest).squeeze(-1), lse, own

    @staticmethod
    def backward(ctx, g_scores: torch.Tensor, g_lse: torch.Tensor, g_own: torch.Tensor):
        s, nearest, own_index, lse = ctx.saved_tensors
        grad = torch.empty_like(s)
        flat = s.flatten(1)
        out = grad.view(flat.shape)  # explicit sizes: an empty batch has no -1 to infer
        for i in range(0, flat.shape[0], ctx.step):  # the softmax part, d lse / d s
            j = i + ctx.step
            out[i:j] = torch.exp(flat[i:j].to(lse.dtype) / ctx.tau - lse[i:j, None]).mul_(g_lse[i:j, None] / ctx.tau)
        grad.scatter_add_(-1, nearest, g_scores.unsqueeze(-1))
        out.scatter_add_(1, own_index[:, None], g_own[:, None].to(grad.dtype))
        return grad, None, None, None


class LinearHead(nn.Module):
    """The parametric baseline: a linear softmax classifier (optionally after dropout)."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.check_labels = True
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        _check_width(x, self.in_dim, "LinearHead")
        if target is not None and self.check_labels:
            check_labels(target, self.num_classes, "LinearHead")
        logits = self.fc(self.dropout(x))
        return logits if target is None else (logits, {})


class PixelHead(nn.Module):
    """Applies an ``(N, D)`` head to every pixel of a ``(B, D, H, W)`` feature map.

    Targets are ``(B, H, W)`` class maps at the feature resolution; ``ignore_index`` pixels take no
    part in the clustering (they are passed on as -1); other values outside ``[0, C)`` are an error
    (the inner head's check). With targets it returns ``(logits, losses)``, in eval mode too.
    """

    def __init__(self, head: nn.Module, ignore_index: int = 255):
        super().__init__()
        self.head, self.ignore_index = head, ignore_index

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        in_dim = self.head.in_dim
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != in_dim):
            raise ValueError(f"PixelHead: takes a 4-D feature map (B, {in_dim}, H, W), got shape {tuple(x.shape)}")
        b, d, h, w = x.shape
        if target is not None and tuple(target.shape) != (b, h, w):
            raise ValueError(f"PixelHead: targets of shape {tuple(target.shape)} for a {h}x{w} feature map of "
                             f"{b} images (B, H, W)")
        flat = x.permute(0, 2, 3, 1).reshape(-1, d)
        if target is None:
            return self._unflatten(self.head(flat), b, h, w)
        t = target.reshape(-1)
        logits, losses = self.head(flat, torch.where(t == self.ignore_index, -1, t))
        return self._unflatten(logits, b, h, w), losses

    @staticmethod
    def _unflatten(logits: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        return logits.view(b, h, w, -1).permute(0, 3, 1, 2)


def build_head(kind: str, in_dim: int, num_classes: int, **options) -> nn.Module:
    """``kind`` is ``"dnc"`` (with the DNC options) or ``"linear"`` (``dropout``)."""
    if kind == "dnc":
        return DNCHead(in_dim, num_classes, **options)
    if kind == "linear":
        return LinearHead(in_dim, num_classes, **options)
    raise ValueError(f"unknown head {kind!r}; choose 'dnc' or 'linear'")
