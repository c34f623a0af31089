"""Class sub-centroids: the nonparametric output layer of Deep Nearest Centroids.

Each of C classes is described by K unit vectors (sub-centroids) in a D-dimensional embedding space.
A sample scores a class by its cosine to the nearest sub-centroid of that class. The sub-centroids are
never trained by gradient descent: after each training step the samples of every class are assigned
to that class's sub-centroids by a balanced optimal transport (Sinkhorn-Knopp), and each sub-centroid
moves, with momentum, towards the normalised sum of the correctly classified samples it was given.

This module knows nothing about images: classification passes one embedding per image, segmentation
one per pixel. Everything is computed for all classes at once (scatter/index-add over the class
index), without host-device synchronisation, and with the per-class sums all-reduced across
processes, so that every process applies the identical update.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["sinkhorn_assign", "kmeans_pp", "SubCentroids"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


@torch.no_grad()
def sinkhorn_assign(scores: torch.Tensor, groups: torch.Tensor, num_groups: int,
                    eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced hard assignment of every sample to one of the K sub-centroids of its group.

    For each group (class) ``c`` with ``N_c`` samples this runs Sinkhorn-Knopp on
    ``Q = exp(scores / eps)`` restricted to the group, alternately scaling every sub-centroid's total
    mass to ``1/K`` and every sample's to ``1/N_c``, and returns ``argmax_k Q[n, k]``. All groups are
    solved together: the per-group sums are index-adds over ``groups``. Under ``torch.distributed``
    the sums are all-reduced, so the samples of all processes form one problem.

    Args:
        scores: ``(N, K)`` similarity of each sample to the K sub-centroids of its own group.
        groups: ``(N,)`` group of each sample, in ``[0, num_groups)``.
        num_groups: number of groups.
        eps: entropic regularisation (smaller is closer to a hard, exactly balanced assignment).
        iters: Sinkhorn iterations.

    Returns:
        ``(N,)`` int64 index of the assigned sub-centroid.
    """
    k = scores.shape[1]
    # In log space, so that no entry under- or overflows whatever eps and the scores (with
    # Q = exp(x), a small eps sends whole columns, e.g. an unused sub-centroid's, below e^-88, where
    # they lose their order). The constant factors 1/K and 1/N_c of the marginals cancel in the next
    # normalisation and do not change the argmax, so each step simply equalises the sums.
    x = scores.float() / eps
    index = groups[:, None].expand(-1, k)
    for _ in range(iters):
        # Sub-centroid step: x -= log(sum of exp(x) over the group's samples), stabilised by the max.
        top = _all_reduce(x.new_full((num_groups, k), float("-inf")).scatter_reduce(0, index, x, "amax"),
                          dist.ReduceOp.MAX if _world_size() > 1 else None)
        top = torch.where(torch.isfinite(top), top, 0.0)  # groups without samples
        mass = _all_reduce(x.new_zeros(num_groups, k).index_add_(0, groups, torch.exp(x - top[groups])))
        x = x - (top + mass.log())[groups]
        # Sample step: every sample's mass is equalised.
        x = x - x.logsumexp(1, keepdim=True)
    return x.argmax(1)


@torch.no_grad()
def kmeans_pp(x: torch.Tensor, groups: torch.Tensor, num_groups: int, k: int, iters: int = 10,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means with k-means++ seeding, run for every group at once.

    Args:
        x: ``(N, D)`` unit vectors; ``groups``: ``(N,)`` group of each.
    Returns:
        ``(centers (num_groups, k, D), found (num_groups,) bool)``; ``found`` is False for groups
        without samples, whose centers are meaningless.
    """
    n, d = x.shape
    counts = torch.bincount(groups, minlength=num_groups)
    # Lay the samples out as a padded (num_groups, max_count, D) tensor, one row per group.
    order = torch.argsort(groups, stable=True)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=x.device) - start[groups[order]]
    width = max(int(counts.max()), 1)
    pts = x.new_zeros(num_groups, width, d)
    pts[groups[order], rank] = x[order].to(pts.dtype)
    valid = torch.arange(width, device=x.device) < counts[:, None]
    rows = torch.arange(num_groups, device=x.device)

    def pick(weights: torch.Tensor) -> torch.Tensor:
        weights = torch.where(valid, weights, 0.0)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, valid.to(weights.dtype))
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)  # empty group
        idx = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(x.device)
        return pts[rows, idx]

    centers = [pick(torch.ones_like(valid, dtype=pts.dtype))]
    dist2 = (1 - torch.einsum("gnd,gd->gn", pts, centers[0])).clamp_min(0)
    for _ in range(1, k):
        centers.append(pick(dist2))
        dist2 = torch.minimum(dist2, (1 - torch.einsum("gnd,gd->gn", pts, centers[-1])).clamp_min(0))
    centers = torch.stack(centers, 1)
    for _ in range(iters):
        assign = torch.einsum("gnd,gkd->gnk", pts, centers).argmax(-1)
        onehot = F.one_hot(assign, k).to(pts.dtype) * valid[..., None]
        sums = torch.einsum("gnk,gnd->gkd", onehot, pts)
        centers = torch.where(onehot.sum(1)[..., None] > 0, F.normalize(sums, dim=-1), centers)
    return F.normalize(centers, dim=-1), counts > 0


class SubCentroids(nn.Module):
    """K sub-centroids per class, scored by cosine and updated by balanced clustering.

    Args:
        num_classes: C. dim: D. num_subcentroids: K.
        momentum: gamma of ``p <- normalize(gamma * p + (1 - gamma) * normalize(S))``.
        sinkhorn_eps, sinkhorn_iters: of the balanced assignment.
        correct_only: only correctly classified samples move the sub-centroids.
        memory_size: if > 0, a FIFO of the latest (embedding, label, correct) triples of this process;
            clustering runs over the whole memory instead of the current batch.
        update_interval: cluster every this many steps (e.g. once per memory refill).
        max_per_class: if > 0, at most this many random samples of a class enter one clustering step
            (the others take no part in it). The vectorised step costs O(N * K) whatever the cap.

    State (all in ``state_dict``): ``centroids`` (C, K, D) unit vectors, the memory, and the step count.
    """

    def __init__(self, num_classes: int, dim: int, num_subcentroids: int = 4, momentum: float = 0.999,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3, correct_only: bool = True,
                 memory_size: int = 0, update_interval: int = 1, max_per_class: int = 0):
        super().__init__()
        if min(num_classes, dim, num_subcentroids, update_interval) < 1:
            raise ValueError("num_classes, dim, num_subcentroids and update_interval must be >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes, self.dim, self.k = num_classes, dim, num_subcentroids
        self.momentum, self.eps, self.iters = momentum, sinkhorn_eps, sinkhorn_iters
        self.correct_only, self.update_interval = correct_only, update_interval
        self.memory_size, self.max_per_class = memory_size, max_per_class
        self.steps = 0
        self.alignment: Optional[torch.Tensor] = None
        self.register_buffer("centroids", F.normalize(torch.randn(num_classes, num_subcentroids, dim), dim=-1))
        if memory_size:
            self.register_buffer("memory_z", torch.zeros(memory_size, dim))
            self.register_buffer("memory_y", torch.full((memory_size,), -1, dtype=torch.long))
            self.register_buffer("memory_ok", torch.zeros(memory_size, dtype=torch.bool))
            self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, k={self.k}, dim={self.dim}, momentum={self.momentum}, "
                f"memory_size={self.memory_size}, update_interval={self.update_interval}")

    def get_extra_state(self):
        return {"steps": self.steps}

    def set_extra_state(self, state):
        self.steps = int(state["steps"])

    def similarities(self, z: torch.Tensor) -> torch.Tensor:
        """Cosines ``(N, C, K)`` of unit embeddings ``z (N, D)`` to every sub-centroid."""
        p = self.centroids.flatten(0, 1)
        return (z @ p.to(z.dtype).t()).view(z.shape[0], self.num_classes, self.k)

    def _groups(self, labels: torch.Tensor, cap: int = 0) -> torch.Tensor:
        """Class of each sample, with an extra group C for samples that take no part (ignored pixels,
        empty memory slots, and, with ``cap``, all but ``cap`` random samples of each class)."""
        c = self.num_classes
        groups = torch.where((labels >= 0) & (labels < c), labels, c)
        if cap > 0:
            perm = torch.randperm(groups.numel(), device=groups.device)
            order = perm[torch.argsort(groups[perm], stable=True)]
            counts = groups.new_zeros(c + 1).index_add_(0, groups, torch.ones_like(groups))  # bincount syncs on CUDA
            start = torch.cumsum(counts, 0) - counts
            rank = torch.empty_like(groups)
            rank[order] = torch.arange(groups.numel(), device=groups.device) - start[groups[order]]
            groups = torch.where(rank < cap, groups, c)
        return groups

    def _own_similarities(self, z: torch.Tensor, groups: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """``(N, K)`` cosines of each sample to the sub-centroids of its own class."""
        cls = groups.clamp(max=self.num_classes - 1)
        if not z.shape[0]:
            return z.new_zeros(0, self.k, dtype=torch.float32)
        # Gathering the own-class sub-centroids costs N*K*D memory: do it in chunks.
        return torch.cat([torch.einsum("nd,nkd->nk", zc.float(), self.centroids[gc].float())
                          for zc, gc in zip(z.split(chunk), cls.split(chunk))])

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
               sims: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One training step of the clustering (no gradient).

        Args:
            z: ``(N, D)`` unit embeddings of the step (detached).
            labels: ``(N,)`` class of each; values outside ``[0, C)`` (ignored pixels) take no part.
            correct: ``(N,)`` bool, whether the sample was classified correctly in the forward.
            sims: optional ``(N, C, K)`` similarities already computed in the forward.

        Returns:
            ``(N,)`` sub-centroid index assigned to each sample of the step, -1 where it took no part;
            ``None`` when the step clustered the memory or did not cluster at all.
        """
        self.steps += 1
        if self.memory_size:
            self._push(z, labels, correct)
            if self.steps % self.update_interval:
                return None
            z, labels, correct, sims = self.memory_z, self.memory_y, self.memory_ok, None
        elif self.steps % self.update_interval:
            return None
        c, k = self.num_classes, self.k
        groups = self._groups(labels, self.max_per_class)
        if sims is None:
            own = self._own_similarities(z, groups)
        else:
            own = sims.gather(1, groups.clamp(max=c - 1)[:, None, None].expand(-1, 1, k)).squeeze(1).float()
        assign = sinkhorn_assign(own, groups, c + 1, self.eps, self.iters)
        weight = (groups < c).float()
        if self.correct_only:
            weight = weight * correct.float()
        # Sufficient statistics S[c, k] (sum of assigned embeddings) and M[c, k] (their count), with the
        # count as an extra column so that one all-reduce carries both.
        stats = z.new_zeros((c + 1) * k, self.dim + 1, dtype=torch.float32)
        stats.index_add_(0, groups * k + assign, torch.cat([z.float(), torch.ones_like(weight)[:, None]], 1) * weight[:, None])
        stats = _all_reduce(stats[: c * k])
        total, count = stats[:, :-1], stats[:, -1:]
        p = self.centroids.flatten(0, 1)
        # Convergence diagnostic (logged by the engine): mean cosine between each updated sub-centroid
        # and the normalised sum of the samples assigned to it; it tends to 1 as they converge.
        target = F.normalize(total, dim=1)
        moving = (count > 0).float()
        self.alignment = ((p * target).sum(1, keepdim=True) * moving).sum() / moving.sum().clamp_min(1)
        moved = self.momentum * p + (1 - self.momentum) * target
        norm = moved.norm(dim=1, keepdim=True)
        keep = (count == 0) | (norm < 1e-6)
        # Out of place: the old tensor may still be needed by autograd for this step's backward.
        self.centroids = torch.where(keep, p, moved / norm.clamp_min(1e-12)).view(c, k, self.dim)
        return None if self.memory_size else torch.where(groups < c, assign, -1)

    def _push(self, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor) -> None:
        n = z.shape[0]
        if n > self.memory_size:
            z, labels, correct, n = z[-self.memory_size:], labels[-self.memory_size:], correct[-self.memory_size:], self.memory_size
        idx = (self.memory_ptr + torch.arange(n, device=z.device)) % self.memory_size
        self.memory_z.index_copy_(0, idx, z.to(self.memory_z.dtype))
        self.memory_y.index_copy_(0, idx, labels.long())
        self.memory_ok.index_copy_(0, idx, correct.bool())
        self.memory_ptr.copy_((self.memory_ptr + n) % self.memory_size)

    @torch.no_grad()
    def init_from_embeddings(self, z: torch.Tensor, labels: torch.Tensor, iters: int = 10,
                             generator: Optional[torch.Generator] = None) -> None:
        """Data-driven initialisation: k-means++ then spherical k-means on each class's embeddings.

        Classes without samples keep their random sub-centroids. Under ``torch.distributed`` the
        result of process 0 is broadcast, so that all processes start identical.
        """
        groups = self._groups(labels)
        centers, found = kmeans_pp(F.normalize(z.float(), dim=-1), groups, self.num_classes + 1, self.k, iters, generator)
        found = found[: self.num_classes, None, None]
        new = torch.where(found, centers[: self.num_classes].to(self.centroids), self.centroids)
        if _world_size() > 1:
            dist.broadcast(new, 0)
        self.centroids = new
