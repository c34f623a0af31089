"""Tests for dnc.explain, dnc.report and dnc predict --explain: streaming top-m search, anchoring, report,
explained predictions (CPU, small)."""
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from dnc.cli import main
from dnc.config import PACKAGE_CONFIGS, Config, from_dict, load_config, to_dict
from dnc.data.classification import Digits, build_cls_dataset
from dnc.data.seg_transforms import build_seg_transforms
from dnc.data.segmentation import CAMVID_CLASSES
from dnc.data.transforms import build_cls_transform
from dnc.engine import load_checkpoint, save_checkpoint
from dnc.explain import TopMSearch, explain_decisions, pixel_decisions, subcentroid_statistics
from dnc.tasks import build_model

DNC_CFG = str(PACKAGE_CONFIGS / "demo" / "digits_dnc.yaml")
LINEAR_CFG = str(PACKAGE_CONFIGS / "demo" / "digits_linear.yaml")


# ------------------------------------------------------------------------------ the search itself
def _brute_force(z, y, p, m):
    """Top-m per sub-centroid over the whole set at once, and the own-class nearest sub-centroid."""
    c, k, _ = p.shape
    sims = z @ p.reshape(c * k, -1).t()                                   # (N, C*K)
    own = y[:, None] == torch.arange(c).repeat_interleave(k)[None]
    vals, idx = sims.masked_fill(~own, float("-inf")).t().topk(m, dim=1)  # over all N
    idx = torch.where(torch.isfinite(vals), idx, -1)
    winner = sims.view(-1, c, k)[torch.arange(len(y)), y].argmax(1)
    wins = torch.bincount(y * k + winner, minlength=c * k).view(c, k)
    return vals.view(c, k, m), idx.view(c, k, m), wins


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_top_m_equals_brute_force(batch):
    g = torch.Generator().manual_seed(batch)
    c, k, d, m = 5, 3, 16, 4
    y = torch.randint(0, c - 1, (300,), generator=g)
    y[[10, 200]] = c - 1                                  # the last class has fewer than m samples
    z = F.normalize(torch.randn(300, d, generator=g), dim=1)
    p = F.normalize(torch.randn(c, k, d, generator=g), dim=-1)
    perm = torch.randperm(300, generator=g)               # dataset indices need not be in order
    search = TopMSearch(p, m)
    for part in perm.split(batch):
        search.update(z[part], y[part], part)
    got = search.result()
    vals, idx, wins = _brute_force(z, y, p, m)
    torch.testing.assert_close(got.sims, vals)
    assert torch.equal(got.index, idx)
    assert torch.equal(got.wins, wins)
    assert torch.equal(got.class_counts, torch.bincount(y, minlength=c))
    assert got.index[c - 1, :, 2:].eq(-1).all() and got.found.all()
    torch.testing.assert_close(got.anchor_z, z[idx[..., 0]])  # the anchor is its nearest sample's embedding

    stats = subcentroid_statistics(p, got)
    assert torch.equal(stats["unused"], wins == 0)
    gram = p @ p.transpose(1, 2)
    manual = torch.stack([gram[i][~torch.eye(k, dtype=torch.bool)].mean() for i in range(c)])
    torch.testing.assert_close(stats["diversity"], manual)


def test_top_m_rejects_bad_m_and_keeps_empty_classes_unanchored():
    with pytest.raises(ValueError, match="m must be >= 1"):
        TopMSearch(torch.randn(2, 2, 4), 0)
    search = TopMSearch(F.normalize(torch.randn(3, 2, 4), dim=-1), 2)
    search.update(F.normalize(torch.randn(5, 4), dim=-1), torch.tensor([0, 0, 1, 1, 1]), torch.arange(5))
    got = search.result()
    assert got.found[:2].all() and not got.found[2].any() and got.wins[2].sum() == 0


# ------------------------------------------------------------------------------ a trained digits model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    assert main(["train", DNC_CFG, "train.epochs=0", "train.iters=12", "train.eval_interval=1000",
                 "model.dnc.init_samples=500", "--work-dir", str(work)]) == 0
    return work / "last.pt"


@pytest.fixture(scope="module")
def explained(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    assert main(["explain", DNC_CFG, str(trained), "--out", str(out), "--top-m", "3", "--examples", "4"]) == 0
    return out, json.loads((out / "explain.json").read_text())


def _load(cfg_path, ckpt_path):
    model = build_model(load_config(cfg_path), pretrained="")
    model.load_state_dict(load_checkpoint(ckpt_path)["model"])
    return model.eval()


@pytest.fixture(scope="module")
def train_embeddings(trained):
    """Embeddings of all training digits by the original model, computed here in one batch."""
    ds = build_cls_dataset("digits", None, "train", build_cls_transform("digits", False))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    model = _load(DNC_CFG, trained)
    with torch.no_grad():
        z = F.normalize(model.head.feat_norm(model.backbone(x)), dim=-1)
    return z, torch.tensor(ds.targets), model


def test_anchors_are_training_embeddings_of_their_class(explained, train_embeddings):
    out, result = explained
    z, y, original = train_embeddings
    ckpt = load_checkpoint(out / "anchored.pt")
    assert ckpt["anchored"] is True and ckpt["classes"] == [str(i) for i in range(10)]
    anchored = _load(DNC_CFG, out / "anchored.pt").head.centroids.centroids
    p = original.head.centroids.centroids
    index = ckpt["anchor_index"]
    assert index.shape == (10, 4) and (index >= 0).all()
    assert torch.equal(y[index], torch.arange(10)[:, None].expand(10, 4))     # of the right class
    torch.testing.assert_close(anchored, z[index], atol=1e-5, rtol=0)          # a real training embedding
    sims = torch.einsum("ckd,nd->ckn", p, z).masked_fill(y[None, None] != torch.arange(10)[:, None, None], -2)
    best, _ = sims.max(-1)                                                     # nearest of its class
    torch.testing.assert_close(torch.einsum("ckd,ckd->ck", p, z[index]), best, atol=1e-5, rtol=0)
    top3 = sims.topk(3, dim=-1).values
    got = torch.tensor([[e["cosine"] for e in s["exemplars"]] for s in result["subcentroids"]]).view(10, 4, 3)
    torch.testing.assert_close(got, top3, atol=1e-5, rtol=0)
    wins = torch.tensor([s["wins"] for s in result["subcentroids"]]).view(10, 4)
    assert torch.equal(wins.sum(1), torch.bincount(y, minlength=10))


def test_reported_accuracies_match_dnc_test(explained, tmp_path):
    out, result = explained
    assert load_checkpoint(result["checkpoint"])["metrics"]["top1"] == pytest.approx(result["accuracy"]["before"]["top1"])
    assert main(["test", DNC_CFG, str(out / "anchored.pt"), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == pytest.approx(result["accuracy"]["after"]["top1"])


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src, self.scripts, self.links = [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.scripts += tag == "script"
        if tag == "img":
            self.src.append(attrs["src"])
        if tag in ("link", "a") and (attrs.get("href") or "").startswith(("http", "//")):
            self.links.append(attrs["href"])


def test_report_images_exist_and_decode(explained):
    out, result = explained
    parser = _Sources()
    parser.feed((out / "index.html").read_text())
    assert parser.scripts == 0 and not parser.links
    assert len(parser.src) == 10 + len(result["examples"]) and len(result["examples"]) >= 4
    for src in parser.src:
        assert not src.startswith(("/", "http", "file:", "data:")), src
        with Image.open(out / src) as img:
            img.load()
            assert img.width > 50 and img.height > 50


def test_explanation_names_the_winning_subcentroid(explained, train_embeddings):
    out, result = explained
    z_train, _, _ = train_embeddings
    model = _load(DNC_CFG, out / "anchored.pt")
    val = build_cls_dataset("digits", None, "val", build_cls_transform("digits", False))
    x = torch.stack([val[i][0] for i in range(64)])
    dec = explain_decisions(model, x, topk=2)
    with torch.no_grad():
        logits = model(x)
        z = F.normalize(model.head.feat_norm(model.backbone(x)), dim=-1)
    sims = torch.einsum("nd,ckd->nck", z, model.head.centroids.centroids)   # recomputed, (N, C, K)
    assert torch.equal(dec.classes[:, 0], logits.argmax(1))
    assert torch.equal(dec.classes[:, 1], logits.topk(2, dim=1).indices[:, 1])
    rows = torch.arange(64)[:, None]
    named = sims[rows, dec.classes, dec.subcentroid]                          # the named sub-centroids
    torch.testing.assert_close(named, sims[rows, dec.classes].amax(-1))
    torch.testing.assert_close(named / model.head.temperature, logits.gather(1, dec.classes), atol=1e-4, rtol=0)
    torch.testing.assert_close(dec.similarity, named)
    # the report's decisions name training images whose embeddings give the recorded similarities
    for ex in result["examples"]:
        xi = val[ex["index"]][0][None]
        with torch.no_grad():
            zi = F.normalize(model.head.feat_norm(model.backbone(xi)), dim=-1)[0]
        assert ex["pred"] == ex["decided_by"][0]["class"]
        for d in ex["decided_by"]:
            assert float(zi @ z_train[d["anchor_index"]]) == pytest.approx(d["similarity"], abs=1e-4)


def test_predict_prints_top_classes_and_writes_explanation(explained, tmp_path, capsys):
    out, _ = explained
    digits = Digits(train=False)
    paths = []
    for i in (0, 1):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(digits[i][0].permute(1, 2, 0).numpy()).save(paths[-1])
    capsys.readouterr()
    assert main(["predict", str(out / "anchored.pt"), *map(str, paths), "--explain", "--pictures", str(tmp_path / "o"),
                 "--topk", "3", "--out", str(tmp_path / "preds.json")]) == 0
    printed = capsys.readouterr().out
    records = json.loads((tmp_path / "preds.json").read_text())
    model = _load(DNC_CFG, out / "anchored.pt")
    anchor_index = load_checkpoint(out / "anchored.pt")["anchor_index"]
    tf = build_cls_transform("digits", False)
    assert [r["path"] for r in records] == list(map(str, paths))
    for i, (path, rec) in enumerate(zip(paths, records)):
        expected = int(model(tf(digits[i][0])[None]).argmax())
        line = next(s for s in printed.splitlines() if s.startswith(str(path)))
        assert line.split(": ")[1].split()[0] == str(expected) == rec["pred"] == rec["top"][0]["class"]
        assert len(rec["top"]) == 3
        # the deciding exemplars: the anchors of the named sub-centroids of the top two classes
        won, runner = rec["decided_by"]
        assert won["class"] == rec["pred"] and runner["class"] == rec["top"][1]["class"]
        for d in (won, runner):
            assert d["anchor_index"] == int(anchor_index[int(d["class"]), d["subcentroid"]])
        # the picture is named after the image and the predicted class
        assert rec["picture"] == str(tmp_path / "o" / f"digit{i}_{expected}.png")
        with Image.open(rec["picture"]) as img:
            img.load()
    assert "decided by sub-centroid" in printed


def test_predict_explain_needs_an_anchored_checkpoint(trained, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["predict", str(trained), str(tmp_path / "x.png")]) == 0
    capsys.readouterr()
    assert main(["predict", str(trained), str(tmp_path / "x.png"), "--explain", "--pictures", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "anchored checkpoint" in err and len(err.splitlines()) == 1
    assert main(["predict", str(trained), str(tmp_path / "missing.png")]) == 1
    assert "image not found" in capsys.readouterr().err


def test_explain_rejects_a_linear_checkpoint(tmp_path, capsys):
    cfg = load_config(LINEAR_CFG)
    save_checkpoint(tmp_path / "linear.pt", {"model": build_model(cfg).state_dict(), "config": to_dict(cfg)})
    assert main(["explain", LINEAR_CFG, str(tmp_path / "linear.pt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "linear head" in err and "DNC" in err


def test_segmentation_predict_maps_the_winning_subcentroid(tmp_path, capsys):
    cfg = from_dict(Config, {"task": "segmentation", "data": {"dataset": "camvid", "num_classes": 4, "scale": [64, 48]},
                             "model": {"backbone": "resnet18", "decoder": "fcn", "decoder_channels": 16,
                                       "dnc": {"num_subcentroids": 3}}, "train": {"iters": 1}})
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").eval()
    save_checkpoint(tmp_path / "seg.pt", {"model": model.state_dict(), "config": to_dict(cfg), "classes": list("abcd")})
    x = torch.randn(2, 3, 48, 64)
    dec = pixel_decisions(model, x, (40, 52))
    with torch.no_grad():
        logits = model(x)                                                      # (B, C, h, w)
        feats = model.decoder(model.encoder(x))
    up = F.interpolate(logits, size=(40, 52), mode="bilinear", align_corners=False)
    assert torch.equal(dec["classes"], up.argmax(1))
    b, d, h, w = feats.shape
    z = F.normalize(model.head.head.feat_norm(feats.permute(0, 2, 3, 1)), dim=-1)     # (B, h, w, D)
    sims = torch.einsum("bhwd,ckd->bhwck", z, model.head.head.centroids.centroids)
    rows, cols = torch.arange(40) * h // 40, torch.arange(52) * w // 52               # nearest feature pixel
    at = sims[torch.arange(2)[:, None, None], rows[None, :, None], cols[None, None, :], dec["classes"]]  # (B,H,W,K)
    assert torch.equal(dec["subcentroid"], at.argmax(-1))
    torch.testing.assert_close(dec["similarity"], at.amax(-1))

    Image.fromarray(torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8).numpy()).save(tmp_path / "street.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "seg.pt"), str(tmp_path / "street.png"), "--explain", "--pictures",
                 str(tmp_path / "o")]) == 0
    assert "sub-centroid maps" in capsys.readouterr().out
    with Image.open(tmp_path / "o" / "street_segments.png") as img:
        img.load()


def test_segmentation_predict_writes_colour_masks_in_the_dataset_palette(tmp_path):
    cfg = from_dict(Config, {"task": "segmentation", "data": {"dataset": "camvid", "num_classes": 11, "scale": None},
                             "model": {"backbone": "resnet18", "decoder": "fcn", "decoder_channels": 16, "head": "linear"},
                             "train": {"iters": 1}})
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").eval()
    save_checkpoint(tmp_path / "seg.pt", {"model": model.state_dict(), "config": to_dict(cfg),
                                          "classes": list(CAMVID_CLASSES)})
    image = torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8)
    Image.fromarray(image.numpy()).save(tmp_path / "street.png")
    assert main(["predict", str(tmp_path / "seg.pt"), str(tmp_path / "street.png"), "--pictures", str(tmp_path / "o"),
                 "--out", str(tmp_path / "preds.json")]) == 0
    rec, = json.loads((tmp_path / "preds.json").read_text())
    assert rec["mask"] == str(tmp_path / "o" / "street_mask.png")
    with Image.open(rec["mask"]) as mask:
        assert mask.mode == "P" and mask.size == (52, 40)
        classes = torch.from_numpy(np.array(mask)).long()
        # CamVid's usual colours: sky grey, car purple (told apart)
        colours = torch.tensor(mask.getpalette()[:33]).view(11, 3)
        assert colours[CAMVID_CLASSES.index("sky")].tolist() == [128, 128, 128]
        assert colours[CAMVID_CLASSES.index("car")].tolist() == [64, 0, 128]
    x = build_seg_transforms(False, scale=None)(tv_tensors.Image(image.permute(2, 0, 1)), torch.zeros(40, 52))[0]
    with torch.no_grad():
        expected = F.interpolate(model(x[None]), size=(40, 52), mode="bilinear", align_corners=False).argmax(1)[0]
    assert torch.equal(classes, expected)
    share = torch.bincount(expected.flatten(), minlength=11).float() / expected.numel()
    assert rec["pred"] == CAMVID_CLASSES[int(share.argmax())]
    assert sum(t["score"] for t in rec["top"]) <= 1 + 1e-6


def test_explain_anchors_only_to_images_the_model_was_trained_on(trained, tmp_path):
    """Data overrides choose the evaluation set; the training images searched stay those of training
    (here: trained with 20% of the digits held out, evaluated on a 50% split that overlaps training)."""
    out = tmp_path / "o"
    assert main(["explain", DNC_CFG, str(trained), "--out", str(out), "--top-m", "2", "--examples", "0",
                 "data.dataset_kwargs.val_fraction=0.5"]) == 0
    result = json.loads((out / "explain.json").read_text())
    trained_on = Digits(train=True)  # the training split of the checkpoint's config
    assert result["num_train"] == len(trained_on)
    assert result["num_eval"] == result["evaluated"]["samples"] == len(Digits(train=False, val_fraction=0.5))
    ckpt = load_checkpoint(out / "anchored.pt")
    index = ckpt["anchor_index"]
    assert (index >= 0).all() and int(index.max()) < len(trained_on)
    assert all(trained_on.sample_name(int(i)) == name for i, name in zip(index.flatten(), sum(ckpt["anchor_names"], [])))
    assert ckpt["config"]["data"]["dataset_kwargs"].get("val_fraction", 0.2) == 0.2  # predict reads these images


@pytest.mark.parametrize("dataset, n, cls, rgb", [("camvid", 11, "sky", (128, 128, 128)),
                                                  ("cityscapes", 19, "road", (128, 64, 128)),
                                                  ("ade20k", 150, "wall", (120, 120, 120))])
def test_segmentation_palettes_are_the_datasets_own_and_distinct(dataset, n, cls, rgb):
    from dnc.data.segmentation import ADE20K_CLASSES, CITYSCAPES_CLASSES
    from dnc.report import palette
    names = {"camvid": CAMVID_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "ade20k": ADE20K_CLASSES}[dataset]
    colours = palette(n, dataset)
    assert colours.shape == (n, 3) and len(names) == n
    assert tuple(colours[names.index(cls)].tolist()) == rgb
    assert len({tuple(c) for c in colours.tolist()}) == n - (dataset == "ade20k")  # MMSeg's ADE20K repeats one grey
    generated = palette(7, "camvid")  # another class count: distinct generated colours
    assert len({tuple(c) for c in generated.tolist()}) == 7
