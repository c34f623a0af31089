"""The precision rule (docs/ALGORITHM.md, "Precision"): the similarities that feed the clustering and
every open-set score are fp32 whatever autocast is active, so a training step of the head under bf16 or
fp16 autocast moves the sub-centroids exactly as an fp32 step given the same features."""
import pytest
import torch
import torch.nn.functional as F

from dnc.heads import DNCHead, PixelHead
from dnc.ood import image_scores, pixel_scores

AUTOCAST = [torch.bfloat16, torch.float16]


def _cpu_autocast_supports(dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


def _features(n=2048, d=64, c=4, seed=0):
    """Features near pairs of sub-centroids of their class (of the head that :func:`_steps` builds), so
    that many samples sit near a tie of the assignment and a rounding of the similarities to 8 (bf16)
    or 11 (fp16) bits flips some Sinkhorn assignments (29 and 1 of 2048 here, without the rule)."""
    torch.manual_seed(0)
    p = DNCHead(d, c, num_subcentroids=4).centroids.centroids
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    k = torch.randint(0, 4, (n, 2), generator=g)
    return p[y, k[:, 0]] + p[y, k[:, 1]] + 0.3 * torch.randn(n, d, generator=g) / d ** 0.5, y


def _steps(dtype, x, y, steps=3, **kw):
    torch.manual_seed(0)
    head = DNCHead(x.shape[1], 4, num_subcentroids=4, momentum=0.5, **kw).train()
    out = []
    for _ in range(steps):
        if dtype is None:
            logits, losses = head(x, y)
        else:
            with torch.autocast("cpu", dtype=dtype):
                logits, losses = head(x, y)
        out.append((logits.detach(), {k: v.detach() for k, v in losses.items()}, head.centroids.centroids.clone(),
                    head.centroids.alignment.clone()))
    return out


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["bf16", "fp16"])
def test_a_head_step_under_autocast_equals_the_fp32_step(dtype):
    if not _cpu_autocast_supports(dtype):
        pytest.skip(f"CPU autocast does not support {dtype} in torch {torch.__version__}")
    x, y = _features()
    ref = _steps(None, x, y)
    got = _steps(dtype, x, y)
    for s, ((l0, _, p0, a0), (l1, _, p1, a1)) in enumerate(zip(ref, got)):
        assert l1.dtype == torch.float32
        torch.testing.assert_close(l1, l0, rtol=0, atol=0, msg=f"step {s}: logits")
        torch.testing.assert_close(p1, p0, rtol=0, atol=0, msg=f"step {s}: sub-centroids")
        torch.testing.assert_close(a1, a0, rtol=0, atol=1e-7, msg=f"step {s}: alignment")
    torch.manual_seed(0)
    start = DNCHead(x.shape[1], 4, num_subcentroids=4).centroids.centroids
    assert (ref[-1][2] - start).abs().max() > 0.1  # the steps did move the sub-centroids


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["bf16", "fp16"])
def test_the_auxiliary_losses_and_pixel_step_under_autocast_equal_fp32(dtype):
    if not _cpu_autocast_supports(dtype):
        pytest.skip(f"CPU autocast does not support {dtype} in torch {torch.__version__}")
    x, y = _features(n=1024, d=32, seed=1)
    ref = _steps(None, x, y, steps=2, contrast_weight=0.01, compact_weight=0.001)
    got = _steps(dtype, x, y, steps=2, contrast_weight=0.01, compact_weight=0.001)
    for (l0, losses0, p0, _), (l1, losses1, p1, _) in zip(ref, got):
        assert torch.equal(l0, l1) and torch.equal(p0, p1)
        assert losses0.keys() == losses1.keys() == {"contrast", "compact"}
        for k in losses0:
            torch.testing.assert_close(losses1[k], losses0[k], rtol=1e-6, atol=0)
    # per pixel: a (B, D, H, W) map with ignored pixels
    torch.manual_seed(2)
    feats, target = torch.randn(2, 32, 16, 16), torch.randint(0, 4, (2, 16, 16))
    target[:, :3] = 255
    heads = [PixelHead(DNCHead(32, 4, num_subcentroids=4, momentum=0.5)).train() for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    logits0, _ = heads[0](feats, target)
    with torch.autocast("cpu", dtype=dtype):
        logits1, _ = heads[1](feats, target)
    assert torch.equal(logits0, logits1)
    assert torch.equal(heads[0].head.centroids.centroids, heads[1].head.centroids.centroids)


def test_similarities_are_fp32_under_autocast_and_low_precision_sims_are_not_clustered():
    """Passing bf16 similarities to ``update`` (a caller of its own) gives the fp32 result: they are
    recomputed, not rounded-then-used."""
    torch.manual_seed(3)
    x, y = _features(n=1024, d=64, seed=3)
    head = DNCHead(64, 4, num_subcentroids=4, momentum=0.5)
    z = head.embed(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims = head.centroids.similarities(z)
    assert sims.dtype == torch.float32
    torch.testing.assert_close(sims, torch.einsum("nd,ckd->nck", z, head.centroids.centroids), rtol=0, atol=1e-6)
    a, b = (DNCHead(64, 4, num_subcentroids=4, momentum=0.5) for _ in range(2))
    b.load_state_dict(a.state_dict())
    ok = torch.ones(len(y), dtype=torch.bool)
    assign_fp32 = a.centroids.update(z, y, ok, a.centroids.similarities(z))
    assign_bf16 = b.centroids.update(z, y, ok, b.centroids.similarities(z).bfloat16())
    assert torch.equal(assign_fp32, assign_bf16)
    assert torch.equal(a.centroids.centroids, b.centroids.centroids)
    # ...whereas the rounded similarities themselves would give other assignments (what the test guards)
    from dnc.centroids import sinkhorn_assign
    own = a.centroids.similarities(z)  # any fixed sub-centroids will do
    own = own[torch.arange(len(y)), y]
    assert not torch.equal(sinkhorn_assign(own, y, 4), sinkhorn_assign(own.bfloat16().float(), y, 4))


def test_open_set_scores_do_not_depend_on_autocast_given_the_features():
    """``image_scores`` / ``pixel_scores``: the cosine score of the same features is the same in
    fp32 and under bf16 autocast (the backbone is the identity here: only the head's precision counts)."""
    torch.manual_seed(4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = DNCHead(64, 4, num_subcentroids=4)

        def features(self, x):
            return x

    net = Net().eval()
    x = torch.randn(256, 64)
    _, fp32 = image_scores(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = image_scores(net, x)
    assert torch.equal(fp32["cosine"], bf16["cosine"])

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = PixelHead(DNCHead(16, 3, num_subcentroids=2))
            self.encoder = self.decoder = torch.nn.Identity()

    seg = Seg().eval()
    img = torch.randn(1, 16, 12, 12)
    ref = pixel_scores(seg, img, (12, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pixel_scores(seg, img, (12, 12))
    assert torch.equal(ref, got)
    torch.testing.assert_close(ref, F.normalize(seg.head.head.feat_norm(img.permute(0, 2, 3, 1)), dim=-1)
                               .matmul(seg.head.head.centroids.centroids.flatten(0, 1).t()).amax(-1), rtol=0, atol=1e-6)
