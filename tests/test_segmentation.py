"""The per-pixel DNC head, the segmenter, and segmentation through the CLI on tiny synthetic data."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dnc.cli import main
from dnc.heads import DNCHead, PixelHead
from dnc.models.segmenter import Segmenter


def pixel_head(**kw):
    return PixelHead(DNCHead(8, 3, num_subcentroids=2, momentum=0.5, contrast_weight=0.01, compact_weight=0.001, **kw))


def test_pixel_head_uses_the_shared_core_per_pixel():
    torch.manual_seed(0)
    head = pixel_head().train()
    x = torch.randn(2, 8, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    flat = DNCHead(8, 3, num_subcentroids=2, momentum=0.5, contrast_weight=0.01, compact_weight=0.001).train()
    flat.load_state_dict(head.head.state_dict())
    logits, losses = head(x, y)
    ref_logits, ref_losses = flat(x.permute(0, 2, 3, 1).reshape(-1, 8), y.reshape(-1))
    assert logits.shape == (2, 3, 4, 5)
    torch.testing.assert_close(logits.permute(0, 2, 3, 1).reshape(-1, 3), ref_logits)
    torch.testing.assert_close(head.head.centroids.centroids, flat.centroids.centroids)
    assert losses.keys() == ref_losses.keys()


def test_ignored_pixels_never_enter_loss_or_clustering():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 4, 5, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5))
    y[:, :2] = 255
    head = pixel_head().train()
    start = head.state_dict()
    logits, losses = head(x, y)
    up = F.cross_entropy(logits, y, ignore_index=255)
    (up + sum(losses.values())).backward()
    assert x.grad[:, :, :2].abs().sum() == 0 and x.grad[:, :, 2:].abs().sum() > 0
    after = head.head.centroids.centroids.clone()
    # Changing only the ignored pixels' features leaves the clustering update unchanged.
    x2 = x.detach().clone()
    x2[:, :, :2] = torch.randn_like(x2[:, :, :2]) * 10
    head.load_state_dict(start)
    head(x2, y)
    torch.testing.assert_close(head.head.centroids.centroids, after)


@pytest.mark.parametrize("decoder,head", [("fcn", "dnc"), ("deeplabv3", "linear"), ("upernet", "dnc")])
def test_segmenter_train_step_and_inference(decoder, head):
    torch.manual_seed(2)
    model = Segmenter("resnet18d", 4, decoder, head, decoder_channels=32, output_stride=8, aux_weight=0.4,
                      head_kwargs=dict(num_subcentroids=3) if head == "dnc" else {}).train()
    images, masks = torch.randn(2, 3, 48, 48), torch.randint(0, 4, (2, 48, 48))
    masks[0, :10] = 255
    logits, losses = model(images, masks)
    assert {"ce", "aux"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    out = model(images)
    assert out.shape[:2] == (2, 4) and out.shape[-1] == 48 // (4 if decoder == "upernet" else 8)


def test_transfer_from_a_classification_checkpoint(tmp_path):
    from dnc.engine import save_checkpoint
    from dnc.models.classifier import Classifier
    cls = Classifier("resnet18d", 10, "dnc")
    save_checkpoint(tmp_path / "cls.pt", {"model": cls.state_dict()})
    seg = Segmenter("resnet18d", 4, "fcn", "dnc", pretrained=str(tmp_path / "cls.pt"), decoder_channels=16)
    torch.testing.assert_close(seg.encoder.model.layer3[0].conv1.weight, cls.backbone.layer3[0].conv1.weight)
    # Different architectures are refused with the file named.
    with pytest.raises(ValueError, match="cls.pt"):
        Segmenter("resnet34d", 4, "fcn", "dnc", pretrained=str(tmp_path / "cls.pt"), decoder_channels=16)


def make_camvid(root, n=4, size=(48, 64), car=False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            label = np.zeros(size, np.uint8)
            label[: size[0] // 2] = 3  # "road" on top, "sky" below, some void
            label[:, :5] = 11
            if car:  # and a "car" on the road
                label[4:12, 20:36] = 8
            img = rng.integers(0, 60, size + (3,), dtype=np.uint8) + (label[..., None] == 3) * 150
            Image.fromarray(img.astype(np.uint8)).save(root / split / "images" / f"{i}.jpg")
            Image.fromarray(label).save(root / split / "labels" / f"{i}.png")


def test_camvid_train_and_test_through_the_cli(tmp_path, capsys):
    make_camvid(tmp_path / "camvid")
    work = tmp_path / "work"
    overrides = [f"data.root={tmp_path / 'camvid'}", "data.crop_size=[32,32]", "data.batch_size=2", "data.num_workers=0",
                 "model.decoder_channels=16", "train.iters=6", "train.eval_interval=3", "train.amp=none",
                 "model.backbone=resnet18d"]
    config = "configs/segmentation/camvid/fcn_r18-d8_1x16_176x176_2k_camvid_dnc.yaml"
    assert main(["train", config, "--work-dir", str(work), *overrides]) == 0
    trained = json.loads((work / "metrics.json").read_text())
    assert len(trained["IoU"]) == 11
    present = [v for v in trained["IoU"] if v is not None]  # None: a class in neither masks nor predictions
    assert present and trained["mIoU"] == pytest.approx(sum(present) / len(present))
    assert main(["test", config, str(work / "last.pt"), "--metrics", "mIoU", "--out", str(tmp_path / "r.json"), *overrides]) == 0
    tested = json.loads((tmp_path / "r.json").read_text())
    assert tested["mIoU"] == pytest.approx(trained["mIoU"])


def test_classes_left_out_of_training_are_scored_per_pixel(tmp_path, capsys):
    """``data.dataset_kwargs.classes``: a segmenter trained on sky and road, the car pixels left out;
    ``dnc test --ood-pixels`` scores exactly those pixels against the known ones with every score."""
    from dnc.data.segmentation import CAMVID_CLASSES, LEFT_OUT_INDEX, CamVid
    from dnc.engine import load_checkpoint
    from dnc.ood import auroc, feature_bank, pixel_score_maps
    from dnc.tasks import _seg_transform, load_trained_model
    from dnc.runconfig import checkpoint_config
    make_camvid(tmp_path / "camvid", n=3, car=True)
    work = tmp_path / "work"
    overrides = [f"data.root={tmp_path / 'camvid'}", "data.crop_size=[32,32]", "data.batch_size=2", "data.num_workers=0",
                 "model.decoder_channels=16", "train.iters=4", "train.eval_interval=4", "train.amp=none",
                 "data.dataset_kwargs.classes=[sky,road]", "data.num_classes=2"]
    config = "configs/segmentation/camvid/fcn_r18-d8_1x16_176x176_2k_camvid_dnc.yaml"
    assert main(["train", config, "--work-dir", str(work), *overrides]) == 0
    assert main(["test", str(work / "last.pt"), "--ood-pixels", "--knn", "3", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["classes"] == ["sky", "road"] and len(result["IoU"]) == 2
    report = result["ood_pixels"]
    assert report["left_out"] == [c for c in CAMVID_CLASSES if c not in ("sky", "road")]
    assert report["pixels"] == {"known": 3 * (48 * 64 - 48 * 5 - 8 * 16), "unknown": 3 * 8 * 16}
    assert set(report["scores"]) == {"cosine", "subenergy", "msp", "maxlogit", "energy", "knn"}
    # the figures are those of the score maps, the car pixels against the sky and road ones
    ckpt = load_checkpoint(work / "last.pt")
    cfg = checkpoint_config(ckpt, work / "last.pt")
    model = load_trained_model(cfg, ckpt, work / "last.pt").eval()
    ds = CamVid(tmp_path / "camvid", "val", _seg_transform(cfg, False)).select_classes(["sky", "road"], LEFT_OUT_INDEX)
    images, masks = map(torch.stack, zip(*(ds[i] for i in range(len(ds)))))
    bank = feature_bank(cfg, model, torch.device("cpu"))  # every known pixel of the 6x8 decoder maps (nearest labels:
    # a void column and 2 car pixels each)
    assert bank.shape == (3 * (6 * 8 - 6 - 2), 16) and torch.allclose(bank.norm(dim=1), torch.ones(len(bank)))
    maps = pixel_score_maps(model, images, masks.shape[-2:], bank, 3)
    for kind in ("cosine", "knn"):
        want = 100 * auroc(maps[kind][masks < 2], maps[kind][masks == LEFT_OUT_INDEX])
        assert report["scores"][kind]["auroc"] == pytest.approx(want, abs=1e-3), kind

    capsys.readouterr()  # a run trained on every class has nothing left out: one error line
    assert main(["test", config, str(work / "last.pt"), "--ood-pixels", *overrides[:-2]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ood-pixels" in err[0] and "data.dataset_kwargs.classes" in err[0]


def test_mask_with_a_stray_value_is_found_before_training(tmp_path, capsys):
    make_camvid(tmp_path / "camvid", n=2)
    bad = tmp_path / "camvid" / "train" / "labels" / "1.png"
    arr = np.array(Image.open(bad))
    arr[0, 0] = 40
    Image.fromarray(arr).save(bad)
    code = main(["train", "configs/segmentation/camvid/fcn_r18-d8_cpu_camvid_dnc.yaml", "--work-dir",
                 str(tmp_path / "w"), f"data.root={tmp_path / 'camvid'}", "data.num_workers=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "1.png" in err[0] and "40" in err[0]
    assert not (tmp_path / "w" / "last.pt").exists()


def make_shapes(root, n_train=24, n_val=8, size=32, seed=0):
    """Images of a noisy grey background (class 0) with a red (1) and a blue (2) rectangle of random size
    and place, and their masks, in the ``folder`` layout (img_dir/ann_dir)."""
    rng = np.random.default_rng(seed)
    colors = {1: (220, 40, 40), 2: (40, 60, 220)}
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            img = rng.integers(90, 160, (size, size, 3)).astype(np.int16)
            for cls in (1, 2):
                h, w = rng.integers(10, 18, 2)
                y, x = rng.integers(0, size - h), rng.integers(0, size - w)
                mask[y:y + h, x:x + w] = cls
            for cls, c in colors.items():
                img[mask == cls] = np.array(c) + rng.integers(-30, 30, (int((mask == cls).sum()), 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img_dir" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i}.png")


def test_a_tiny_dnc_segmenter_learns_colored_shapes(tmp_path):
    """100 steps of the per-pixel DNC recipe (custom/segfolder_dnc.yaml, k-means++ start) with timm's
    ``test_efficientnet`` encoder: mIoU about 60 on held-out images, where predicting the background
    everywhere gives about 25 (its IoU, about 75, over three classes) and one step gives about 21."""
    make_shapes(tmp_path / "shapes")
    over = ["model.backbone=test_efficientnet", "model.pretrained=null", "model.decoder_channels=16",
            "model.dnc.num_subcentroids=2", "model.dnc.init_samples=2000", "data.dataset_kwargs.img_suffix=.png",
            f"data.root={tmp_path / 'shapes'}", "data.num_classes=3", "data.crop_size=[32,32]", "data.scale=null",
            "data.batch_size=4", "data.num_workers=0", "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0",
            "train.iters=100", "train.eval_interval=100", "train.log_interval=50"]
    assert main(["train", "custom/segfolder_dnc.yaml", "--work-dir", str(tmp_path / "work"), *over]) == 0
    m = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert m["mIoU"] > 45 and min(m["IoU"]) > 35, m
