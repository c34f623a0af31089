"""The data-driven start (``model.dnc.init=kmeans++``; docs/ALGORITHM.md, "Initialisation"): k-means++
seeding by D^2 sampling, spherical k-means (Lloyd) steps, each class's sub-centroids from that class's
embeddings, and the embedding pass of ``tasks.init_centroids_from_data`` (eval mode, BatchNorm
statistics untouched)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dnc.centroids import SubCentroids, kmeans_pp


def _on_circle(angles) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float32)
    return torch.stack([a.cos(), a.sin()], 1)


def _seeding_law(x: torch.Tensor, k: int) -> dict:
    """Exact probability of every ordered k-tuple of seeds under k-means++ on unit vectors ``x``: the
    first uniform, each next one with probability proportional to ``D^2``, the squared distance to the
    nearest seed so far (``|a - b|^2 = 2 (1 - <a, b>)``)."""
    d2 = (2 * (1 - x.double() @ x.double().t())).clamp_min(0)
    law = {}
    for seq in itertools.permutations(range(len(x)), k):
        p = 1 / len(x)
        for step in range(1, k):
            w = d2[list(seq[:step])].amin(0)
            p *= float(w[seq[step]] / w.sum())
        law[seq] = p
    return law


def _observed_seeds(x: torch.Tensor, k: int, copies: int, seed: int = 0) -> dict:
    """Frequencies of the ordered seed tuples of ``copies`` independent groups, each holding the points
    ``x`` (one ``kmeans_pp`` call, no Lloyd step)."""
    n = len(x)
    pts = x.repeat(copies, 1)
    groups = torch.arange(copies).repeat_interleave(n)
    centers, found = kmeans_pp(pts, groups, copies, k, iters=0, generator=torch.Generator().manual_seed(seed))
    assert found.all()
    which = torch.einsum("gkd,nd->gkn", centers, x).argmax(-1)  # (copies, k): the index of each seed
    torch.testing.assert_close(centers, x[which])  # seeds are data points
    counts = {}
    for row in which.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return {key: v / copies for key, v in counts.items()}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_seeding_draws_each_next_seed_with_probability_proportional_to_d_squared(k):
    """Five points at uneven angles: uniform, D or D^4 weights, or D^2 to the first seed only (stale
    distances) all give a law far from the exact one (total variation > 0.1, here < 0.02)."""
    x = _on_circle([0.0, 0.3, 1.5, 2.0, 3.0])
    law = _seeding_law(x, k)
    seen = _observed_seeds(x, k, copies=40000)
    assert set(seen) <= {s for s, p in law.items() if p > 0}, "a seed was drawn twice or with zero weight"
    tv = 0.5 * sum(abs(seen.get(s, 0.0) - p) for s, p in law.items())
    assert tv < 0.02, (tv, sorted(law.items(), key=lambda t: -t[1])[:5], sorted(seen.items(), key=lambda t: -t[1])[:5])


def test_seeding_law_differs_from_the_plausible_wrong_ones():
    """The check above can fail: the exact laws of the wrong weightings are far from the D^2 law."""
    x = _on_circle([0.0, 0.3, 1.5, 2.0, 3.0])
    d2 = (2 * (1 - x.double() @ x.double().t())).clamp_min(0)
    right = _seeding_law(x, 3)
    for name, weight in {"uniform": lambda w: (w > 0).double(), "D": torch.sqrt, "D^4": lambda w: w ** 2}.items():
        wrong = {}
        for seq in itertools.permutations(range(len(x)), 3):
            p = 1 / len(x)
            for step in (1, 2):
                w = weight(d2[list(seq[:step])].amin(0))
                p *= float(w[seq[step]] / w.sum())
            wrong[seq] = p
        assert 0.5 * sum(abs(wrong[s] - right[s]) for s in right) > 0.1, name


def _objective(x, groups, centers):
    """Spherical k-means objective of every group: the sum over its points of ``1 - max_k <x, c_k>``."""
    best = torch.einsum("nd,nkd->nk", x.double(), centers[groups].double()).amax(1)
    return torch.zeros(centers.shape[0], dtype=torch.float64).index_add_(0, groups, 1 - best)


def _skewed(seed=0, sizes=(300, 7, 50, 1, 2, 0, 120), d=8):
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    groups = groups[torch.randperm(len(groups), generator=g)]
    x = F.normalize(torch.randn(len(groups), d, generator=g) + 0.5 * torch.randn(len(sizes), d, generator=g)[groups], dim=1)
    return x, groups, len(sizes)


def test_lloyd_steps_never_raise_the_objective_and_end_at_a_fixed_point():
    """k-means++ then t Lloyd steps, t = 0..12, from the same seeds (same generator): the objective of
    every group never rises and falls overall; after 100 steps each sub-centroid is the normalised sum
    of the points nearest to it (a fixed point of the assignment and update), in every group whatever
    its size (skewed sizes, fewer points than K, an empty group), and the empty group's centers are zero."""
    x, groups, g = _skewed()
    k = 4
    run = lambda t: kmeans_pp(x, groups, g, k, iters=t, generator=torch.Generator().manual_seed(1))  # noqa: E731
    objective = torch.stack([_objective(x, groups, run(t)[0]) for t in range(13)])  # (steps, groups)
    rises = objective[1:] - objective[:-1]
    assert (rises <= 1e-9).all(), rises.max()
    assert (objective[-1, [0, 2, 6]] < objective[0, [0, 2, 6]] - 1e-3).all()  # the steps do work

    centers, found = kmeans_pp(x, groups, g, k, iters=100, generator=torch.Generator().manual_seed(1))
    assert found.tolist() == [True, True, True, True, True, False, True]
    assert (centers[5] == 0).all()
    torch.testing.assert_close(centers[found].norm(dim=-1), torch.ones(int(found.sum()), k))
    for grp in torch.nonzero(found).squeeze(1).tolist():
        pts = x[groups == grp]
        assign = (pts @ centers[grp].t()).argmax(1)
        for j in assign.unique().tolist():
            torch.testing.assert_close(centers[grp, j], F.normalize(pts[assign == j].sum(0), dim=0), atol=1e-6, rtol=0,
                                       msg=f"group {grp}, sub-centroid {j}")


def test_one_lloyd_step_equals_the_textbook_step_from_the_seeds():
    """One step from the seeds: assign each point to the most similar seed, then each center becomes the
    normalised sum of its points (a center without points stays where it was)."""
    x, groups, g = _skewed(seed=2)
    k = 4
    seeds, _ = kmeans_pp(x, groups, g, k, iters=0, generator=torch.Generator().manual_seed(3))
    one, _ = kmeans_pp(x, groups, g, k, iters=1, generator=torch.Generator().manual_seed(3))
    expected = seeds.clone()
    for grp in range(g):
        pts = x[groups == grp]
        if not len(pts):
            continue
        assign = (pts @ seeds[grp].t()).argmax(1)
        for j in range(k):
            if (assign == j).any():
                expected[grp, j] = F.normalize(pts[assign == j].sum(0), dim=0)
    torch.testing.assert_close(one, expected, atol=1e-6, rtol=0)


def test_skewed_clusters_are_all_found():
    """Three tight clusters of 200, 20 and 5 points, in each of 40 groups: D^2 seeding puts a seed in
    every cluster (uniform seeding misses the 5-point cluster in most groups), and the centers end on
    the clusters' normalised sums."""
    g = torch.Generator().manual_seed(4)
    copies, d, sizes = 40, 16, (200, 20, 5)
    means = F.normalize(torch.randn(copies, 3, d, generator=g), dim=-1)
    which = torch.arange(3).repeat_interleave(torch.tensor(sizes))
    x = F.normalize(means[:, which] + 0.001 * torch.randn(copies, len(which), d, generator=g), dim=-1)
    groups = torch.arange(copies).repeat_interleave(len(which))
    centers, _ = kmeans_pp(x.flatten(0, 1), groups, copies, 3, iters=5, generator=torch.Generator().manual_seed(5))
    cos = torch.einsum("gkd,gjd->gkj", centers, means)  # (group, center, planted)
    assert (cos.amax(1) > 0.999).all(), "a planted cluster got no center"
    sums = F.normalize(torch.einsum("gnd,nj->gjd", x, F.one_hot(which, 3).float()), dim=-1)
    torch.testing.assert_close(torch.sort(torch.einsum("gkd,gjd->gkj", centers, sums).amax(-1), dim=1).values,
                               torch.ones(copies, 3), atol=1e-6, rtol=0)


def _planted(c=5, k=3, d=16, per=30, absent=(4,), seed=6):
    """Embeddings of classes with ``k`` tight sub-clusters each around ``means (c, k, d)``; the classes
    in ``absent`` have no sample; plus samples labelled -1 and ``c + 2`` (ignored) elsewhere."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(c, k, d, generator=g), dim=-1)
    labels, sub = [], []
    for cls in range(c):
        if cls in absent:
            continue
        n = per * (cls + 1)  # unequal class sizes
        labels.append(torch.full((n,), cls))
        sub.append(torch.arange(n) % k)
    labels, sub = torch.cat(labels), torch.cat(sub)
    z = means[labels, sub] + 0.02 * torch.randn(len(labels), d, generator=g)
    junk = torch.randn(20, d, generator=g)
    z = torch.cat([z, junk])
    labels = torch.cat([labels, torch.tensor([-1] * 10 + [c + 2] * 10)])
    perm = torch.randperm(len(labels), generator=g)
    return 3 * z[perm], labels[perm], means  # not unit: the init normalises


def test_init_places_each_class_from_its_own_embeddings_only():
    """Seeds only (``iters=0``): every sub-centroid of class c is one of class c's embeddings; with Lloyd
    steps it is on one of class c's planted sub-clusters; a class without samples keeps its start
    exactly; ignored labels (-1, >= C) take no part; the result is that of ``kmeans_pp`` itself."""
    c, k = 5, 3
    z, labels, means = _planted(c, k)
    unit = F.normalize(z, dim=1)
    torch.manual_seed(0)
    seeds_only = SubCentroids(c, 16, k)
    start = seeds_only.centroids.clone()
    seeds_only.init_from_embeddings(z, labels, iters=0, generator=torch.Generator().manual_seed(7))
    p = seeds_only.centroids
    for cls in range(c - 1):
        own = unit[labels == cls]
        assert ((p[cls] @ own.t()).amax(1) > 1 - 1e-6).all(), f"class {cls}: a sub-centroid is not one of its embeddings"
        assert len({tuple(v) for v in p[cls].tolist()}) == k, f"class {cls}: a seed drawn twice"
    assert torch.equal(p[c - 1], start[c - 1])

    torch.manual_seed(0)
    sc = SubCentroids(c, 16, k)
    sc.init_from_embeddings(z, labels, generator=torch.Generator().manual_seed(7))
    cos = torch.einsum("ckd,cjd->ckj", sc.centroids, means)  # to the own class's planted means
    assert (cos[: c - 1].amax(-1) > 0.99).all() and (cos[: c - 1].amax(1) > 0.99).all()  # one per sub-cluster
    other = torch.einsum("ckd,xjd->ckxj", sc.centroids, means)
    mask = torch.eye(c, dtype=torch.bool)[:, None, :, None].expand_as(other)
    assert other[: c - 1].masked_fill(mask[: c - 1], -1).amax() < 0.9, "a sub-centroid sits on another class"
    assert torch.equal(sc.centroids[c - 1], start[c - 1])
    groups = torch.where((labels >= 0) & (labels < c), labels, c)
    expected, _ = kmeans_pp(unit, groups, c + 1, k, 10, torch.Generator().manual_seed(7))
    torch.testing.assert_close(sc.centroids[: c - 1], expected[: c - 1], atol=0, rtol=0)
    torch.testing.assert_close(sc.centroids.norm(dim=-1), torch.ones(c, k))


def test_init_changes_nothing_but_the_centroids():
    z, labels, _ = _planted(4, 2, absent=())
    sc = SubCentroids(4, 16, 2, memory_size=8)
    before = {k: v.clone() for k, v in sc.state_dict().items()}
    sc.init_from_embeddings(z, labels)
    after = sc.state_dict()
    assert not torch.equal(after["centroids"], before["centroids"])
    assert all(torch.equal(after[k], before[k]) for k in before if k != "centroids")


# ------------------------------------------------------------------------ the embedding pass of the init
@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_init_from_data_embeds_in_eval_mode_and_leaves_batchnorm_statistics_alone(one_thread):
    """``tasks.init_centroids_from_data`` on the digits demo with its ``tiny_cnn`` (BatchNorm after every
    convolution): every forward of the pass sees the BatchNorm layers in eval mode, their running
    statistics and every weight are unchanged, the model's mode is restored, and the sub-centroids
    moved (a start from data, not a no-op)."""
    from dnc.config import load_config
    from dnc.engine import DistInfo
    from dnc.tasks import build_cls_split, build_datasets, build_model, cls_transform, init_centroids_from_data

    cfg = load_config("demo/digits_dnc.yaml", ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16",
                                               "data.batch_size=32", "model.dnc.init_samples=200", "data.num_workers=0"))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) >= 3
    with torch.no_grad():  # statistics far from a fresh layer's, so that a training-mode pass changes them
        for bn in bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    hooks = [bn.register_forward_hook(lambda m, i, o: modes.append(m.training)) for bn in bns]
    train = build_datasets(cfg, ("train",))[0]["train"]
    init_centroids_from_data(cfg, model, train, DistInfo(0, 1, torch.device("cpu")))
    for h in hooks:
        h.remove()
    assert modes and not any(modes), "the init embedded with BatchNorm in training mode"
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["head.centroids.centroids"], changed
    # the start is the k-means of each class's embeddings: images are nearest to their own class
    p = after["head.centroids.centroids"]
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(p.shape[:2]))
    model.eval()
    plain = build_cls_split(cfg, "train", cls_transform(cfg, False))  # the same images, not augmented
    images = torch.stack([plain[i][0] for i in range(0, len(plain), 3)])
    labels = torch.tensor([plain[i][1] for i in range(0, len(plain), 3)])
    with torch.no_grad():
        z, _ = model.embeddings(images)
    nearest_class = torch.einsum("nd,ckd->nck", z, p).amax(-1).argmax(1)
    hit = [float((nearest_class == (labels + shift) % 10).float().mean()) for shift in range(10)]
    # an untrained network: 24% of the digits are nearest to their own class (chance 10%), at most 11%
    # to the class after theirs, or any other shift (labels placed one class off)
    assert hit[0] > 0.18 and hit[0] > 1.8 * max(hit[1:]), hit
    assert math.isfinite(float(p.sum()))
