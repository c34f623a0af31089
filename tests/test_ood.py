"""Open-set rejection: metrics against scikit-learn, dnc test --ood, dnc calibrate, predict's verdicts."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from dnc.cli import main
from dnc.config import Config, from_dict, load_config, to_dict
from dnc.engine import load_checkpoint, save_checkpoint
from dnc.ood import (apply_threshold, auroc, default_score, fpr_at_tpr, image_scores, knn_scores, pixel_outputs,
                     pixel_scores, save_score_map, score_loader, subcentroid_energy, threshold_at_tpr, verdict_text)
from dnc.tasks import build_model

from openset_tiny import DNC_CFG, LINEAR_CFG, overrides, train, write_digits


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auroc_and_fpr95_equal_scikit_learn(seed, ties):
    g = torch.Generator().manual_seed(seed)
    known, unknown = torch.randn(200, generator=g) + 1, torch.randn(97, generator=g)
    if ties:  # coarse scores: many ties within and across the two sets
        known, unknown = known.mul(2).round() / 2, unknown.mul(2).round() / 2
    y = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    s = np.r_[known.numpy(), unknown.numpy()]
    assert auroc(known, unknown) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr_at_tpr(known, unknown, 0.95)[0] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)


def test_threshold_keeps_the_fraction_asked_for():
    scores = torch.arange(100.0)
    t = threshold_at_tpr(scores, 0.95)
    assert t == 5.0 and (scores >= t).float().mean() == 0.95            # the largest such threshold
    assert threshold_at_tpr(scores, 1.0) == 0.0
    assert threshold_at_tpr(scores) == 5.0 and fpr_at_tpr(scores, scores + 50)[1] == 5.0  # 95% by default
    assert fpr_at_tpr(scores, scores + 50, 0.5) == (1.0, 50.0)
    assert threshold_at_tpr(scores, 0.001) == 99.0                        # a tiny fraction keeps the top one
    for tpr in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"--tpr must be in \\(0, 1\\], got {tpr}"):
            threshold_at_tpr(scores, tpr)
    with pytest.raises(ValueError, match="a threshold needs at least one known sample"):
        threshold_at_tpr(torch.empty(0))
    with pytest.raises(ValueError, match="known and unknown"):
        auroc(scores, torch.empty(0))
    for known, unknown in ((torch.tensor([1.0, float("nan")]), scores), (scores, torch.tensor([float("inf")]))):
        with pytest.raises(ValueError, match="open-set metrics: a score is NaN or infinite"):
            auroc(known, unknown)


@pytest.mark.parametrize("head", ["dnc", "linear"])
def test_image_scores_are_the_max_subcentroid_cosine_and_the_named_functions_of_the_logits(head):
    cfg = load_config(DNC_CFG, ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16",
                                f"model.head={head}"))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained="").eval()
    x = torch.randn(5, 3, 8, 8)
    logits, scores = image_scores(model, x)
    torch.testing.assert_close(logits, model(x))
    want = {"msp": logits.softmax(1).amax(1), "maxlogit": logits.amax(1), "energy": logits.logsumexp(1)}
    if head == "dnc":  # the cosine before the temperature, and the soft maximum over the sub-centroids
        with torch.no_grad():
            z = model.head.embed(model.features(x))
        sims = torch.einsum("nd,ckd->nck", z, model.head.centroids.centroids)
        want.update(cosine=sims.flatten(1).amax(1), subenergy=subcentroid_energy(sims, model.head.temperature))
    assert set(scores) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(scores[name], value, msg=name)


def _fp32_scores(config, ckpt, root, files) -> dict:
    """``image_scores`` of image files in fp32, with the evaluation transform of the config."""
    from torchvision.transforms.v2 import functional as TF

    from dnc.data.images import read_rgb
    from dnc.tasks import eval_transform
    cfg = load_config(config, tuple(overrides(root)))
    model = build_model(cfg, pretrained="")
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    tf = eval_transform(cfg)
    return image_scores(model.eval(), torch.stack([tf(TF.to_image(read_rgb(p))) for p in files]))[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_digits(tmp_path_factory.mktemp("digits"))
    work = tmp_path_factory.mktemp("work")
    return root, train(DNC_CFG, work / "dnc", root), train(LINEAR_CFG, work / "linear", root)


@pytest.mark.end_to_end
def test_test_ood_reports_auroc_fpr95_and_threshold_per_head(models, tmp_path):
    root, dnc, linear = models
    results = {}
    for name, cfg, ckpt in (("dnc", DNC_CFG, dnc), ("linear", LINEAR_CFG, linear)):
        out = tmp_path / f"{name}.json"
        assert main(["test", cfg, str(ckpt), "--ood", str(root / "unknown"), "--ood", str(root / "new" / "9"),
                     "--out", str(out), *overrides(root)]) == 0
        results[name] = json.loads(out.read_text())
    dnc_ood = results["dnc"]["ood"][str(root / "unknown")]
    assert dnc_ood["images"] == 80 and set(dnc_ood) == {"images", "cosine", "subenergy", "msp", "maxlogit", "energy"}
    assert set(results["linear"]["ood"][str(root / "unknown")]) == {"images", "msp", "maxlogit", "energy"}
    assert results["dnc"]["ood"][str(root / "new" / "9")]["images"] == 50
    # every number is that of the fp32 scores of the same images, computed here with scikit-learn
    val = sorted(str(p) for p in (root / "known" / "val").rglob("*.png"))
    for name, cfg, ckpt in (("dnc", DNC_CFG, dnc), ("linear", LINEAR_CFG, linear)):
        known = _fp32_scores(cfg, ckpt, root, val)
        for folder in (root / "unknown", root / "new" / "9"):
            unknown = _fp32_scores(cfg, ckpt, root, sorted(str(p) for p in folder.rglob("*.png")))
            for kind, m in results[name]["ood"][str(folder)].items():
                if kind == "images":
                    continue
                y = np.r_[np.ones(len(known[kind])), np.zeros(len(unknown[kind]))]
                auc = 100 * roc_auc_score(y, np.r_[known[kind].numpy(), unknown[kind].numpy()])
                t = threshold_at_tpr(known[kind], 0.95)
                assert m["auroc"] == pytest.approx(auc, abs=1e-3), (name, folder, kind)
                assert m["threshold"] == pytest.approx(t, abs=1e-5), (name, folder, kind)
                assert m["fpr95"] == pytest.approx(100 * float((unknown[kind] >= t).double().mean()), abs=1e-3)
    assert dnc_ood["cosine"]["auroc"] > 60  # unseen digits do look less like any known digit
    assert results["dnc"]["top1"] > 80     # the model is trained, and the accuracy is still reported


@pytest.mark.end_to_end
def test_test_ood_knn_is_the_kth_neighbour_among_the_training_features(models, tmp_path, capsys):
    """``--knn K``: every head also gets ``knn``, the cosine of an image's backbone features to its K-th nearest
    training image (all of them here: fewer than the bank's 20,000); ``--knn`` alone is refused."""
    from torchvision.transforms.v2 import functional as TF

    from dnc.data.images import read_rgb
    from dnc.tasks import build_eval_split, eval_transform
    root, _, linear = models
    out = tmp_path / "r.json"
    assert main(["test", LINEAR_CFG, str(linear), "--ood", str(root / "unknown"), "--knn", "3", "--out", str(out),
                 *overrides(root)]) == 0
    got = json.loads(out.read_text())["ood"][str(root / "unknown")]["knn"]
    cfg = load_config(LINEAR_CFG, tuple(overrides(root)))
    model = build_model(cfg, pretrained="")
    model.load_state_dict(load_checkpoint(linear)["model"])
    model.eval()
    tf = eval_transform(cfg)
    train = build_eval_split(cfg, "train")[0]

    def unit(images):
        with torch.no_grad():
            return torch.nn.functional.normalize(model.features(torch.stack(images)), dim=1)
    bank = unit([train[i][0] for i in range(len(train))])
    val = unit([tf(TF.to_image(read_rgb(f))) for f in sorted((root / "known" / "val").rglob("*.png"))])
    unknown = unit([tf(TF.to_image(read_rgb(f))) for f in sorted((root / "unknown").rglob("*.png"))])
    assert got["auroc"] == pytest.approx(100 * auroc(knn_scores(val, bank, 3), knn_scores(unknown, bank, 3)), abs=1e-3)
    capsys.readouterr()
    assert main(["test", LINEAR_CFG, str(linear), "--knn", "3", *overrides(root)]) == 1
    assert "give --ood DIR or --ood-pixels too" in capsys.readouterr().err


@pytest.mark.end_to_end
@pytest.mark.parametrize("make", ["missing", "empty"])
def test_test_ood_rejects_a_missing_or_empty_folder(models, tmp_path, capsys, make):
    root, dnc, _ = models
    folder = tmp_path / "ood"
    if make == "empty":
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "notes.txt").write_text("no image here")
    capsys.readouterr()
    assert main(["test", DNC_CFG, str(dnc), "--ood", str(folder), "--out", str(tmp_path / "r.json"), *overrides(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err
    assert ("not found" if make == "missing" else "no images") in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.end_to_end
def test_calibrate_then_predict_says_unknown_below_the_threshold(models, tmp_path, capsys):
    root, dnc, _ = models
    cal = tmp_path / "cal.pt"
    assert main(["calibrate", DNC_CFG, str(dnc), "--tpr", "0.9", "--out", str(cal), *overrides(root)]) == 0
    ckpt = load_checkpoint(cal)
    ood = ckpt["ood"]
    assert ood["score"] == "cosine" and ood["tpr"] == 0.9 and ood["kept"] >= 0.9 and ood["val_images"] == 120
    assert torch.equal(ckpt["model"]["head.centroids.centroids"], load_checkpoint(dnc)["model"]["head.centroids.centroids"])
    # the calibrated checkpoint still loads for dnc test
    assert main(["test", DNC_CFG, str(cal), *overrides(root)]) == 0

    known = sorted((root / "known" / "val" / "0").glob("*.png"))[:3]
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(noise)
    from dnc.predict import run_predict
    capsys.readouterr()
    recs = run_predict(cal, [str(p) for p in known] + [str(noise)], topk=2, device="cpu")
    lines = capsys.readouterr().out.strip().splitlines()
    for rec, line in zip(recs, lines):
        v = rec["ood"]
        assert v["kind"] == "cosine" and v["unknown"] == (v["score"] < ood["threshold"])
        assert ("unknown (cosine" if v["unknown"] else "known (cosine") in line
    # the verdict follows the score: a threshold above every score makes all of them unknown
    high = dict(ckpt, ood=dict(ood, threshold=2.0))
    verdicts = apply_threshold({"cosine": torch.tensor([0.3, 0.99])}, high)
    assert [v["unknown"] for v in verdicts] == [True, True]
    assert apply_threshold({"cosine": torch.tensor([0.3])}, {}) is None


@pytest.mark.end_to_end
def test_calibrate_refuses_to_overwrite_its_input_and_a_bad_score(models, capsys):
    root, dnc, _ = models
    before = dnc.read_bytes()
    assert main(["calibrate", DNC_CFG, str(dnc), "--out", str(dnc), *overrides(root)]) == 1
    assert "is an input of this command" in capsys.readouterr().err
    assert main(["calibrate", DNC_CFG, str(dnc), "--out", str(dnc) + "2", "--score", "logits", *overrides(root)]) == 1
    assert "--score 'logits'" in capsys.readouterr().err
    assert dnc.read_bytes() == before


def _tiny_segmenter(num_classes: int, k: int) -> tuple:
    """``(cfg, model)``: a ResNet-18 FCN segmenter with a DNC head of ``k`` sub-centroids, seeded, in eval mode."""
    cfg = from_dict(Config, {"task": "segmentation", "data": {"dataset": "camvid", "num_classes": num_classes, "scale": None},
                             "model": {"backbone": "resnet18", "decoder": "fcn", "decoder_channels": 16,
                                       "dnc": {"num_subcentroids": k}}, "train": {"iters": 1}})
    torch.manual_seed(0)
    return cfg, build_model(cfg, pretrained="").eval()


def test_pixel_scores_of_every_kind_and_the_report_without_left_out_pixels():
    """``pixel_score_maps``: the default map is ``pixel_outputs``'s, the logit scores are those of the upsampled
    logits; a split without a pixel of the left-out classes is refused by name."""
    from dnc.data.segmentation import LEFT_OUT_INDEX
    from dnc.ood import pixel_ood_report, pixel_score_maps
    _, model = _tiny_segmenter(3, 2)
    x = torch.randn(2, 3, 32, 40)
    maps = pixel_score_maps(model, x, (30, 36))
    logits, _, cosine = pixel_outputs(model, x, (30, 36))
    up = torch.nn.functional.interpolate(logits, size=(30, 36), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps["cosine"], cosine)
    torch.testing.assert_close(maps["energy"], up.logsumexp(1))
    assert maps["subenergy"].shape == (2, 30, 36) and (maps["subenergy"] >= maps["cosine"] - 1e-6).all()
    masks = torch.zeros(2, 30, 36, dtype=torch.long)
    with pytest.raises(ValueError, match=r"no pixel of the left-out classes \(car, pedestrian\)"):
        pixel_ood_report(model, [(x, masks)], ["car", "pedestrian"], torch.device("cpu"))
    masks[:, :5] = LEFT_OUT_INDEX
    report = pixel_ood_report(model, [(x, masks)], ["car", "pedestrian"], torch.device("cpu"))
    assert report["pixels"] == {"known": 2 * 25 * 36, "unknown": 2 * 5 * 36}


def test_segmenter_score_map_and_predict_writes_it(tmp_path):
    cfg, model = _tiny_segmenter(4, 3)
    x = torch.randn(2, 3, 48, 64)
    score = pixel_scores(model, x, (40, 52))
    with torch.no_grad():
        feats = model.decoder(model.encoder(x))
    z = torch.nn.functional.normalize(model.head.head.feat_norm(feats.permute(0, 2, 3, 1)), dim=-1)
    low = torch.einsum("bhwd,ckd->bhwck", z, model.head.head.centroids.centroids).flatten(3).amax(-1)
    expected = torch.nn.functional.interpolate(low[:, None], size=(40, 52), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(score, expected)
    logits, labels, _ = pixel_outputs(model, x, (40, 52))
    up = torch.nn.functional.interpolate(logits, size=(40, 52), mode="bilinear", align_corners=False)
    assert torch.equal(labels, up.argmax(1))

    linear = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="linear")), pretrained="").eval()
    logits, labels, score = pixel_outputs(linear, x, (40, 52))
    up = torch.nn.functional.interpolate(logits, size=(40, 52), mode="bilinear", align_corners=False)
    torch.testing.assert_close(score, up.softmax(1).amax(1))          # a linear head: the max softmax
    assert torch.equal(labels, up.argmax(1)) and labels.shape == (2, 40, 52)
    save_score_map(torch.tensor([[-0.5, 0.0, 0.2], [0.5, 1.0, 1.7]]), tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as img:                         # [0, 1] to 0-255, the rest clipped
        assert img.mode == "L" and np.asarray(img).tolist() == [[0, 0, 51], [128, 255, 255]]

    save_checkpoint(tmp_path / "seg.pt", {"model": model.state_dict(), "config": to_dict(cfg), "classes": list("abcd")})
    Image.fromarray(torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8).numpy()).save(tmp_path / "street.png")
    assert main(["predict", str(tmp_path / "seg.pt"), str(tmp_path / "street.png"), "--pictures", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "street_score.png") as img:
        assert img.mode == "L" and img.size == (52, 40)


@pytest.mark.end_to_end
def test_calibrate_test_ood_and_predict_give_the_same_score_for_the_same_image(models, tmp_path, capsys):
    """One precision for every open-set score (docs/ALGORITHM.md, "Precision"): with ``train.amp=bf16``,
    ``dnc calibrate`` and ``dnc test --ood`` score the validation images in fp32, as ``dnc predict`` does,
    so the threshold calibrated on them is the one ``predict``'s own scores of the same images give
    (scored under bf16 autocast they differed by up to 3e-3)."""
    from dnc.predict import run_predict
    root, dnc, _ = models
    bf16 = [*overrides(root), "train.amp=bf16"]
    cal = tmp_path / "cal.pt"
    assert main(["calibrate", DNC_CFG, str(dnc), "--tpr", "0.95", "--out", str(cal), *bf16]) == 0
    threshold = load_checkpoint(cal)["ood"]["threshold"]
    out = tmp_path / "ood.json"
    assert main(["test", DNC_CFG, str(dnc), "--ood", str(root / "unknown"), "--out", str(out), *bf16]) == 0
    reported = json.loads(out.read_text())["ood"][str(root / "unknown")]["cosine"]["threshold"]
    val = sorted(str(p) for p in (root / "known" / "val").rglob("*.png"))
    capsys.readouterr()
    recs = run_predict(cal, val, topk=1, device="cpu")
    scores = torch.tensor([r["ood"]["score"] for r in recs], dtype=torch.float64)  # rounded to 6 decimals
    assert len(scores) == 120
    assert reported == pytest.approx(threshold, abs=1e-6)
    assert threshold_at_tpr(scores, 0.95) == pytest.approx(threshold, abs=1.5e-6)
    # every image: predict's score equals the fp32 image_scores of the calibrated model
    torch.testing.assert_close(scores, _fp32_scores(DNC_CFG, cal, root, val)["cosine"].double(), atol=1e-6, rtol=0)


def test_knn_score_is_the_kth_neighbour_cosine():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=1)
    z = torch.cat([bank[:5], torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)])
    for k in (1, 7, 50):
        want = (z @ bank.t()).sort(1, descending=True).values[:, k - 1]
        torch.testing.assert_close(knn_scores(z, bank, k, chunk=16), want)
    assert (knn_scores(z[:5], bank, 1) > 1 - 1e-6).all()  # a bank image is its own nearest neighbour
    torch.testing.assert_close(knn_scores(z, bank, 300, chunk=16), (z @ bank.t()).amin(1))  # k = the whole bank
    for k in (0, 301):
        with pytest.raises(ValueError, match=f"k={k} must be in"):
            knn_scores(z, bank, k)


def test_subcentroid_energy_is_a_soft_max_that_counts_nearby_subcentroids():
    sims = torch.tensor([[[0.9, 0.1], [0.2, 0.0]],      # one close sub-centroid
                         [[0.9, 0.85], [0.8, 0.0]]])    # the same max, more close ones
    best = sims.flatten(1).amax(1)
    torch.testing.assert_close(subcentroid_energy(sims, 1e-3), best, atol=1e-3, rtol=0)
    e = subcentroid_energy(sims, 0.1)
    assert (e >= best).all() and e[1] > e[0]
    by_hand = 0.1 * torch.log(torch.exp(sims.double() / 0.1).sum((1, 2)))  # T log sum_ck exp(s / T)
    torch.testing.assert_close(subcentroid_energy(sims.half(), 0.1), by_hand.float(), atol=1e-3, rtol=0)
    assert subcentroid_energy(sims.half(), 0.1).dtype == torch.float32


def test_verdicts_of_a_calibrated_checkpoint_and_their_text():
    scores = {"cosine": torch.tensor([0.3, 0.55, 0.8]), "msp": torch.tensor([0.9, 0.9, 0.9])}
    assert apply_threshold(scores, {}) is None and apply_threshold(scores, {"ood": None}) is None
    verdicts = apply_threshold(scores, {"ood": {"score": "cosine", "threshold": 0.55}})
    assert [v["unknown"] for v in verdicts] == [True, False, False]               # below the threshold only
    assert verdicts[0] == {"unknown": True, "score": 0.3, "threshold": 0.55, "kind": "cosine"}
    assert [verdict_text(v) for v in verdicts[:2]] == ["unknown (cosine 0.300 < 0.550)", "known (cosine 0.550 >= 0.550)"]
    with pytest.raises(ValueError, match="^the checkpoint is calibrated on the 'energy' score, which this model does not give$"):
        apply_threshold(scores, {"ood": {"score": "energy", "threshold": 1.0}})
    assert (default_score("dnc"), default_score("linear")) == ("cosine", "energy")
    assert (default_score("dnc", segmentation=True), default_score("linear", segmentation=True)) == ("cosine", "msp")


def test_score_loader_scores_every_sample_in_order_and_skips_empty_batches():
    cfg = load_config(DNC_CFG, ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16"))
    torch.manual_seed(4)
    model = build_model(cfg, pretrained="").train()
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    batches = [(x[:3], y[:3]), (x[:0], y[:0]), (x[3:], y[3:])]
    scores, labels, preds = score_loader(model, batches, torch.device("cpu"))
    logits, want = image_scores(model.eval(), x)
    assert not model.training and torch.equal(labels, y) and torch.equal(preds, logits.argmax(1))
    assert set(scores) == set(want)
    for name in want:
        torch.testing.assert_close(scores[name], want[name], msg=name)
    assert score_loader(model, [(x[:0], y[:0])], torch.device("cpu"))[0] == {}
