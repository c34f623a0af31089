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
    with torch.no_grad():
        k = scores.shape[1]
        # In log space, so that no entry under- or overflows whatever eps and the scores (with
        # Q = exp(x), a small eps sends whole columns, e.g. an unused sub-centroid's, below e^-88, where
        # they lose their order). The constant factors 1/K and 1/N_c of the marginals cancel in the next
        # normalisation and do not change the argmax, so each step simply equalises the sums. In place
        # where possible: every pass over the (N, K) scores counts.
        x = scores.float() / eps
        index = groups[:, None].expand(-1, k)
        for it in range(iters):
            # Sub-centroid step: x -= log(sum of exp(x) over the group's samples), stabilised by the max.
            top = _all_reduce(x.new_full((num_groups, k), float("-inf")).scatter_reduce(0, index, x, "amax"),
                              dist.ReduceOp.MAX if _world_size() > 1 else None)
            top = torch.where(torch.isfinite(top), top, 0.0)  # groups without samples
            mass = _all_reduce(x.new_zeros(num_groups, k).index_add_(0, groups, (x - top[groups]).exp_()))
            x -= (top + mass.log())[groups]
            # Sample step: every sample's mass is equalised. The last one would not change the argmax.
            if it < iters - 1:
                x -= x.logsumexp(1, keepdim=True)
        return x.argmax(1)


def kmeans_pp(x: torch.Tensor, groups: torch.Tensor, num_groups: int, k: int, iters: int = 10,
              generator: Optional[torch.Generator] = None, budget: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means with k-means++ seeding, for every group.

    The groups are solved in chunks of similar size, each laid out as a padded
    ``(groups, largest count, D)`` tensor of at most about ``budget`` elements (a group larger than
    that is a chunk of its own), so that a few large groups do not pad every small one to their size.
    The random draws do not depend on the chunking: every seeding step draws one exponential key per
    sample, and a group picks the sample maximising ``weight / key`` (sampling proportionally to the
    weight), so the result is the same for any ``budget``. Meant for the initialisation: it
    synchronises with the host (to lay out the chunks).

    Args:
        x: ``(N, D)`` unit vectors; ``groups``: ``(N,)`` group of each, in ``[0, num_groups)``.
        generator: a CPU generator for the seeding draws.
    Returns:
        ``(centers (num_groups, k, D), found (num_groups,) bool)``; ``found`` is False for groups
        without samples, whose centers are zero.
    """
    with torch.no_grad():
        n, d = x.shape
        dev = x.device
        counts = torch.bincount(groups, minlength=num_groups)
        keys = torch.empty(k, n).exponential_(generator=generator).to(dev)  # one key per sample and seeding step
        order = torch.argsort(groups, stable=True)
        start = (torch.cumsum(counts, 0) - counts).tolist()
        sizes = counts.tolist()
        centers = x.new_zeros(num_groups, k, d)
        chunk: list = []
        for g in sorted(range(num_groups), key=lambda g: -sizes[g]) + [None]:  # largest first, None flushes
            if chunk and (g is None or not sizes[g] or (len(chunk) + 1) * sizes[chunk[0]] * d > budget):
                idx = torch.tensor(chunk, device=dev)
                width = sizes[chunk[0]]
                rank = torch.arange(width, device=dev)
                valid = rank < counts[idx, None]
                rows = order[(torch.tensor([start[c] for c in chunk], device=dev)[:, None] + rank).clamp(max=n - 1)]
                centers[idx] = _kmeans_padded(x[rows].float() * valid[..., None], valid, keys[:, rows], iters)
                chunk = []
            if g is None or not sizes[g]:
                break
            chunk.append(g)
        return F.normalize(centers, dim=-1), counts > 0


def _kmeans_padded(pts: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`kmeans_pp` on ``pts (G, W, D)`` (padding zero, ``valid (G, W)``), ``keys (k, G, W)``."""
    k = keys.shape[0]
    rows = torch.arange(pts.shape[0], device=pts.device)

    def pick(step: int, weights: torch.Tensor) -> torch.Tensor:
        weights = torch.where(valid, weights, 0.0)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, valid.to(weights.dtype))  # all equal: uniform
        return pts[rows, (weights / keys[step]).argmax(1)]

    centers = [pick(0, valid.to(pts.dtype))]
    dist2 = (1 - torch.einsum("gnd,gd->gn", pts, centers[0])).clamp_min(0)
    for step in range(1, k):
        centers.append(pick(step, dist2))
        dist2 = torch.minimum(dist2, (1 - torch.einsum("gnd,gd->gn", pts, centers[-1])).clamp_min(0))
    centers = torch.stack(centers, 1)
    for _ in range(iters):
        assign = torch.einsum("gnd,gkd->gnk", pts, centers).argmax(-1)
        onehot = F.one_hot(assign, k).to(pts.dtype) * valid[..., None]
        sums = torch.einsum("gnk,gnd->gkd", onehot, pts)
        centers = torch.where(onehot.sum(1)[..., None] > 0, F.normalize(sums, dim=-1), centers)
    return centers


class SubCentroids(nn.Module):
    """K sub-centroids per class, scored by cosine and updated by balanced clustering.

    Args:
        num_classes: C. dim: D. num_subcentroids: K.
        momentum: gamma of ``p <- normalize(gamma * p + (1 - gamma) * normalize(S))``.
        sinkhorn_eps, sinkhorn_iters: of the balanced assignment.
        correct_only: only correctly classified samples move the sub-centroids.
        memory_size: if > 0, a FIFO of the latest (embedding, label, correct) triples of this process;
            clustering runs over the whole memory instead of the current batch. Under
            ``DistributedDataParallel`` each process keeps its own shard: wrap the model with
            ``broadcast_buffers=False`` (checked once, at the second update).
        update_interval: cluster every this many steps (e.g. once per memory refill).
        max_per_class: if > 0, at most this many samples of a class, drawn at random, enter one
            clustering step; the others take no part. When ``C * max_per_class`` is below the number
            of samples N, the step works on a fixed ``(C, max_per_class)`` layout of the chosen samples,
            so that beyond a sort of N keys its cost no longer grows with N.

    State (all plain tensors in ``state_dict``): ``centroids`` (C, K, D) unit vectors, ``step_count``
    (the number of updates, a 0-dim int64) and, with a memory, the memory and its write pointer.
    ``steps`` is a Python copy of ``step_count``, so that deciding whether a step clusters never waits
    for the device.
    """

    def __init__(self, num_classes: int, dim: int, num_subcentroids: int = 4, momentum: float = 0.999,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3, correct_only: bool = True,
                 memory_size: int = 0, update_interval: int = 1, max_per_class: int = 0):
        super().__init__()
        if min(num_classes, dim, num_subcentroids, update_interval) < 1:
            raise ValueError("num_classes, dim, num_subcentroids and update_interval must be >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if memory_size < 0 or max_per_class < 0:
            raise ValueError("memory_size and max_per_class must be >= 0")
        self.num_classes, self.dim, self.k = num_classes, dim, num_subcentroids
        self.momentum, self.eps, self.iters = momentum, sinkhorn_eps, sinkhorn_iters
        self.correct_only, self.update_interval = correct_only, update_interval
        self.memory_size, self.max_per_class = memory_size, max_per_class
        self.steps = 0
        self.alignment: Optional[torch.Tensor] = None
        self.register_buffer("centroids", F.normalize(torch.randn(num_classes, num_subcentroids, dim), dim=-1))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        if memory_size:
            self.register_buffer("memory_z", torch.zeros(memory_size, dim))
            self.register_buffer("memory_y", torch.full((memory_size,), -1, dtype=torch.long))
            self.register_buffer("memory_ok", torch.zeros(memory_size, dtype=torch.bool))
            self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))
            # The rank that wrote the memory: DDP with broadcast_buffers=True would overwrite it with
            # process 0's (with the memory shard itself). Not saved: it describes this run's processes.
            self.register_buffer("memory_owner", torch.full((), -1, dtype=torch.long), persistent=False)
            self._owner_check = 0  # 0: owner not written yet, 1: written, 2: checked

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, k={self.k}, dim={self.dim}, momentum={self.momentum}, "
                f"memory_size={self.memory_size}, update_interval={self.update_interval}, "
                f"max_per_class={self.max_per_class}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the step count became a buffer hold it as ``_extra_state``.
        old = state_dict.pop(prefix + "_extra_state", None)
        if old is not None and prefix + "step_count" not in state_dict:
            state_dict[prefix + "step_count"] = torch.tensor(int(old["steps"]), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.steps = int(self.step_count)  # one read per load, never per step

    def similarities(self, z: torch.Tensor) -> torch.Tensor:
        """Cosines ``(N, C, K)`` of unit embeddings ``z (N, D)`` to every sub-centroid, in fp32 (fp64 for
        fp64 ``z``) whatever autocast is active: they decide the clustering (the correctness mask and
        the Sinkhorn assignment) and every open-set score, which must not depend on the precision of
        the forward (docs/ALGORITHM.md, "Precision")."""
        dt = torch.promote_types(z.dtype, torch.float32)
        p = self.centroids.flatten(0, 1).to(dt)
        if torch.is_autocast_enabled(z.device.type):  # not while exporting: no autocast region in the graph
            with torch.autocast(z.device.type, enabled=False):
                return (z.to(dt) @ p.t()).view(z.shape[0], self.num_classes, self.k)
        return (z.to(dt) @ p.t()).view(z.shape[0], self.num_classes, self.k)

    def _select(self, labels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The samples that take part in a clustering step: ``(groups, rows)``.

        ``groups`` holds each one's class, or C for a slot that takes no part (an ignored pixel, an
        empty memory slot, a sample over the cap). ``rows`` is None when the slots are the samples
        themselves; with a binding ``max_per_class`` the slots are a ``(C, cap)`` layout (flattened)
        of the chosen samples and ``rows`` their index in the step (N for an empty slot).
        """
        c, cap, n = self.num_classes, self.max_per_class, labels.numel()
        groups = torch.where((labels >= 0) & (labels < c), labels, c)
        if not cap:
            return groups, None
        # Random order within each class: sort by (class, random key).
        key = groups * (1 << 32) + torch.randint(1 << 32, (n,), device=groups.device)
        order = key.argsort()
        counts = groups.new_zeros(c + 1).index_add_(0, groups, torch.ones_like(groups))  # bincount syncs on CUDA
        start = torch.cumsum(counts, 0) - counts
        if c * cap >= n:  # the cap cannot shrink the step: keep the samples, drop those over the cap
            rank = torch.empty_like(groups)
            rank[order] = torch.arange(n, device=groups.device) - start[groups[order]]
            return torch.where(rank < cap, groups, c), None
        j = torch.arange(cap, device=groups.device)
        ok = j < counts[:c, None]
        rows = torch.where(ok, order[(start[:c, None] + j).clamp(max=n - 1)], n).flatten()
        return torch.where(ok, torch.arange(c, device=groups.device)[:, None], c).flatten(), rows

    def _own_similarities(self, z: torch.Tensor, groups: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """``(M, K)`` fp32 cosines of each slot's sample to the sub-centroids of its own class.

        In row chunks of about 4 MiB of gathered sub-centroids (small enough to stay in the cache), by
        multiply and sum: exact fp32 whatever autocast is active, and no M x K x D copy.
        """
        c, k, d = self.num_classes, self.k, self.dim
        p = self.centroids.view(c, k * d)
        cls = groups.clamp(max=c - 1)
        out = torch.empty(cls.numel(), k, device=z.device)
        step = max(64, (1 << 20) // (k * d))
        for i in range(0, cls.numel(), step):
            zc = z[rows[i:i + step].clamp(max=z.shape[0] - 1)] if rows is not None else z[i:i + step]
            gathered = torch.index_select(p, 0, cls[i:i + step]).view(-1, k, d)
            out[i:i + step] = gathered.mul_(zc.float()[:, None]).sum(-1)
        return out

    def update(self, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
               sims: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One training step of the clustering (no gradient).

        Args:
            z: ``(N, D)`` unit embeddings of the step (detached).
            labels: ``(N,)`` class of each; values outside ``[0, C)`` (ignored pixels) take no part.
            correct: ``(N,)`` bool, whether the sample was classified correctly in the forward.
            sims: optional ``(N, C, K)`` similarities already computed in the forward (fp32 or fp64;
                lower-precision ones are not used: the own-class similarities are then recomputed in fp32).

        Returns:
            ``(N,)`` sub-centroid index assigned to each sample of the step, -1 where it took no part;
            ``None`` when the step clustered the memory or did not cluster at all.
        """
        # the clustering is fp32 whatever the caller's autocast
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            return self._update(z, labels, correct, sims)

    def _update(self, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
                sims: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        self.steps += 1
        self.step_count.add_(1)
        if self.memory_size:
            self._check_memory_owner()
            self._push(z, labels, correct)
            if self.steps % self.update_interval:
                return None
            z, labels, correct, sims = self.memory_z, self.memory_y, self.memory_ok, None
        elif self.steps % self.update_interval:
            return None
        c, k, n = self.num_classes, self.k, z.shape[0]
        groups, rows = self._select(labels)
        if sims is None or sims.dtype not in (torch.float32, torch.float64):  # low precision: recomputed in fp32
            own = self._own_similarities(z, groups, rows)
        else:  # each slot's K own-class columns of the forward's similarities
            cols = groups.clamp(max=c - 1)[:, None] * k + torch.arange(k, device=z.device)
            flat = sims.reshape(n, c * k)
            own = (flat.gather(1, cols) if rows is None else  # one flat index: faster than two on the CPU
                   flat.take(rows.clamp(max=n - 1)[:, None] * (c * k) + cols)).float()
        assign = sinkhorn_assign(own, groups, c + 1, self.eps, self.iters)
        take = groups < c
        if self.correct_only:
            take &= correct[rows.clamp(max=n - 1)] if rows is not None else correct.bool()
        # Sufficient statistics: S[c, k] (sum of the assigned embeddings) and M[c, k] (their count); a
        # slot that takes no part adds to one extra row, dropped.
        slot = torch.where(take, groups * k + assign, c * k)
        total = _sum_rows(slot, z, rows, c * k + 1)[: c * k]
        count = torch.zeros(c * k + 1, device=z.device).index_add_(0, slot, torch.ones_like(slot, dtype=torch.float32))[: c * k, None]
        if _world_size() > 1:  # one all-reduce carries both
            both = _all_reduce(torch.cat([total, count], 1))
            total, count = both[:, :-1], both[:, -1:]
        self._momentum_step(total, count, slot)
        if self.memory_size:
            return None
        out = torch.where(groups < c, assign, -1)
        if rows is None:
            return out
        return torch.full((n + 1,), -1, dtype=torch.long, device=z.device).scatter_(0, rows, out)[:n]

    def _momentum_step(self, total: torch.Tensor, count: torch.Tensor, slot: torch.Tensor) -> None:
        """``p <- normalize(lerp(p, normalize(S), 1 - gamma))`` where ``M > 0``, from ``total`` S and
        ``count`` M, both ``(C*K, .)``, and ``slot`` (each slot's sub-centroid row, C*K where it took
        no part). With fewer slots than sub-centroids (a batch of 256 over 1000 x 4) only the rows they
        touch are computed, else all of them, with two temporaries of the sub-centroids' size. The old
        tensor is left as it is: autograd may still need it for this step's backward."""
        p = self.centroids.view(-1, self.dim)
        ck = p.shape[0]
        moving = count > 0
        rows = slot.clamp(max=ck - 1) if slot.numel() < ck else None  # a row's result depends on the row only
        if rows is not None:
            p_r, total, count = p[rows], total[rows], count[rows]
            weight = (slot < ck)[:, None] / count.clamp_min(1)  # each moving row counts once in the mean
        else:
            p_r, weight = p, 1.0
        target = total.div_(total.norm(dim=1, keepdim=True).clamp_min(1e-12))
        moving_r = count > 0
        # Convergence diagnostic (logged by the engine): mean cosine between each updated sub-centroid
        # and the normalised sum of the samples assigned to it; it tends to 1 as they converge.
        cos = torch.einsum("nd,nd->n", p_r, target)[:, None]
        self.alignment = (cos * moving_r * weight).sum() / moving.sum().clamp_min(1)
        moved = torch.lerp(p_r, target, (1 - self.momentum) * moving_r.float())
        norm = moved.norm(dim=1, keepdim=True)
        keep = ~moving_r | (norm < 1e-6)
        moved.div_(norm.clamp_min(1e-12))
        moved = torch.where(keep, p_r, moved, out=moved)
        if rows is not None:  # repeated rows receive identical values
            moved = p.clone().index_copy_(0, rows, moved)
        self.centroids = moved.view_as(self.centroids)

    def _check_memory_owner(self) -> None:
        """Under DDP each process's memory is its own shard. ``DistributedDataParallel`` with its
        default ``broadcast_buffers=True`` copies process 0's buffers over every other's before each
        forward: the first update writes this process's rank into ``memory_owner``, the second reads it
        back on every process (one all-reduce and one host read, once per run) and fails on all of them
        if any was overwritten."""
        if self._owner_check == 2 or _world_size() == 1:
            return
        rank = dist.get_rank()
        if self._owner_check == 0:
            self.memory_owner.fill_(rank)
            self._owner_check = 1
            return
        self._owner_check = 2
        if int(_all_reduce((self.memory_owner != rank).long(), dist.ReduceOp.MAX)):
            raise RuntimeError("the sub-centroid memory of each process was overwritten with process 0's: "
                               "wrap the model as DistributedDataParallel(model, broadcast_buffers=False)")

    def _push(self, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor) -> None:
        n = z.shape[0]
        if n > self.memory_size:
            z, labels, correct, n = z[-self.memory_size:], labels[-self.memory_size:], correct[-self.memory_size:], self.memory_size
        idx = (self.memory_ptr + torch.arange(n, device=z.device)) % self.memory_size
        self.memory_z.index_copy_(0, idx, z.to(self.memory_z.dtype))
        self.memory_y.index_copy_(0, idx, labels.long())
        self.memory_ok.index_copy_(0, idx, correct.bool())
        self.memory_ptr.copy_((self.memory_ptr + n) % self.memory_size)

    def init_from_embeddings(self, z: torch.Tensor, labels: torch.Tensor, iters: int = 10,
                             generator: Optional[torch.Generator] = None) -> None:
        """Data-driven initialisation: k-means++ then spherical k-means on each class's embeddings.

        Classes without samples keep their random sub-centroids. Under ``torch.distributed`` every
        process passes its own embeddings: all of them are gathered, every process clusters the same
        set (in rank order, with the same ``generator``), and process 0's result is broadcast so that
        all processes start bit-identical.
        """
        with torch.no_grad():
            c = self.num_classes
            if _world_size() > 1:
                z, labels = _gather_rows(z.float(), labels.long())
            groups = torch.where((labels >= 0) & (labels < c), labels, c)
            centers, found = kmeans_pp(F.normalize(z.float(), dim=-1), groups, c + 1, self.k, iters, generator)
            found = found[:c, None, None]
            new = torch.where(found, centers[:c].to(self.centroids), self.centroids)
            if _world_size() > 1:
                dist.broadcast(new, 0)
            self.centroids = new


def _gather_rows(*tensors: torch.Tensor) -> list:
    """Every process's rows of each tensor (the same number of rows within a process, any number across
    processes), concatenated in rank order, on every process: the sizes are all-gathered first, then
    the tensors padded to the largest."""
    world = _world_size()
    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    out = []
    for t in tensors:
        padded = t.new_zeros(max(sizes), *t.shape[1:])
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([part[:size] for part, size in zip(parts, sizes)]))
    return out


def _sum_rows(slot: torch.Tensor, z: torch.Tensor, rows: Optional[torch.Tensor], num_slots: int,
              chunk_elems: int = 1 << 22) -> torch.Tensor:
    """``S (num_slots, D)`` fp32, ``S[s]`` the sum of the rows ``z[rows[i]]`` with ``slot[i] = s``
    (``rows`` None: ``z[i]``), without copying the rows of ``z``."""
    n, d = z.shape
    if z.device.type == "cpu" and z.dtype == torch.float32:
        # On the CPU a sparse (num_slots, N) x (N, D) product beats index_add_ (a serial scatter) by
        # about 1.5x; on a GPU index_add_ (atomics) is fast and, unlike the sparse product (which
        # coalesces its indices), never waits for the device.
        cols = torch.arange(n, device=z.device) if rows is None else rows.clamp(max=n - 1)
        onehot = torch.sparse_coo_tensor(torch.stack([slot, cols]), z.new_ones(slot.numel()), (num_slots, n),
                                         check_invariants=False)
        return torch.sparse.mm(onehot, z)
    out = z.new_zeros(num_slots, d, dtype=torch.float32)
    if rows is None and z.dtype == torch.float32:
        return out.index_add_(0, slot, z)
    step = max(1, chunk_elems // max(1, d))  # row chunks of 16 MiB: no N x D copy
    for i in range(0, slot.numel(), step):
        zc = z[rows[i:i + step].clamp(max=n - 1)] if rows is not None else z[i:i + step]
        out.index_add_(0, slot[i:i + step], zc.float())
    return out
