"""The sizes of ``head_overhead.py`` and what its variants share: the ProtoSeg-style reference (the clustering
as a Python loop over classes), one head training step, and scene-parsing-like labels."""
from __future__ import annotations

from typing import Optional

import common  # noqa: F401  (this checkout's dnc first on the path)
import torch
import torch.nn.functional as F

from dnc.heads import DNCHead

# --------------------------------------------------------------------------------------------- sizes
SIZES = {
    # head (B, C, K, D); pixel update (N, C, K, D); pixel head step N; cap scaling (Ns, cap)
    "full": dict(head=(256, 1000, 4, 2048), pixel=(262_144, 150, 10, 512), pixel_step=262_144,
                 cap=((65_536, 131_072, 262_144), 256)),
    "cpu": dict(head=(256, 1000, 4, 2048), pixel=(262_144, 150, 10, 512), pixel_step=16_384,
                cap=((65_536, 131_072, 262_144), 256)),
    "smoke": dict(head=(64, 50, 4, 64), pixel=(4_096, 15, 10, 64), pixel_step=2_048, cap=((1_024, 2_048, 4_096), 16)),
}
ROUNDS = {"full": (3, 20, 7), "cpu": (1, 5, 5), "smoke": (1, 2, 2)}  # warm-up, head rounds, pixel rounds
MEMORY_SETTINGS = {"dnc_memory": (1024, 8), "dnc_memory_swin": (512, 4)}  # the shipped ImageNet / Swin configs



def skewed_labels(n: int, c: int, g: torch.Generator) -> torch.Tensor:
    """Class frequencies as skewed as in scene parsing (p_c ~ 1/(c+1)); 5% of the pixels ignored (-1)."""
    probs = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
    labels = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = -1
    return labels



# --------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def naive_update(centroids: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
                 sims: Optional[torch.Tensor] = None, momentum: float = 0.999, eps: float = 0.05,
                 iters: int = 3, correct_only: bool = True):
    """The clustering step as a plain loop over classes, as in the prototype-segmentation code.

    For each class present: select its samples (boolean mask), take their similarities to the class's
    K sub-centroids, balance them by Sinkhorn-Knopp (``iters`` alternate normalisations of the K
    sub-centroid masses and the per-sample masses), assign each sample to its argmax, and move every
    sub-centroid that received correctly classified samples towards their normalised sum.
    Returns ``(new centroids (C, K, D), assignment (N,), -1 where a sample took no part)``.
    """
    c_all, k, _ = centroids.shape
    protos = centroids.clone()
    assign = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
    tiny = torch.finfo(torch.float32).tiny
    for c in labels.unique().tolist():
        if c < 0 or c >= c_all:
            continue
        mask = labels == c
        zc = z[mask].float()
        g = sims[mask, c].float() if sims is not None else zc @ centroids[c].float().t()
        x = g / eps
        q = torch.exp((x - x.max()).clamp_min(-80.0))
        for _ in range(iters):
            q = q / q.sum(0, keepdim=True).clamp_min(tiny)  # each sub-centroid's mass equal
            q = q / q.sum(1, keepdim=True).clamp_min(tiny)  # each sample's mass equal
        a = q.argmax(1)
        w = correct[mask].float() if correct_only else torch.ones_like(a, dtype=torch.float32)
        onehot = F.one_hot(a, k).float() * w[:, None]
        total = onehot.t() @ zc  # (K, D)
        count = onehot.sum(0)
        moved = F.normalize(momentum * protos[c] + (1 - momentum) * F.normalize(total, dim=1), dim=1)
        protos[c] = torch.where(count[:, None] > 0, moved, protos[c])
        assign[mask] = a
    return protos, assign



def naive_head_step(head: DNCHead, x: torch.Tensor, y: torch.Tensor, ignore_index: int = -1) -> None:
    """A ProtoSeg-style training step of the DNC head: class scores by ``amax``, cross-entropy, backward,
    then the clustering as the per-class loop (:func:`naive_update`)."""
    z = head.embed(x)
    sims = head.centroids.similarities(z)
    logits = sims.amax(-1).float() / head.temperature
    F.cross_entropy(logits, y, ignore_index=ignore_index).backward()
    sc = head.centroids
    sc.centroids, _ = naive_update(sc.centroids, z.detach(), y, logits.detach().argmax(1) == y, sims.detach(),
                                   sc.momentum, sc.eps, sc.iters, sc.correct_only)


def head_call(head, x: torch.Tensor, y: torch.Tensor, amp, ignore_index: int = -100) -> None:
    """One training step of a head: ``head(x, y)``, cross-entropy (+ auxiliary losses), backward."""
    with amp():
        logits, losses = head(x, y)
        loss = F.cross_entropy(logits.float(), y, ignore_index=ignore_index) + sum(losses.values())
    loss.backward()
