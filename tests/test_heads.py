"""The DNC head's interface: options, the no-label warning, the auxiliary losses, the state dict as
plain tensors (safetensors, old checkpoints), and the DDP buffer hazard of the sub-centroid memory."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dnc.config import DNCConfig
from dnc.heads import DNCHead, PixelHead, build_head
from dnc_tiny import run_torchrun


def trained_head(**kw) -> DNCHead:
    torch.manual_seed(0)
    head = DNCHead(8, 5, num_subcentroids=3, **kw).train()
    for _ in range(5):
        x, y = torch.randn(12, 8), torch.randint(0, 5, (12,))
        head(x, y)
    return head


def test_build_head_takes_every_dnc_option_of_the_config():
    kwargs = {k: v for k, v in dataclasses.asdict(DNCConfig()).items() if k not in ("init", "init_samples")}
    kwargs.update(momentum=0.9, memory_size=32, update_interval=4, max_per_class=7, sinkhorn_iters=5)
    head = build_head("dnc", 8, 5, **kwargs)
    sc = head.centroids
    assert (sc.momentum, sc.memory_size, sc.update_interval, sc.max_per_class, sc.iters) == (0.9, 32, 4, 7, 5)
    with pytest.raises(TypeError):
        DNCHead(8, 5, momentun=0.9)  # a misspelt option is an error, not silently ignored


def test_training_call_without_labels_warns_once_and_moves_nothing():
    torch.manual_seed(4)
    head = DNCHead(8, 5, correct_only=False).train()
    before = head.centroids.centroids.clone()
    with pytest.warns(UserWarning, match=r"head\(x, target\)"):
        logits = head(torch.randn(4, 8))
    assert logits.shape == (4, 5) and torch.equal(head.centroids.centroids, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head(torch.randn(4, 8))  # once only
        head.eval()(torch.randn(4, 8))  # evaluation needs no labels
        logits, losses = head.train()(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))  # the training API
    assert not torch.equal(head.centroids.centroids, before)


def test_logits_and_auxiliary_losses_equal_their_definitions():
    torch.manual_seed(1)
    head = DNCHead(8, 3, num_subcentroids=4, feat_norm=False, contrast_weight=0.01, compact_weight=0.001).train()
    x = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(-1, 3, (30,))
    p = head.centroids.centroids.clone()
    logits, losses = head(x, y)
    z = F.normalize(x, dim=1)
    sims = torch.einsum("nd,ckd->nck", z, p)
    torch.testing.assert_close(logits, sims.amax(-1) / 0.1)
    # The assignment of the step: the reference Sinkhorn on the same similarities.
    from test_centroids import reference_sinkhorn
    a = torch.full((30,), -1)
    for c in range(3):
        m = y == c
        a[m] = reference_sinkhorn(sims[m, c].detach())
    taken = a >= 0
    index = torch.where(taken, y * 4 + a, -100)
    contrast = 0.01 * F.cross_entropy(sims.flatten(1) / 0.1, index, ignore_index=-100)
    own = sims.flatten(1).gather(1, index.clamp_min(0)[:, None]).squeeze(1)
    compact = 0.001 * ((1 - own[taken]) ** 2).mean()
    torch.testing.assert_close(losses["contrast"], contrast)
    torch.testing.assert_close(losses["compact"], compact)
    got = torch.autograd.grad(logits.sum() + losses["contrast"] + losses["compact"], x)[0]
    want = torch.autograd.grad(sims.amax(-1).sum() / 0.1 + contrast + compact, x)[0]
    torch.testing.assert_close(got, want)


def test_auxiliary_losses_of_one_sample_and_of_a_step_without_clustering():
    """One sample: the losses are its own terms (not divided by more than one); a step that only fills
    does not cluster (``update_interval``) returns no auxiliary losses instead of failing."""
    torch.manual_seed(2)
    head = DNCHead(8, 3, num_subcentroids=2, feat_norm=False, correct_only=False, contrast_weight=1.0,
                   compact_weight=1.0).train()
    x, y = torch.randn(1, 8), torch.tensor([2])
    p = head.centroids.centroids.clone()
    _, losses = head(x, y)
    sims = (F.normalize(x, dim=1) @ p.flatten(0, 1).t())[0]      # (C*K,)
    own = sims[4:6].max()                                         # one sample: Sinkhorn gives its nearest
    torch.testing.assert_close(losses["contrast"], torch.logsumexp(sims / 0.1, 0) - own / 0.1)
    torch.testing.assert_close(losses["compact"], (1 - own) ** 2)
    every2 = DNCHead(8, 3, num_subcentroids=2, update_interval=2, contrast_weight=0.1).train()
    logits, losses = every2(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))  # step 1 of 2: no clustering
    assert losses == {} and logits.shape == (4, 3)


def test_layernorm_calibration_normalises_the_class_scores():
    torch.manual_seed(3)
    head = DNCHead(8, 3, num_subcentroids=2, calibration="layernorm").eval()
    with torch.no_grad():
        head.mask_norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        head.mask_norm.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    x = torch.randn(5, 8)
    best = head.centroids.similarities(head.embed(x)).amax(-1)
    torch.testing.assert_close(head(x), F.layer_norm(best, (3,), head.mask_norm.weight, head.mask_norm.bias))


def test_state_dict_is_plain_tensors_saved_by_safetensors(tmp_path):
    head = trained_head(memory_size=16, update_interval=2)
    state = head.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    assert int(state["centroids.step_count"]) == 5 and "centroids.memory_owner" not in state
    save_file(state, str(tmp_path / "head.safetensors"))
    other = DNCHead(8, 5, num_subcentroids=3, memory_size=16, update_interval=2)
    other.load_state_dict(load_file(str(tmp_path / "head.safetensors")))
    assert other.centroids.steps == 5
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    # The loaded head continues exactly as the original: the next clustering step fires at step 6.
    x, y = torch.randn(12, 8), torch.randint(0, 5, (12,))
    head(x, y), other.train()(x, y)
    assert torch.equal(head.centroids.centroids, other.centroids.centroids)


def test_old_checkpoint_with_extra_state_loads():
    head = trained_head(memory_size=16, update_interval=2)
    old = dict(head.state_dict())
    old["centroids._extra_state"] = {"steps": int(old.pop("centroids.step_count"))}  # the format before
    other = DNCHead(8, 5, num_subcentroids=3, memory_size=16, update_interval=2)
    other.load_state_dict(old)  # strict
    assert other.centroids.steps == 5 and int(other.centroids.step_count) == 5
    assert torch.equal(other.centroids.centroids, head.centroids.centroids)


def test_pixel_head_with_cap_and_aux_losses():
    torch.manual_seed(2)
    head = PixelHead(DNCHead(8, 4, num_subcentroids=2, max_per_class=5, contrast_weight=0.01), ignore_index=255).train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    t = torch.randint(0, 4, (2, 6, 6))
    t[0, :2] = 255
    logits, losses = head(x, t)
    assert logits.shape == (2, 4, 6, 6) and torch.isfinite(losses["contrast"])
    losses["contrast"].backward()
    taken = x.grad.abs().sum(1).flatten() > 0  # only pixels chosen by the cap (at most 5 per class) contribute
    assert 0 < taken.sum() <= 4 * 5 and not taken.view(2, 6, 6)[0, :2].any()


@pytest.mark.timeout(240)  # torchrun, two processes (its own limit: 120 s)
def test_ddp_default_broadcast_buffers_with_a_memory_is_an_error(tmp_path):
    """Two CPU processes (gloo): with ``broadcast_buffers=True`` both stop with one clear error naming
    the fix; with ``broadcast_buffers=False`` each keeps its own memory shard."""
    run_torchrun(Path(__file__).with_name("ddp_buffers_runner.py"), tmp_path, timeout=120)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "broadcast_buffers=False" in res["True"]["result"], res
        assert res["False"]["result"] == "ok" and set(res["False"]["memory_y"]) == {rank}, res


def test_hand_written_backwards_equal_autograd(monkeypatch):
    """The class scores and the auxiliary terms: values and gradients (gradcheck), also in chunks."""
    from dnc.heads import _Scores, _ScoresAndTerms
    monkeypatch.setattr(_ScoresAndTerms, "CHUNK", 7)  # rows of 12: one row per chunk
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(9, 3, 4, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    nearest = s.detach().argmax(-1, keepdim=True)
    index = torch.randint(0, 12, (9,), generator=g)
    torch.autograd.gradcheck(lambda t: _Scores.apply(t, nearest), (s,))
    torch.autograd.gradcheck(lambda t: _ScoresAndTerms.apply(t, nearest, index, 0.1), (s,))
    scores, lse, own = _ScoresAndTerms.apply(s, nearest, index, 0.1)
    torch.testing.assert_close(scores, s.amax(-1))
    torch.testing.assert_close(lse, torch.logsumexp(s.flatten(1) / 0.1, 1))
    torch.testing.assert_close(own, s.flatten(1).gather(1, index[:, None]).squeeze(1))


def test_scores_and_terms_cover_every_row_in_chunks_and_take_an_empty_batch(monkeypatch):
    """More rows than sub-centroids, one row per chunk: every row's gradient is written; an empty batch
    (a step whose samples were all ignored) gives empty fp32 terms and an empty gradient."""
    from dnc.heads import _ScoresAndTerms
    monkeypatch.setattr(_ScoresAndTerms, "CHUNK", 4)
    g = torch.Generator().manual_seed(4)
    s = (torch.rand(11, 2, 2, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    nearest, index = s.detach().argmax(-1, keepdim=True), torch.randint(0, 4, (11,), generator=g)
    torch.autograd.gradcheck(lambda t: _ScoresAndTerms.apply(t, nearest, index, 0.1), (s,))
    empty = torch.zeros(0, 3, 2, requires_grad=True)
    scores, lse, own = _ScoresAndTerms.apply(empty, torch.zeros(0, 3, 1, dtype=torch.long),
                                             torch.zeros(0, dtype=torch.long), 0.1)
    assert scores.shape == (0, 3) and lse.shape == own.shape == (0,) and lse.dtype == own.dtype == torch.float32
    (scores.sum() + lse.sum() + own.sum()).backward()
    assert empty.grad.shape == (0, 3, 2)


def test_pixel_head_inference_is_the_flat_head_per_pixel_and_255_is_ignored_by_default():
    """Evaluation (with or without a target): the ``(B, C, H, W)`` logits are the flat head's per pixel;
    training with the default ``ignore_index`` (255) and the auxiliary losses: 255 pixels take no part."""
    torch.manual_seed(13)
    head = PixelHead(DNCHead(8, 3, num_subcentroids=2, momentum=0.5, contrast_weight=0.01, compact_weight=0.001))
    x = torch.randn(2, 8, 4, 5)
    head.eval()
    flat = head.head(x.permute(0, 2, 3, 1).reshape(-1, 8)).view(2, 4, 5, 3).permute(0, 3, 1, 2)
    target = torch.randint(0, 3, (2, 4, 5))
    with_target, losses = head(x, target)  # with labels, evaluation returns what training returns (no losses)
    assert losses == {}
    for out in (head(x), with_target):
        assert torch.is_tensor(out) and out.shape == (2, 3, 4, 5)
        torch.testing.assert_close(out, flat)
    head.train()
    start = head.state_dict()
    target[:, :2] = 255
    logits, losses = head(x, target)
    assert set(losses) == {"contrast", "compact"} and all(torch.isfinite(v) for v in losses.values())
    moved = head.head.centroids.centroids.clone()
    head.load_state_dict(start)
    keep = target != 255
    head.head(x.permute(0, 2, 3, 1)[keep], target[keep])  # the same step without the ignored pixels
    torch.testing.assert_close(head.head.centroids.centroids, moved)
