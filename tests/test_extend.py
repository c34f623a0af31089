"""dnc extend: classes added from a few images or removed, without retraining; the result loads everywhere."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from dnc.cli import main
from dnc.config import load_config, to_dict
from dnc.engine import load_checkpoint, save_checkpoint
from dnc.extend import JITTER_COS, fit_subcentroids, refine_subcentroids
from dnc.tasks import build_model

from openset_tiny import DNC_CFG, overrides, train, write_digits

KEY = "head.centroids.centroids"


def test_fewer_distinct_images_than_k_still_give_k_distinct_subcentroids():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    z = torch.stack([a, b, b, b, a + 0.3 * b] + list(F.normalize(torch.randn(9, 16, generator=g), dim=1)))
    z = F.normalize(z, dim=1)
    groups = torch.tensor([0, 1, 1, 1, 1] + [2] * 9)  # one image; two distinct directions; nine images
    p = fit_subcentroids(z, groups, 3, 4, generator=g)
    assert p.shape == (3, 4, 16)
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(3, 4))
    gram = p @ p.transpose(1, 2)
    off = ~torch.eye(4, dtype=torch.bool)
    assert (gram[:, off] < 1 - 1e-5).all()                           # K distinct sub-centroids in every class
    cos_to_image = p[0] @ a
    assert cos_to_image.max() == pytest.approx(1, abs=1e-6)           # one is the image itself,
    assert (cos_to_image >= JITTER_COS - 1e-5).all()                  # the others jittered copies close to it
    with pytest.raises(ValueError, match="^group 1 has no embedding"):
        fit_subcentroids(z[:3], torch.tensor([0, 2, 2]), 3, 4)


def test_fit_subcentroids_is_kmeans_pp_on_unit_rows_with_duplicates_jittered_exactly():
    """Distinct centers are ``kmeans_pp``'s, untouched, whatever the length of each row; a duplicate of an
    earlier center is replaced by a unit vector at cosine ``JITTER_COS`` from it; a seeded generator
    gives the same result twice."""
    from dnc.centroids import kmeans_pp
    g = torch.Generator().manual_seed(7)
    z = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    groups = torch.arange(40) % 2
    scaled = z * torch.rand(40, 1, generator=g).add(0.5)  # rows of other lengths: the same directions
    p = fit_subcentroids(scaled, groups, 2, 3, generator=torch.Generator().manual_seed(1))
    want, _ = kmeans_pp(z, groups, 2, 3, 10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(p, want)
    twice = [fit_subcentroids(z[:2].repeat(3, 1), torch.tensor([0, 1] * 3), 2, 3, generator=torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(*twice)
    q = twice[0]                                                      # each group: one direction, K=3
    for c in range(2):
        cos = q[c] @ z[c]
        assert int((cos > 1 - 1e-6).sum()) == 1                        # one kept exactly,
        torch.testing.assert_close(cos.sort().values[:2], torch.full((2,), JITTER_COS))  # two at JITTER_COS
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_digits(tmp_path_factory.mktemp("digits"))
    ckpt = train(DNC_CFG, tmp_path_factory.mktemp("work") / "dnc", root)
    # one image of digit 7: a class from a single example
    one = root / "one7" / "deep" / "folder"
    one.mkdir(parents=True)
    (one / "seven.png").write_bytes(next((root / "new" / "7").glob("*.png")).read_bytes())
    # a data root with all eight classes (train and val), for dnc test / train on the extended model
    for split, sources in (("train", ("known/train", "new")), ("val", ("known/val", "unknown"))):
        for d in "01234567":
            src = root / (sources[0] if d in "012345" else sources[1]) / d
            (root / "all" / split).mkdir(parents=True, exist_ok=True)
            (root / "all" / split / d).symlink_to(src, target_is_directory=True)
    return root, ckpt


@pytest.mark.end_to_end
def test_add_two_classes_one_from_a_single_image(setup, tmp_path, capsys):
    root, ckpt = setup
    out = tmp_path / "ext.pt"
    capsys.readouterr()
    assert main(["extend", DNC_CFG, str(ckpt), "--add", f"6={root / 'new' / '6'}", "--add", f"7={root / 'one7'}",
                 "--val", "--out", str(out), *overrides(root)]) == 0
    printed = capsys.readouterr().out
    assert "old classes on the validation split (120 images): top-1" in printed and "6 (50 images)" in printed

    old, new = load_checkpoint(ckpt), load_checkpoint(out)
    assert new["classes"] == list("01234567") and new["config"]["data"]["num_classes"] == 8
    assert new["config"]["data"]["dataset_kwargs"]["classes"] == list("01234567")
    p_old, p_new = old["model"][KEY], new["model"][KEY]
    assert p_new.shape == (8, *p_old.shape[1:])
    assert torch.equal(p_new[:6], p_old)                              # every old class untouched
    gram = p_new[7] @ p_new[7].t()
    assert (gram[~torch.eye(len(gram), dtype=torch.bool)] < 1 - 1e-5).all()  # one image, K distinct sub-centroids
    for k in old["model"]:
        if k != KEY:
            assert torch.equal(old["model"][k], new["model"][k]) if torch.is_tensor(old["model"][k]) else True
    cfg_file = out.with_suffix(".yaml")
    assert yaml.safe_load(cfg_file.read_text())["data"]["num_classes"] == 8

    # dnc test on all eight classes: the new ones are recognised, the old ones kept
    result = tmp_path / "r.json"
    assert main(["test", str(cfg_file), str(out), "--out", str(result), f"data.root={root / 'all'}"]) == 0
    preds = json.loads(result.read_text())["predictions"]
    acc = {c: sum(p["pred"] == c for p in preds if p["label"] == c) / sum(p["label"] == c for p in preds) for c in (6, 7)}
    assert acc[6] > 0.6 and acc[7] > 1 / 8, acc  # 7 from one image: above chance among the 8 classes

    # predict names the new classes; training resumes from the extended checkpoint
    from dnc.predict import run_predict
    seven = sorted((root / "unknown" / "6").glob("*.png"))[0]
    assert run_predict(out, [str(seven)], topk=8, device="cpu")[0]["top"][0]["class"] in list("01234567")
    work = tmp_path / "resumed"
    # (the run is complete: resuming loads every state of the grown model, evaluates it and saves)
    assert main(["train", str(cfg_file), "--work-dir", str(work), "--resume", str(out), f"data.root={root / 'all'}"]) == 0
    resumed = load_checkpoint(work / "last.pt")
    assert resumed["classes"] == load_checkpoint(out)["classes"] and (work / "metrics.json").is_file()


@pytest.mark.end_to_end
def test_remove_drops_the_class_and_keeps_the_others(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "less.pt"
    assert main(["extend", DNC_CFG, str(ckpt), "--remove", "5", "--remove", "0", "--out", str(out), *overrides(root)]) == 0
    old, new = load_checkpoint(ckpt), load_checkpoint(out)
    assert new["classes"] == list("1234")
    assert torch.equal(new["model"][KEY], old["model"][KEY][1:5])
    assert main(["predict", str(out), str(next((root / "known" / "val" / "5").glob("*.png")))]) == 0


@pytest.mark.end_to_end
@pytest.mark.parametrize("args,message", [
    (["--add", "3={new6}"], "--add 3: class '3' exists already"),
    (["--remove", "cat"], "--remove cat: no class 'cat'"),
    (["--add", "6={missing}"], "image folder not found"),
    (["--add", "6"], "expected NAME=DIR"),
    ([], "nothing to do"),
])
def test_bad_requests_fail_with_one_line_and_write_nothing(setup, tmp_path, capsys, args, message):
    root, ckpt = setup
    args = [a.format(new6=root / "new" / "6", missing=tmp_path / "nope") for a in args]
    capsys.readouterr()
    assert main(["extend", DNC_CFG, str(ckpt), *args, "--out", str(tmp_path / "x.pt"), *overrides(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.glob("x.*"))


def test_layernorm_calibration_and_memory_follow_the_classes(tmp_path):
    over = ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16", "model.dnc.calibration=layernorm",
            "model.dnc.memory_size=40", "data.dataset=imagefolder", "data.num_classes=3", f"data.root={tmp_path}")
    cfg = load_config(DNC_CFG, over)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="")
    with torch.no_grad():
        model.head.mask_norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.head.centroids.memory_y.fill_(2)
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": to_dict(cfg), "classes": ["a", "b", "c"]})
    img = tmp_path / "d" / "x.png"
    img.parent.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    assert main(["extend", DNC_CFG, str(tmp_path / "m.pt"), "--add", f"d={img.parent}", "--remove", "b",
                 "--out", str(tmp_path / "e.pt"), *over]) == 0
    new = load_checkpoint(tmp_path / "e.pt")
    assert new["classes"] == ["a", "c", "d"]
    torch.testing.assert_close(new["model"]["head.mask_norm.weight"], torch.tensor([1.0, 3.0, 2.0]))  # new: the mean
    assert (new["model"]["head.centroids.memory_y"] == -1).all()       # the memory held old class indices
    assert "optimizer" not in new


@pytest.mark.end_to_end
def test_refit_old_places_old_classes_on_the_current_embedding(setup, tmp_path, capsys, monkeypatch):
    root, ckpt = setup
    out = tmp_path / "refit.pt"
    capsys.readouterr()
    monkeypatch.setattr("dnc.extend.WARN_DROP", -101.0)  # any change warns: the advice after --refit-old
    assert main(["extend", DNC_CFG, str(ckpt), "--add", f"6={root / 'new' / '6'}", "--refit-old", "--val",
                 "--out", str(out), *overrides(root)]) == 0
    printed = capsys.readouterr()
    assert "continue training: dnc train" in printed.err and "re-fit them with --refit-old" not in printed.err
    line = next(x for x in printed.out.splitlines() if x.startswith("old classes"))
    before, after = (float(v) for v in line.split("top-1 ")[1].split("% after")[0].split("% before, "))
    old, new = load_checkpoint(ckpt), load_checkpoint(out)
    assert not torch.equal(new["model"][KEY][:6], old["model"][KEY])
    assert new["extended"]["refit_old"] is True
    # every old class's training images are closer to their own re-fitted sub-centroids than before
    from dnc.extend import _training_embeddings
    cfg = load_config(DNC_CFG, tuple(overrides(root)))
    model = build_model(cfg, pretrained="")
    model.load_state_dict(old["model"])
    z, y = _training_embeddings(cfg, model.eval(), torch.device("cpu"))

    def own(p):
        return torch.einsum("nd,nkd->nk", z, p[y]).amax(1).mean()

    assert own(new["model"][KEY][:6]) > own(old["model"][KEY])
    assert after > before - 10


def test_several_classes_added_and_removed_at_once_keep_their_own_subcentroids_and_names(tmp_path):
    """Three classes added (1, 5 and 12 embeddings, each around its own direction) and two removed (not
    next to each other) in one call: the kept classes keep their sub-centroids and per-class calibration
    in their new order, every added class's sub-centroids come from its own embeddings and carry its
    name, and the extended model classifies each added class's embeddings as that class."""
    from dnc.extend import extend_model
    over = ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16", "model.dnc.calibration=layernorm",
            "data.dataset=imagefolder", "data.num_classes=6", f"data.root={tmp_path}", "model.dnc.num_subcentroids=3")
    cfg = load_config(DNC_CFG, over)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="")
    with torch.no_grad():
        model.head.mask_norm.weight.copy_(2.0 ** torch.arange(6.0))  # the mean of the kept ones is not all's
        model.head.mask_norm.bias.copy_(-(2.0 ** torch.arange(6.0)))
    classes = list("abcdef")
    g = torch.Generator().manual_seed(1)
    dirs = F.normalize(torch.randn(3, 16, generator=g), dim=1)
    added = {name: F.normalize(dirs[i] + 0.1 * torch.randn(n, 16, generator=g), dim=1)
             for i, (name, n) in enumerate((("x", 1), ("y", 5), ("z", 12)))}
    cfg2, model2, classes2 = extend_model(cfg, model, classes, added, ["e", "b"], seed=3)
    assert classes2 == list("acdfxyz") and cfg2.data.num_classes == 7
    assert cfg2.data.dataset_kwargs["classes"] == classes2
    keep = [0, 2, 3, 5]
    p_old, p_new = model.state_dict()[KEY], model2.state_dict()[KEY]
    assert p_new.shape == (7, 3, 16)
    assert torch.equal(p_new[:4], p_old[keep])
    w = model2.head.mask_norm.weight.detach()
    torch.testing.assert_close(w, torch.tensor([1.0, 4.0, 8.0, 32.0] + [11.25] * 3))  # new classes: the kept mean
    torch.testing.assert_close(model2.head.mask_norm.bias.detach(), -w)
    for i, name in enumerate("xyz"):
        p = p_new[4 + i]
        own = (p @ added[name].t()).amax(1)
        others = torch.cat([added[o] for o in "xyz" if o != name])
        assert (own > 0.95).all() and ((p @ others.t()).amax() < own.min() - 0.2), name
        torch.testing.assert_close(p.norm(dim=1), torch.ones(3))
        sims = model2.head.centroids.similarities(added[name]).amax(-1)
        assert (sims.argmax(1) == classes2.index(name)).all(), name
    # the same request through another order of additions names the same sub-centroids (no mix-up)
    _, model3, classes3 = extend_model(cfg, model, classes, {n: added[n] for n in "zxy"}, ["b", "e"], seed=3)
    assert classes3 == list("acdfzxy")
    for name in "xyz":
        p2, p3 = p_new[classes2.index(name)], model3.state_dict()[KEY][classes3.index(name)]
        assert (p3 @ added[name].t()).amax(1).min() > 0.95 and (p2 @ added[name].t()).amax(1).min() > 0.95, name


def test_refinement_moves_a_few_shot_class_off_the_images_of_an_old_one():
    """A new class fitted to one image that lies among an old class's images wins them; the refinement
    on frozen embeddings gives them back, keeps the new image, and leaves unit sub-centroids."""
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(16)
    old = F.normalize(axes[0] + 0.35 * torch.randn(200, 16, generator=g), dim=1)   # old class 0 around e0
    other = F.normalize(axes[1] + 0.35 * torch.randn(200, 16, generator=g), dim=1)  # old class 1 around e1
    shot = F.normalize(axes[0] + 0.8 * axes[2], dim=0)                              # new class 2: one image near class 0
    p = torch.stack([F.normalize(axes[0] + 0.5 * axes[3], dim=0), axes[1], shot])[:, None]  # stale old class 0
    z, y = torch.cat([old, other, shot[None]]), torch.cat([torch.zeros(200), torch.ones(200), torch.tensor([2.0])]).long()

    def predict(q):
        return torch.einsum("nd,ckd->nck", z, q).amax(-1).argmax(1)

    before = predict(p)
    q = refine_subcentroids(p, z, y, temperature=0.1, steps=100, lr=3e-3)
    after = predict(q)
    assert q.shape == p.shape
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3, 1))
    assert (before[:200] == 2).float().mean() > 0.1                      # the new class took old images,
    assert (after[:200] == 0).float().mean() > (before[:200] == 0).float().mean() + 0.05  # fewer after
    assert after[-1] == 2 and (after[200:400] == 1).float().mean() > 0.95


def _refine_by_hand(p, z, y, temperature, steps, lr):
    """The refinement as documented, written out: Adam on the mean over the classes present of each
    class's mean cross-entropy of ``max_k <z, p(c, k) / |p(c, k)|> / temperature``."""
    q = p.detach().float().clone().requires_grad_()
    opt = torch.optim.Adam([q], lr=lr)
    present = [c for c in range(p.shape[0]) if (y == c).any()]
    for _ in range(steps):
        unit = q / q.norm(dim=-1, keepdim=True)
        logits = torch.stack([(z @ unit[c].t()).max(1).values for c in range(p.shape[0])], 1) / temperature
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = sum(losses[y == c].mean() for c in present) / len(present)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (q / q.norm(dim=-1, keepdim=True)).detach().to(p.dtype)


def test_refinement_is_adam_on_the_class_balanced_loss_and_keeps_the_dtype():
    """Against the objective written out by hand: class-balanced (a class of one image weighs as much as
    one of 20; a class without images takes no part but keeps its rows), Adam at the given rate, unit
    rows in the input's dtype; the defaults are the protocol's 50 steps at 1e-3 (BENCHMARKS.md)."""
    g = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(31, 8, generator=g), dim=1)
    y = torch.tensor([0] * 20 + [1] * 10 + [2])                            # class 3 has no image
    p = F.normalize(torch.randn(4, 2, 8, generator=g, dtype=torch.float64), dim=-1)
    q = refine_subcentroids(p, z, y, temperature=0.1, steps=15, lr=0.02)
    assert q.dtype == torch.float64 and q.shape == p.shape
    torch.testing.assert_close(q, _refine_by_hand(p, z, y, 0.1, 15, 0.02), atol=2e-5, rtol=0)
    assert (q - p).abs().max() > 0.05                                       # it did move
    torch.testing.assert_close(refine_subcentroids(p, z, y, 0.1), _refine_by_hand(p, z, y, 0.1, 50, 1e-3),
                               atol=2e-5, rtol=0)


def test_extend_model_refuses_bad_requests_and_refits_old_classes_from_given_embeddings(tmp_path):
    """The requests ``dnc extend`` refuses, each with its message; removing only; and ``refit``: the old
    classes' sub-centroids become exactly ``fit_subcentroids`` of the given embeddings (seed + 1), the added
    class's those of its own (seed), so that the same call gives the same model."""
    import re

    from dnc.extend import extend_model
    over = ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16", "data.dataset=imagefolder",
            "data.num_classes=3", f"data.root={tmp_path}", "model.dnc.num_subcentroids=2")
    cfg = load_config(DNC_CFG, over)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="")
    classes, p = list("abc"), model.state_dict()[KEY]
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(60, p.shape[-1], generator=g), dim=1)
    for added, removed, message in (({"a": z}, [], "--add a: class 'a' exists already"),
                                    ({}, ["x"], "--remove x: no class 'x'; classes: a, b, c"),
                                    ({}, ["a", "a"], "--remove: a class is named twice"),
                                    ({}, ["a", "b", "c"], "--remove: no class would be left")):
        with pytest.raises(ValueError, match=re.escape(message)):
            extend_model(cfg, model, classes, added, removed)
    _, less, names = extend_model(cfg, model, classes, {}, ["b"])
    assert names == ["a", "c"] and torch.equal(less.state_dict()[KEY], p[[0, 2]])

    labels = torch.arange(60) % 3
    _, refit, names = extend_model(cfg, model, classes, {"d": z[:12]}, ["a"], seed=5, refit=(z, labels))
    old = fit_subcentroids(z, labels, 3, 2, generator=torch.Generator().manual_seed(6))
    new = fit_subcentroids(z[:12], torch.zeros(12, dtype=torch.long), 1, 2, generator=torch.Generator().manual_seed(5))
    assert names == list("bcd")
    torch.testing.assert_close(refit.state_dict()[KEY], torch.cat([old[1:], new]))
    _, again, _ = extend_model(cfg, model, classes, {"d": z[:12]}, ["a"])
    _, seed0, _ = extend_model(cfg, model, classes, {"d": z[:12]}, ["a"], seed=0)
    assert torch.equal(again.state_dict()[KEY], seed0.state_dict()[KEY])  # seed 0 by default
