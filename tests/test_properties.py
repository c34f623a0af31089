"""Property tests of the balanced assignment (``sinkhorn_assign``) and the sub-centroid update.

Shapes, dtypes, eps and the kind of input are drawn by hypothesis; the numbers themselves come from
a seeded torch generator (the seed is drawn too, so a failure is reproducible).

What balance can be asked of Sinkhorn's *hard* assignment: not "within +-1 for any input", which is
false even for an exact float64 Sinkhorn run to convergence (random scores whose gaps are below eps
split samples across sub-centroids, and identical samples all go to the same one). It is exact for
well-posed problems: K equal groups of samples, each preferring its own sub-centroid by a margin, seen
through arbitrary per-sub-centroid offsets (a sub-centroid far from all samples, or one that every
sample prefers). Sinkhorn removes the offsets, so every sub-centroid gets exactly its own group, for
any eps in [1e-3, 1] and any number of iterations, where a plain argmax would give all samples to the
sub-centroid with the largest offset.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dnc.centroids import SubCentroids, sinkhorn_assign
from dnc_tiny import one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
EPS = st.floats(-3.0, 0.0).map(lambda e: 10.0 ** e)  # 1e-3 .. 1, log-uniform
SEED = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=50, deadline=None)


@SETTINGS
@given(n=st.integers(0, 300), c=st.integers(1, 8), k=st.integers(1, 6), dtype=DTYPES, eps=EPS,
       iters=st.integers(0, 10), kind=st.sampled_from(["random", "zero", "identical", "huge", "tiny", "mixed"]),
       seed=SEED)
def test_sinkhorn_assigns_every_sample_a_valid_subcentroid(n, c, k, dtype, eps, iters, kind, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1
    big = torch.finfo(dtype).max / 4  # the largest finite scores the dtype holds, with room
    if kind == "zero":
        scores.zero_()
    elif kind == "identical":
        scores[:] = scores[:1] if n else scores
    elif kind == "huge":
        scores *= min(1e30, big)
    elif kind == "tiny":
        scores *= 1e-30
    elif kind == "mixed":  # huge, tiny and ordinary scores side by side
        scores *= torch.tensor([min(1e30, big), 1e-30, 1.0], dtype=torch.float64)[torch.randint(0, 3, (n, k), generator=g)]
    scores = scores.to(dtype)
    assert torch.isfinite(scores).all()
    groups = torch.randint(0, c, (n,), generator=g)
    a = sinkhorn_assign(scores, groups, c, eps, iters)
    assert a.shape == (n,) and a.dtype == torch.int64
    assert ((a >= 0) & (a < k)).all()
    if kind in ("zero", "identical") and n:
        # identical samples are indistinguishable: whatever Sinkhorn does, they share one sub-centroid
        for grp in groups.unique():
            assert a[groups == grp].unique().numel() == 1


@SETTINGS
@given(c=st.integers(1, 8), k=st.integers(1, 6), m=st.integers(1, 12), dtype=DTYPES, eps=EPS,
       iters=st.integers(1, 50), seed=SEED)
def test_sinkhorn_balances_well_posed_problems_exactly(c, k, m, dtype, eps, iters, seed):
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(c, generator=g) < 0.8  # some classes absent from the step
    groups = torch.arange(c).repeat_interleave(present.long() * k * m)
    own = torch.arange(k).repeat_interleave(m).repeat(int(present.sum()))  # the sub-centroid each sample prefers
    margin = 0.2 + 0.8 * torch.rand(c, 1, generator=g)
    offset = torch.rand(c, k, generator=g) * 2 - 1  # per class and sub-centroid, anywhere in the cosine range
    noise = (torch.rand(len(groups), k, generator=g) * 2 - 1) * margin[groups] / 5
    scores = offset[groups] + margin[groups] * F.one_hot(own, k) + noise
    perm = torch.randperm(len(groups), generator=g)
    a = sinkhorn_assign(scores[perm].to(dtype), groups[perm], c, eps, iters)
    assert torch.equal(a, own[perm])
    counts = torch.zeros(c, k, dtype=torch.long).index_put_((groups[perm], a), torch.ones_like(a), accumulate=True)
    assert (counts[present] == m).all()  # balanced: m samples for each of the K sub-centroids of a class


def test_sinkhorn_revives_a_subcentroid_no_sample_prefers():
    """The well-posed case where plain argmax fails: every sample scores sub-centroid 0 highest."""
    k, m = 4, 25
    own = torch.arange(k).repeat_interleave(m)
    scores = torch.tensor([0.9, -0.5, -0.6, -0.7]) + 0.1 * F.one_hot(own, k) + 0.01 * torch.rand(k * m, k)
    assert (scores.argmax(1) == 0).all()
    for eps in (1e-3, 0.01, 0.05, 1.0):
        a = sinkhorn_assign(scores, torch.zeros(k * m, dtype=torch.long), 1, eps, 3)
        assert torch.equal(a, own), eps


@SETTINGS
@given(n=st.integers(0, 300), c=st.integers(1, 8), k=st.integers(1, 6), d=st.integers(1, 16), dtype=DTYPES,
       kind=st.sampled_from(["random", "identical", "zero", "one class"]), memory=st.sampled_from([0, 0, 1, 7, 64]),
       interval=st.integers(1, 3), steps=st.integers(1, 3), momentum=st.floats(0.0, 0.999),
       eps=EPS, cap=st.sampled_from([0, 0, 1, 5]), correct_only=st.booleans(), with_sims=st.booleans(), seed=SEED)
def test_update_keeps_unit_finite_subcentroids(n, c, k, d, dtype, kind, memory, interval, steps, momentum, eps, cap,
                                               correct_only, with_sims, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the random init and the per-class cap draw from the global generator
    sc = SubCentroids(c, d, k, momentum=momentum, sinkhorn_eps=eps, correct_only=correct_only, memory_size=memory,
                      update_interval=interval, max_per_class=cap)
    for _ in range(steps):
        before = sc.centroids.clone()
        z = F.normalize(torch.randn(n, d, generator=g), dim=1)
        if kind == "identical":
            z = z[:1].expand(n, d) if n else z
        elif kind == "zero":
            z = torch.zeros(n, d)
        z = z.to(dtype)
        labels = torch.randint(-1, c, (n,), generator=g)  # -1: ignored (e.g. a void pixel)
        if kind == "one class":
            labels.fill_(c - 1)
        correct = torch.rand(n, generator=g) < 0.7
        assign = sc.update(z, labels, correct, sc.similarities(z) if with_sims else None)

        p = sc.centroids
        assert p.shape == (c, k, d) and p.dtype == torch.float32 and not p.requires_grad
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(c, k), rtol=0, atol=1e-5)
        valid = (labels >= 0) & (labels < c)
        if assign is not None:
            assert assign.shape == (n,) and ((assign >= -1) & (assign < k)).all()
            assert (assign[~valid] == -1).all()
            if not cap:
                assert (assign[valid] >= 0).all()
        if sc.steps % interval:
            assert torch.equal(p, before)  # between clustering steps nothing moves
        elif not memory and not cap:
            # only classes with a sample (correctly classified, with correct_only) in the step move
            took_part = valid & correct if correct_only else valid
            moved = torch.zeros(c, dtype=torch.bool)
            moved[labels[took_part]] = True
            assert torch.equal(p[~moved], before[~moved])
