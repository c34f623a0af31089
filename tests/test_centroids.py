"""Invariants of the sub-centroid core (docs/ALGORITHM.md, "Invariants a correct implementation shows")."""
import re

import pytest
import torch
import torch.nn.functional as F

from dnc.centroids import SubCentroids, kmeans_pp, sinkhorn_assign
from dnc.heads import DNCHead


def reference_sinkhorn(scores, eps=0.05, iters=3):
    """SwAV / ProtoSeg ``distributed_sinkhorn`` for one class, written as in the papers."""
    q = torch.exp(scores.double() / eps).t()  # K x N
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return q.t().argmax(1)


def reference_update(centroids, z, labels, correct, momentum, eps=0.05, iters=3):
    """A straightforward per-class loop of one clustering step."""
    p = centroids.clone()
    for c in range(p.shape[0]):
        idx = (labels == c).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        assign = reference_sinkhorn(z[idx] @ p[c].t(), eps, iters)
        for k in range(p.shape[1]):
            sel = idx[(assign == k) & correct[idx]]
            if sel.numel():
                f = F.normalize(z[sel].sum(0), dim=0)
                p[c, k] = F.normalize(momentum * p[c, k] + (1 - momentum) * f, dim=0)
    return p


def test_vectorised_step_equals_per_class_loop():
    torch.manual_seed(0)
    c, k, d, n = 7, 4, 16, 300
    sc = SubCentroids(c, d, k, momentum=0.9)
    z = F.normalize(torch.randn(n, d), dim=1)
    labels = torch.randint(0, c - 1, (n,))  # the last class is absent
    correct = torch.rand(n) > 0.3
    expected = reference_update(sc.centroids, z, labels, correct, 0.9)
    sc.update(z, labels, correct)
    torch.testing.assert_close(sc.centroids, expected.float(), atol=1e-5, rtol=1e-5)


def test_sinkhorn_matches_reference_and_is_balanced():
    torch.manual_seed(1)
    groups = torch.randint(0, 5, (400,))
    scores = torch.rand(400, 4) * 2 - 1
    got = sinkhorn_assign(scores, groups, 5)
    for g in range(5):
        m = groups == g
        assert torch.equal(got[m], reference_sinkhorn(scores[m]))
    # Strongly skewed similarities (every sample prefers sub-centroid 0) still spread over all four.
    skewed = torch.rand(400, 4) * 0.1
    skewed[:, 0] += 0.5
    counts = torch.bincount(sinkhorn_assign(skewed, torch.zeros(400, dtype=torch.long), 1, iters=10), minlength=4)
    assert counts.min() >= 70, counts


def test_planted_subclusters_are_recovered():
    torch.manual_seed(2)
    c, k, d = 3, 4, 32
    means = F.normalize(torch.randn(c, k, d), dim=-1)
    sc = SubCentroids(c, d, k, momentum=0.5)
    for _ in range(60):
        labels = torch.arange(c).repeat_interleave(k * 16)
        sub = torch.arange(k).repeat_interleave(16).repeat(c)
        z = F.normalize(means[labels, sub] + 0.05 * torch.randn(labels.numel(), d), dim=1)
        assign = sc.update(z, labels, torch.ones_like(labels, dtype=torch.bool))
    # Each planted sub-cluster maps onto exactly one sub-centroid, and the sub-centroids sit on the means.
    for cls in range(c):
        a = assign[labels == cls].view(k, 16)
        assert all(len(row.unique()) == 1 for row in a)
        assert len(a[:, 0].unique()) == k
    cos = torch.einsum("ckd,cjd->ckj", sc.centroids, means).amax(-1)
    assert cos.min() > 0.99, cos


def test_unit_norm_no_grad_and_state_dict_roundtrip():
    torch.manual_seed(3)
    head = DNCHead(8, 5, num_subcentroids=3, memory_size=16, update_interval=2).train()
    x = torch.randn(6, 8, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    for _ in range(3):
        logits, _ = head(x, y)
        F.cross_entropy(logits, y).backward()
    p = head.centroids.centroids
    assert not p.requires_grad and p.grad is None
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(5, 3))
    assert set(head.state_dict()) >= {"centroids.centroids", "centroids.memory_z", "centroids.memory_y",
                                      "centroids.memory_ptr", "centroids.step_count"}
    other = DNCHead(8, 5, num_subcentroids=3, memory_size=16, update_interval=2)
    other.load_state_dict(head.state_dict())
    assert other.centroids.steps == 3 and int(other.centroids.step_count) == 3
    assert torch.equal(other.centroids.centroids, p) and torch.equal(other.centroids.memory_z, head.centroids.memory_z)


def test_degenerate_inputs_give_finite_results():
    c, k, d = 4, 4, 8
    cases = {
        "one sample": (F.normalize(torch.randn(1, d), dim=1), torch.tensor([2])),
        "identical embeddings": (F.normalize(torch.ones(10, d), dim=1), torch.full((10,), 1)),
        "no valid sample": (F.normalize(torch.randn(5, d), dim=1), torch.full((5,), -1)),
        "bf16": (F.normalize(torch.randn(50, d), dim=1).bfloat16(), torch.randint(0, c, (50,))),
        "empty batch": (torch.zeros(0, d), torch.zeros(0, dtype=torch.long)),
    }
    for name, (z, y) in cases.items():
        sc = SubCentroids(c, d, k, momentum=0.5)
        sims = sc.similarities(z)
        assign = sc.update(z, y, torch.ones_like(y, dtype=torch.bool), sims)
        assert torch.isfinite(sc.centroids).all(), name
        torch.testing.assert_close(sc.centroids.norm(dim=-1), torch.ones(c, k), msg=name)
        assert ((assign >= -1) & (assign < k)).all(), name


def test_memory_fifo_and_update_interval():
    sc = SubCentroids(3, 4, 2, momentum=0.5, memory_size=5, update_interval=3)
    start = sc.centroids.clone()
    for step in range(1, 4):
        z = F.normalize(torch.randn(2, 4), dim=1)
        sc.update(z, torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool))
        if step < 3:
            assert torch.equal(sc.centroids, start), "sub-centroids move only when an update fires"
    assert not torch.equal(sc.centroids, start)
    assert sc.memory_ptr.item() == 1 and (sc.memory_y >= 0).all()  # 6 pushed into 5 slots
    torch.testing.assert_close(sc.memory_z[0], z[1])


def test_pixel_cap_limits_samples_per_class():
    torch.manual_seed(4)
    sc = SubCentroids(2, 4, 2, max_per_class=10)
    labels = torch.cat([torch.zeros(100), torch.ones(5), torch.full((7,), -1)]).long()
    assign = sc.update(F.normalize(torch.randn(112, 4), dim=1), labels, torch.ones(112, dtype=torch.bool))
    assert (assign[:100] >= 0).sum() == 10 and (assign[100:105] >= 0).all() and (assign[105:] == -1).all()


def test_kmeans_pp_finds_planted_centers():
    torch.manual_seed(5)
    means = F.normalize(torch.randn(3, 2, 16), dim=-1)
    labels = torch.arange(3).repeat_interleave(40)
    sub = torch.arange(2).repeat_interleave(20).repeat(3)
    z = F.normalize(means[labels, sub] + 0.02 * torch.randn(120, 16), dim=1)
    centers, found = kmeans_pp(z, labels, 4, 2, generator=torch.Generator().manual_seed(0))
    assert found.tolist() == [True, True, True, False]
    cos = torch.einsum("ckd,cjd->ckj", centers[:3], means).amax(-1)
    assert cos.min() > 0.99


def test_aux_losses_use_the_assigned_subcentroid():
    torch.manual_seed(6)
    head = DNCHead(8, 3, num_subcentroids=2, contrast_weight=0.01, compact_weight=0.001).train()
    x = torch.randn(20, 8, requires_grad=True)
    y = torch.randint(0, 3, (20,))
    y[:4] = -1
    _, losses = head(x, y)
    assert set(losses) == {"contrast", "compact"}
    sum(losses.values()).backward()
    assert torch.isfinite(x.grad).all() and x.grad[:4].abs().sum() == 0  # ignored samples get no gradient


def test_cap_takes_a_random_subset_and_equals_the_reference_on_it():
    """``max_per_class``: in both layouts (C * cap >= N: the samples themselves; C * cap < N: a fixed
    (C, cap) layout of the chosen ones), each class contributes at most ``cap`` samples, all of its
    samples when it has fewer, and the step equals the per-class reference on the chosen samples."""
    c, k, d, cap = 4, 3, 8, 10
    labels = torch.cat([torch.zeros(100), torch.ones(6), torch.full((30,), 2), torch.full((9,), -1)]).long()
    n = labels.numel()
    for n_classes in (c, 40):  # 40 * 10 >= 145: the samples themselves; 4 * 10 < 145: the (C, cap) layout
        torch.manual_seed(7)
        sc = SubCentroids(n_classes, d, k, momentum=0.8, max_per_class=cap)
        z = F.normalize(torch.randn(n, d), dim=1)
        correct = torch.rand(n) > 0.2
        for with_sims in (False, True):
            before = sc.centroids.clone()
            assign = sc.update(z, labels, correct, sc.similarities(z) if with_sims else None)
            chosen = assign >= 0
            per_class = torch.bincount(labels[chosen], minlength=n_classes)
            assert per_class[:3].tolist() == [cap, 6, cap] and not chosen[labels < 0].any()
            expected = reference_update(before, z[chosen], labels[chosen], correct[chosen], 0.8)
            torch.testing.assert_close(sc.centroids, expected.float(), atol=1e-5, rtol=1e-5)
            ref_assign = torch.cat([reference_sinkhorn(z[chosen & (labels == g)] @ before[g].t()) for g in range(3)])
            order = torch.cat([torch.nonzero(chosen & (labels == g)).squeeze(1) for g in range(3)])
            assert torch.equal(assign[order], ref_assign)


def test_cap_draws_every_sample_equally_often():
    torch.manual_seed(8)
    labels = torch.cat([torch.zeros(50), torch.ones(3)]).long()
    seen = torch.zeros(53)
    for n_classes in (2, 30):  # both layouts
        sc = SubCentroids(n_classes, 4, 2, max_per_class=5)
        for _ in range(200):
            seen += sc.update(F.normalize(torch.randn(53, 4), dim=1), labels, torch.ones(53, dtype=torch.bool)) >= 0
    assert (seen[50:] == 400).all()
    # each of the 50 samples of class 0 is expected 400 * 5 / 50 = 40 times
    assert seen[:50].min() >= 20 and seen[:50].max() <= 65, seen[:50]


def test_update_leaves_the_old_subcentroids_tensor_alone():
    """The step replaces the buffer: a tensor the forward used (and autograd may hold) is not modified."""
    torch.manual_seed(9)
    sc = SubCentroids(3, 8, 2, momentum=0.5)
    old = sc.centroids
    kept = old.clone()
    sc.update(F.normalize(torch.randn(30, 8), dim=1), torch.randint(0, 3, (30,)), torch.ones(30, dtype=torch.bool))
    assert torch.equal(old, kept) and not torch.equal(sc.centroids, kept)


def test_own_similarities_are_fp32_under_autocast():
    torch.manual_seed(10)
    sc = SubCentroids(5, 16, 3)
    z = F.normalize(torch.randn(40, 16), dim=1)
    labels = torch.randint(0, 5, (40,))
    expected = torch.einsum("nd,nkd->nk", z.double(), sc.centroids[labels].double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sc._own_similarities(z, labels, None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_kmeans_pp_in_chunks_equals_one_padded_layout():
    """Skewed classes (1 to 400 samples, one class empty): solving them in many small chunks gives the
    same centers as one layout padded to the largest class, and the same ones as each class alone."""
    torch.manual_seed(11)
    sizes = [400, 1, 2, 0, 5, 37, 120, 3]
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    labels = labels[torch.randperm(labels.numel())]
    z = F.normalize(torch.randn(labels.numel(), 16), dim=1)
    run = lambda budget: kmeans_pp(z, labels, len(sizes), 4, generator=torch.Generator().manual_seed(0), budget=budget)  # noqa: E731
    padded, found = run(1 << 40)
    for budget in (1, 16 * 50):  # every class alone; chunks of a few classes
        chunked, found2 = run(budget)
        assert torch.equal(found, found2) and found.tolist() == [s > 0 for s in sizes]
        torch.testing.assert_close(chunked, padded, atol=1e-6, rtol=0)
    assert (padded[3] == 0).all()
    torch.testing.assert_close(padded[found].norm(dim=-1), torch.ones(int(found.sum()), 4))


def test_step_with_fewer_samples_than_subcentroids_equals_the_reference():
    """Fewer samples than C*K sub-centroids (e.g. a batch of 256 over 1000 classes x 4): the momentum
    step works on the rows the samples touch; it equals the reference, and the untouched rows stay."""
    torch.manual_seed(12)
    c, k, d, n = 50, 4, 16, 60
    sc = SubCentroids(c, d, k, momentum=0.7)
    z = F.normalize(torch.randn(n, d), dim=1)
    labels = torch.randint(0, 20, (n,))
    correct = torch.rand(n) > 0.3
    before = sc.centroids.clone()
    expected = reference_update(before, z, labels, correct, 0.7)
    assign = sc.update(z, labels, correct, sc.similarities(z))
    torch.testing.assert_close(sc.centroids, expected.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(sc.centroids[20:], before[20:])
    # The diagnostic: the mean, over the sub-centroids that moved (each once), of the cosine between
    # the old sub-centroid and the normalised sum of its samples.
    slot = (labels * k + assign)[correct]
    sums = F.normalize(torch.zeros(c * k, d).index_add_(0, slot, z[correct]), dim=1)
    moved = slot.unique()
    torch.testing.assert_close(sc.alignment, (before.view(-1, d)[moved] * sums[moved]).sum(1).mean())


@pytest.mark.parametrize("reuse_sims", [False, True])  # recomputed, or the forward's similarities read per slot
def test_a_capped_step_equals_an_uncapped_step_on_the_samples_it_drew(reuse_sims):
    """With ``max_per_class`` the step draws at most the cap from each class (the last two samples, of small
    classes, always among them); the result is the plain step on exactly the drawn samples."""
    torch.manual_seed(11)
    labels = torch.cat([torch.zeros(40), torch.ones(6), torch.full((5,), 2.0), torch.tensor([1.0])]).long()
    z = F.normalize(torch.randn(52, 8), dim=1)
    correct = torch.ones(52, dtype=torch.bool)
    correct[-2] = False                             # drawn (its class is under the cap) but not moving the step
    for n_classes in (3, 30):  # both layouts of the capped step
        capped = SubCentroids(n_classes, 8, 2, momentum=0.5, max_per_class=8)
        z[-1] = capped.centroids[1, 0]              # the last sample: on a sub-centroid of its class, and
        z[-2] = -z[-1]                              # the one before it opposite, of another class
        plain = SubCentroids(n_classes, 8, 2, momentum=0.5)
        plain.load_state_dict(capped.state_dict())
        assign = capped.update(z, labels, correct, capped.similarities(z) if reuse_sims else None)
        drawn = assign >= 0                          # every drawn sample is assigned, correct or not
        assert int((drawn & (labels == 0)).sum()) == 8 and bool(drawn[-1]) and int(drawn.sum()) == 8 + 7 + 5
        want = plain.update(z[drawn], labels[drawn], correct[drawn])
        assert torch.equal(assign[drawn], want)
        torch.testing.assert_close(capped.centroids, plain.centroids)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_classes": 0}, "num_classes, dim, num_subcentroids and update_interval must be >= 1"),
    ({"dim": 0}, "num_classes, dim, num_subcentroids and update_interval must be >= 1"),
    ({"num_subcentroids": 0}, "num_classes, dim, num_subcentroids and update_interval must be >= 1"),
    ({"update_interval": 0}, "num_classes, dim, num_subcentroids and update_interval must be >= 1"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
    ({"momentum": -0.1}, "momentum must be in [0, 1), got -0.1"),
    ({"memory_size": -1}, "memory_size and max_per_class must be >= 0"),
    ({"max_per_class": -1}, "memory_size and max_per_class must be >= 0"),
])
def test_subcentroids_refuse_bad_settings_by_name(kwargs, message):
    args = {"num_classes": 3, "dim": 4, **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SubCentroids(args.pop("num_classes"), args.pop("dim"), **args)


@pytest.mark.parametrize("n_classes,n,correct_only", [(3, 30, False), (40, 30, False), (3, 1, False), (40, 30, True)])
def test_alignment_is_the_mean_cosine_of_each_moving_subcentroid_to_its_assigned_mean(n_classes, n, correct_only):
    """The logged ``centroid_cos``: over the sub-centroids that move, the mean cosine between each one
    before the step and the normalised sum of the samples assigned to it. Cases: every row; only the
    rows touched; one row; only the rows touched, with samples that take no part (misclassified) and
    the last sub-centroid moving."""
    torch.manual_seed(12)
    sc = SubCentroids(n_classes, 8, 2, momentum=0.5, correct_only=correct_only)
    z = F.normalize(torch.randn(n, 8), dim=1)
    y = torch.tensor([0, 1, 2, n_classes - 1])[torch.randint(0, 4, (n,))]
    ok = torch.rand(n) > 0.3 if correct_only else torch.ones(n, dtype=torch.bool)
    old = sc.centroids.clone()
    a = sc.update(z, y, ok)
    moved = [((y == c) & (a == k) & ok, c, k) for c in y.unique().tolist() for k in range(2)]
    cos = [F.normalize(z[m].sum(0), dim=0) @ old[c, k] for m, c, k in moved if m.any()]
    if correct_only:
        assert moved[-1][0].any() and not ok.all()  # the case this parameter is for
    torch.testing.assert_close(sc.alignment, torch.stack(cos).mean())


def test_own_similarities_of_a_capped_layout_read_each_slots_sample():
    """Slots that name their sample (``rows``; padding slots name row N and group C): each gets the cosines
    of its own sample, the last one included, to the sub-centroids of its own class."""
    torch.manual_seed(13)
    sc = SubCentroids(3, 8, 2)
    z = F.normalize(torch.randn(10, 8), dim=1)
    rows, groups = torch.tensor([9, 0, 5, 10, 2]), torch.tensor([1, 0, 2, 3, 1])
    out = sc._own_similarities(z, groups, rows)
    for i in (0, 1, 2, 4):
        torch.testing.assert_close(out[i], sc.centroids[groups[i]] @ z[rows[i]])
