"""Segmentation datasets (official layouts written under tmp_path) and joint transforms."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dnc.data.segmentation import (
    ADE20K, CAMVID_CLASSES, CITYSCAPES_CLASSES, ADE20K_CLASSES, CamVid, Cityscapes, SegFolder,
    build_seg_dataset, check_masks,
)
from dnc.data.seg_transforms import (
    PhotoMetricDistortion, RandomCrop, build_seg_transforms, hsv_to_rgb, rescale_size, rgb_to_hsv,
    seg_collate,
)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(h=12, w=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ade(root: Path, masks) -> Path:
    base = root / "ADEChallengeData2016"
    for i, mask in enumerate(masks):
        name = f"ADE_train_{i:08d}"
        _save(base / "images" / "training" / f"{name}.jpg", _image(*mask.shape, seed=i))
        _save(base / "annotations" / "training" / f"{name}.png", mask.astype(np.uint8))
    return root


# ------------------------------------------------------------------------------------ datasets
def test_ade20k_reduces_zero_label(tmp_path):
    mask = np.array([[0, 1, 150, 255]] * 3, dtype=np.uint8)
    ds = ADE20K(_ade(tmp_path, [mask]), "train")
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 3, 4)
    assert isinstance(target, tv_tensors.Mask) and target.dtype == torch.int64
    assert target[0].tolist() == [255, 0, 149, 255]
    assert ds.num_classes == 150 and len(ds.classes) == 150 and ds.classes[0] == "wall"
    assert ds.ignore_index == 255 and len(ds.files) == 1
    # root may also be the ADEChallengeData2016 folder itself
    assert len(ADE20K(tmp_path / "ADEChallengeData2016", "training")) == 1
    with pytest.raises(FileNotFoundError, match="validation"):
        ADE20K(tmp_path, "val")


def test_cityscapes_official_layout(tmp_path):
    for city, frame in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]:
        _save(tmp_path / "leftImg8bit" / "train" / city / f"{frame}_leftImg8bit.png", _image(8, 16))
        _save(tmp_path / "gtFine" / "train" / city / f"{frame}_gtFine_labelTrainIds.png",
              np.full((8, 16), 18, np.uint8))
        # the other gtFine files of the official layout must not be picked up
        _save(tmp_path / "gtFine" / "train" / city / f"{frame}_gtFine_labelIds.png", np.full((8, 16), 33, np.uint8))
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2 and ds.classes == list(CITYSCAPES_CLASSES) and ds.num_classes == 19
    assert ds.files[0][1].name == "aachen_000000_000019_gtFine_labelTrainIds.png"
    assert ds[1][1].unique().tolist() == [18]
    check_masks(ds)


def test_camvid_void_is_ignored(tmp_path):
    _save(tmp_path / "train" / "images" / "a.jpg", _image(4, 6))
    _save(tmp_path / "train" / "labels" / "a.png", np.array([[0, 5, 10, 11, 11, 3]] * 4, np.uint8))
    ds = CamVid(tmp_path, "train")
    assert ds.classes == list(CAMVID_CLASSES) and ds.num_classes == 11
    assert ds[0][1][0].tolist() == [0, 5, 10, 255, 255, 3]
    assert len(build_seg_dataset("camvid", tmp_path, "train")) == 1


def test_a_class_subset_renumbers_kept_classes_and_ignores_or_marks_the_others(tmp_path):
    """MMSeg's ``classes=``: kept classes in the order given, left-out classes ignored (or marked), void ignored."""
    from dnc.data.segmentation import LEFT_OUT_INDEX
    _save(tmp_path / "train" / "images" / "a.jpg", _image(2, 6))
    _save(tmp_path / "train" / "labels" / "a.png", np.array([[0, 1, 8, 9, 11, 3]] * 2, np.uint8))
    ds = build_seg_dataset("camvid", tmp_path, "train", classes=["road", "sky", "building"])
    assert ds.classes == ["road", "sky", "building"] and ds.num_classes == 3
    assert ds.left_out == [c for c in CAMVID_CLASSES if c not in ("road", "sky", "building")]
    assert ds[0][1][0].tolist() == [1, 2, 255, 255, 255, 0]
    check_masks(ds)
    marked = CamVid(tmp_path, "train").select_classes(["road", "sky", "building"], LEFT_OUT_INDEX)
    assert marked[0][1][0].tolist() == [1, 2, LEFT_OUT_INDEX, LEFT_OUT_INDEX, 255, 0]
    with pytest.raises(ValueError, match="'lane' is not a class"):
        build_seg_dataset("camvid", tmp_path, "train", classes=["sky", "lane"])
    with pytest.raises(ValueError, match="each class once"):
        build_seg_dataset("camvid", tmp_path, "train", classes=["sky", "sky"])
    with pytest.raises(ValueError, match="unknown option 'reduce_zero_label'"):
        build_seg_dataset("camvid", tmp_path, "train", reduce_zero_label=True)


def test_segfolder_pairs_by_stem_and_names_missing_mask(tmp_path):
    _save(tmp_path / "img" / "b.jpg", _image())
    _save(tmp_path / "ann" / "b_mask.png", np.zeros((12, 16), np.uint8))
    _save(tmp_path / "img" / "a.jpg", _image())
    with pytest.raises(FileNotFoundError, match=r"a\.jpg: mask not found"):
        SegFolder(tmp_path / "img", tmp_path / "ann", ".jpg", "_mask.png", num_classes=2)
    _save(tmp_path / "ann" / "a_mask.png", np.ones((12, 16), np.uint8))
    ds = SegFolder(tmp_path / "img", tmp_path / "ann", ".jpg", "_mask.png", num_classes=2, classes=["x", "y"])
    assert [p.name for p, _ in ds.files] == ["a.jpg", "b.jpg"] and ds.classes == ["x", "y"]
    assert ds[0][1].unique().tolist() == [1] and ds[1][1].unique().tolist() == [0]


def test_label_map_dict_and_lut(tmp_path):
    _save(tmp_path / "img" / "a.jpg", _image(2, 3))
    _save(tmp_path / "ann" / "a.png", np.array([[7, 8, 9], [9, 8, 255]], np.uint8))
    by_dict = SegFolder(tmp_path / "img", tmp_path / "ann", ".jpg", ".png", num_classes=2,
                        label_map={7: 0, 8: 1, 9: 255})
    lut = np.full(256, 255)
    lut[[7, 8]] = [0, 1]
    by_lut = SegFolder(tmp_path / "img", tmp_path / "ann", ".jpg", ".png", num_classes=2, label_map=lut)
    expected = [[0, 1, 255], [255, 1, 255]]
    assert by_dict[0][1].tolist() == expected and by_lut[0][1].tolist() == expected
    # label_map applies after reduce_zero_label: raw 8 -> 7 -> 0
    both = SegFolder(tmp_path / "img", tmp_path / "ann", ".jpg", ".png", num_classes=2, reduce_zero_label=True,
                     label_map={7: 0, 8: 1})
    assert both[0][1].tolist() == [[6, 0, 1], [1, 0, 255]]


@pytest.mark.timeout(120)  # DataLoader worker processes
def test_check_masks_names_first_bad_file(tmp_path):
    good = np.array([[1, 2], [0, 255]], np.uint8)
    bad = np.array([[1, 200], [0, 255]], np.uint8)  # 200 -> 199 after reduce_zero_label
    root = _ade(tmp_path, [good, bad, bad])
    ds = ADE20K(root, "train")
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"ADE_train_00000001\.png: value\(s\) \[199\] are neither a class "
                                             r"\(0\.\.149\) nor the ignore index 255"):
            check_masks(ds, num_workers=workers)
    check_masks(torch.utils.data.Subset(ds, [0]))


def test_unreadable_image_and_size_mismatch(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"not a jpeg")
    _save(tmp_path / "ann" / "a.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "img" / "b.jpg", _image(5, 4))
    _save(tmp_path / "ann" / "b.png", np.zeros((4, 4), np.uint8))
    ds = SegFolder(tmp_path / "img", tmp_path / "ann", ".jpg", ".png", num_classes=1)
    with pytest.raises(ValueError, match=r"a\.jpg: cannot read image"):
        ds[0]
    with pytest.raises(ValueError, match=r"b\.jpg: image is \(5, 4\) \(H, W\) but its mask .*b\.png is \(4, 4\)"):
        ds[1]


def test_build_seg_dataset_folder_and_errors(tmp_path):
    _save(tmp_path / "img_dir" / "val" / "a.jpg", _image())
    _save(tmp_path / "ann_dir" / "val" / "a.png", np.zeros((12, 16), np.uint8))
    ds = build_seg_dataset("folder", tmp_path, "val", num_classes=3)
    assert len(ds) == 1 and ds.num_classes == 3
    with pytest.raises(ValueError, match="unknown"):
        build_seg_dataset("voc", tmp_path, "val")
    with pytest.raises(ValueError, match="num_classes"):
        build_seg_dataset("folder", tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        build_seg_dataset("ade20k", tmp_path, "trainval")
    assert ADE20K_CLASSES[-1] == "flag" and len(set(ADE20K_CLASSES)) == 150


# ---------------------------------------------------------------------------------- transforms
def _pair(h, w):
    """An image whose red channel encodes the label (label * 20) and its mask."""
    labels = (np.arange(h)[:, None] // 4 + np.arange(w)[None, :] // 4) % 5
    img = np.zeros((3, h, w), np.uint8)
    img[0] = labels * 20
    return tv_tensors.Image(torch.from_numpy(img)), tv_tensors.Mask(torch.from_numpy(labels).long())


def test_rescale_size_fits_scale():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(1024, 2048, (2048, 512)) == (512, 1024)  # short side limits
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)   # long side limits
    assert rescale_size(64, 128, (512, 256)) == (256, 512)       # small images grow


def test_train_transform_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    tf = build_seg_transforms(True, crop_size=(24, 20), scale=None, ratio_range=None, cat_max_ratio=1.0,
                              photometric=False, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    image, mask = _pair(30, 40)
    for _ in range(10):
        x, y = tf(image, mask)
        assert x.shape == (3, 24, 20) and x.dtype == torch.float32 and y.shape == (24, 20) and y.dtype == torch.int64
        assert torch.equal(x[0], y.float() * 20)


def test_train_transform_resizes_pads_and_flips():
    torch.manual_seed(0)
    tf = build_seg_transforms(True, crop_size=(64, 64), scale=(40, 20), ratio_range=(2.0, 2.0), cat_max_ratio=1.0,
                              flip_prob=1.0, photometric=False, mean=(0, 0, 0), std=(1 / 255,) * 3)
    image, mask = _pair(8, 16)
    image[1, :, :8] = 100  # left half marked in green
    x, y = tf(image, mask)   # fits (80, 40) -> 40 x 80, cropped to 40 x 64, padded to 64 x 64
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert (y[40:] == 255).all() and (x[:, 40:] == 0).all()
    assert (y[:40] != 255).all()
    # the nearest-resized mask matches the bilinear image except at block borders
    assert (x[0, :40].round() == y[:40].float() * 20).float().mean() > 0.6
    assert (x[1, :40, -20:] == 100).all()  # flipped: the green left half is now on the right


def test_eval_transform_resizes_image_only():
    tf = build_seg_transforms(False, scale=(32, 16))
    image, mask = _pair(8, 16)
    x, y = tf(image, mask)
    assert x.shape == (3, 16, 32) and y.shape == (8, 16) and torch.equal(y, mask.as_subclass(torch.Tensor))
    expected = (0.0 / 255 - 0.406) / 0.225  # blue channel is 0
    assert torch.allclose(x[2], torch.full_like(x[2], expected))
    assert build_seg_transforms(False, scale=None)(image, mask)[0].shape == (3, 8, 16)


def test_cat_max_ratio_avoids_one_class_crops():
    mask = torch.zeros(100, 100, dtype=torch.long)
    mask[:, 80:] = 1
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))

    def balanced(ratio):
        torch.manual_seed(0)
        crop = RandomCrop((20, 20), cat_max_ratio=ratio)
        hits = 0
        for _ in range(100):
            _, y = crop(image, tv_tensors.Mask(mask))
            hits += int(0.25 < (y == 1).float().mean() < 0.75)
        return hits

    assert balanced(0.75) >= 60 and balanced(1.0) <= 25


def test_photometric_distortion_changes_colours_within_range():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.from_numpy(_image(16, 16)).permute(2, 0, 1).contiguous())
    mask = tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.long))
    pmd = PhotoMetricDistortion()
    outs = [pmd(image, mask) for _ in range(8)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape and m is mask for o, m in outs)
    assert sum(not torch.equal(o, image) for o, _ in outs) >= 6


def test_hsv_round_trip():
    rgb = torch.rand(3, 7, 9)
    rgb[:, 0, 0] = 0.5  # grey pixel: undefined hue
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(rgb_to_hsv(red).flatten(), torch.tensor([0.0, 1.0, 1.0]))


def test_seg_collate_stacks_or_refuses_mixed_sizes():
    a = (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))
    x, y = seg_collate([a, a])
    assert x.shape == (2, 3, 4, 4) and y.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="batch size 1"):
        seg_collate([a, (torch.zeros(3, 5, 4), torch.zeros(5, 4, dtype=torch.long))])
