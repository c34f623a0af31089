"""Tests for the classification data layer (dnc.data.classification, dnc.data.transforms)."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from dnc.data.classification import (CIFAR, Digits, ImageFolder, build_cls_dataset, check_labels, collate,
                                     holdout)
from dnc.data.transforms import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, IMAGENET_MEAN, IMAGENET_STD,
                                 build_cls_transform)


# ------------------------------------------------------------------------------ fixtures
def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official release


def _pixels(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar10_root(tmp_path):
    """A CIFAR-10 python release with 2 images per batch file, labels 0..9 in order."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        labels = [2 * (i - 1), 2 * (i - 1) + 1]
        _dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"labels": labels, b"data": _pixels(2, i),
                                           b"filenames": [b"a.png", b"b.png"]})
    _dump(folder / "test_batch", {b"labels": [7, 3, 1], b"data": _pixels(3, 99)})
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                    b"num_cases_per_batch": 2, b"num_vis": 3072})
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "train", {b"fine_labels": [99, 0, 42], b"coarse_labels": [19, 4, 5], b"data": _pixels(3, 1)})
    _dump(folder / "test", {b"fine_labels": [5], b"coarse_labels": [0], b"data": _pixels(1, 2)})
    _dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return tmp_path


def _write_image(path, size, fmt, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path, fmt)


def _jpeg_bytes(size=(32, 32)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folder_root(tmp_path):
    """root/train/{cat,dog}/ with 4 images each (PNG, JPEG, a grayscale PNG), root/val with 1 each."""
    root = tmp_path / "imgs"
    for split, n in (("train", 4), ("val", 1)):
        for c, name in enumerate(("cat", "dog")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                fmt = ("PNG", "JPEG")[i % 2]
                mode = "L" if i == 2 else "RGB"
                _write_image(d / f"{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}", (20 + i, 10 + c), fmt, mode, i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "._00.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    return root


# ---------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("at_folder", [False, True])
def test_cifar10_reads_pickles(cifar10_root, at_folder):
    root = cifar10_root / "cifar-10-batches-py" if at_folder else cifar10_root
    ds = CIFAR(root, train=True, variant="cifar10")
    assert len(ds) == 10 and ds.targets == list(range(10)) and ds.classes == CIFAR10_NAMES
    image, label = ds[3]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label == 3 and isinstance(label, int)
    # row 1 of data_batch_2, channel-major (R plane, G plane, B plane) like the official files
    assert torch.equal(image, torch.from_numpy(_pixels(2, 2)[1].reshape(3, 32, 32)))
    assert ds.sample_name(3).endswith(os.path.join("cifar-10-batches-py", "data_batch_2") + "[1]")
    test = CIFAR(root, train=False, variant="cifar10", transform=build_cls_transform("cifar", train=False))
    assert test.targets == [7, 3, 1]
    x, _ = test[0]
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 32, 32)


def test_cifar100_uses_fine_labels(cifar100_root):
    ds = CIFAR(cifar100_root, train=True, variant="cifar100")
    assert ds.targets == [99, 0, 42] and len(ds.classes) == 100 and ds.classes[42] == "c42"
    assert len(CIFAR(cifar100_root, train=False, variant="cifar100")) == 1
    check_labels(ds, 100, "cifar100")


def test_cifar_missing_file_names_path(cifar10_root):
    missing = cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR(cifar10_root, train=True)
    CIFAR(cifar10_root, train=False)  # the test split does not need it
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR(cifar10_root, variant="cifar100")


def test_cifar_bad_pickles(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    _dump(folder / "data_batch_4", {b"data": _pixels(2, 4)})
    with pytest.raises(ValueError, match=r"data_batch_4: missing key 'labels'"):
        CIFAR(cifar10_root)
    _dump(folder / "data_batch_4", {b"data": _pixels(2, 4), b"labels": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"data_batch_4: 2 images but 3 labels"):
        CIFAR(cifar10_root)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    _dump(folder / "data_batch_4", {b"data": Evil(), b"labels": [1, 2]})
    with pytest.raises(ValueError, match=r"data_batch_4: not a CIFAR python pickle: refusing to load"):
        CIFAR(cifar10_root)
    (folder / "data_batch_4").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_4: not a CIFAR python pickle"):
        CIFAR(cifar10_root)


# ---------------------------------------------------------------------------- check_labels
def test_check_labels_names_offending_sample(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    _dump(folder / "data_batch_2", {b"labels": [2, 10], b"data": _pixels(2, 2)})
    ds = CIFAR(cifar10_root)
    with pytest.raises(ValueError, match=r"dataset train: sample 3 \(.*data_batch_2\[1\]\) has label 10, "
                                         r"outside \[0, 10\)"):
        check_labels(ds, 10, "train")
    # through a subset, the index is the subset's and the source is still named
    _, val = holdout(ds, 7)
    with pytest.raises(ValueError, match=r"sample 0 \(.*data_batch_2\[1\]\) has label 10"):
        check_labels(val, 10, "val")


def test_check_labels_class_count(folder_root):
    ds = ImageFolder(folder_root / "train")
    check_labels(ds, 2, "train")
    with pytest.raises(ValueError, match="^dataset train has 2 classes but the config says num_classes=10$"):
        check_labels(ds, 10, "train")


# ----------------------------------------------------------------------------- ImageFolder
def test_image_folder_layout_and_decoding(folder_root):
    ds = ImageFolder(folder_root / "train")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0] * 4 + [1] * 4
    assert [os.path.basename(p) for p, _ in ds.samples[:4]] == ["00.png", "01.jpg", "02.png", "03.jpg"]
    for i in (0, 1, 2, 7):
        image, label = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == (3, 10 + label, 20 + i % 4) and label == ds.targets[i]
    gray, _ = ds[2]  # a mode "L" PNG comes back as RGB with equal planes
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(ds[0][0].permute(1, 2, 0), torch.from_numpy(np.array(Image.open(ds.samples[0][0]))))
    assert ds.sample_name(5) == ds.samples[5][0]


def test_image_folder_given_classes(folder_root):
    ds = ImageFolder(folder_root / "train", classes=["dog", "cat"])
    assert ds.classes == ["dog", "cat"] and ds.targets == [0] * 4 + [1] * 4
    assert os.path.basename(os.path.dirname(ds.samples[0][0])) == "dog"
    with pytest.raises(FileNotFoundError, match=r"train[/\\]bird: class folder not found"):
        ImageFolder(folder_root / "train", classes=["cat", "dog", "bird"])
    with pytest.raises(ValueError, match=r"train[/\\]dog: folder is not one of the 1 given classes"):
        ImageFolder(folder_root / "train", classes=["cat"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(folder_root / "nowhere")


def test_symlinks_are_followed_once_and_loops_refused(folder_root):
    """Before the fix ``cat/loop -> ..`` made every dog image a cat too (os.walk(followlinks=True)
    follows the link into the root), and two self-links made the scan run forever."""
    train = folder_root / "train"
    (train / "cat" / "more").symlink_to(folder_root / "val" / "cat", target_is_directory=True)
    (train / "cat" / "again").symlink_to(folder_root / "val" / "cat", target_is_directory=True)
    ds = ImageFolder(train)
    assert ds.targets == [0] * 5 + [1] * 4  # val/cat read once, though two links lead to it
    (train / "cat" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(ValueError, match=f"^{train / 'cat' / 'loop'}: symbolic link loop"):
        ImageFolder(train)
    (train / "cat" / "loop").unlink()
    (train / "dog" / "a").symlink_to(".", target_is_directory=True)
    (train / "dog" / "b").symlink_to(".", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link loop"):
        ImageFolder(train)


@pytest.mark.parametrize("dtype, ext", [(np.uint16, "png"), (np.int32, "tif")])
def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, dtype, ext):
    """PIL's convert('RGB') clips 16-bit values at 255: a 16-bit PNG came out all white."""
    values = np.array([[0, 257, 32896], [65535, 1000, 12850]], dtype=np.uint16)
    path = tmp_path / f"img16.{ext}"
    Image.fromarray(values.astype(dtype)).save(path)
    assert Image.open(path).mode.startswith("I")
    from dnc.data.images import read_rgb
    rgb = np.asarray(read_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[..., 0].tolist() == [[0, 1, 128], [255, 4, 50]] and (rgb[..., 0] == rgb[..., 2]).all()
    Image.fromarray(values.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif: cannot read image: floating-point pixels"):
        read_rgb(tmp_path / "float.tif")


@pytest.mark.parametrize("content", ["truncated", "garbage"])
def test_corrupt_image_errors_or_is_skipped(folder_root, content):
    bad = folder_root / "train" / "dog" / "02_bad.jpg"
    data = _jpeg_bytes()
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else b"\xff\xd8 not really a jpeg" * 10)
    ds = ImageFolder(folder_root / "train")
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(ValueError, match=f"^{bad}: cannot read image: "):
        ds[index]

    tf = build_cls_transform("imagenet", train=False, img_size=16)
    skip = ImageFolder(folder_root / "train", transform=tf, on_bad="skip")
    assert skip[index] is None
    batches = list(DataLoader(skip, batch_size=4, collate_fn=collate))
    assert sum(b[2] for b in batches) == 1
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist() == [0] * 4 + [1] * 4


def test_collate():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    images, labels, skipped = collate([(a, 1), None, (tv_tensors.Image(b), 2), None])
    assert type(images) is torch.Tensor and images.shape == (2, 3, 4, 4) and torch.equal(images[1], b)
    assert labels.tolist() == [1, 2] and labels.dtype == torch.long and skipped == 2
    images, labels, skipped = collate([None, None])
    assert images.numel() == 0 and labels.shape == (0,) and skipped == 2
    with pytest.raises(ValueError, match="different shapes"):
        collate([(a, 0), (torch.zeros(3, 5, 4), 1)])


# ------------------------------------------------------------------------ holdout, factory
def test_holdout_takes_last_n(cifar10_root):
    ds = CIFAR(cifar10_root)
    train, val = holdout(ds, 3)
    assert val.indices == [7, 8, 9] and train.indices == list(range(7))
    assert val.targets == [7, 8, 9] and train.targets == list(range(7))
    assert val.classes == train.classes == CIFAR10_NAMES
    assert torch.equal(val[0][0], ds[7][0]) and val[0][1] == 7
    for bad in (0, 10, 2.5):
        with pytest.raises(ValueError, match="holdout: num_val"):
            holdout(ds, bad)


def test_holdout_per_class_is_proportional():
    class Labels:  # targets only: holdout never decodes an image
        classes = ["a", "b", "c"]
        targets = [0] * 6 + [1] * 3 + [2] * 3

        def __len__(self):
            return len(self.targets)

    train, val = holdout(Labels(), 4, per_class=True)
    assert val.indices == [4, 5, 8, 11] and val.targets == [0, 0, 1, 2]
    assert sorted(train.indices + val.indices) == list(range(12))
    with pytest.raises(ValueError, match="class 'b' has 3 samples"):
        holdout(Labels(), 10, per_class=True)


def test_build_image_folder_splits(folder_root):
    train = build_cls_dataset("imagefolder", folder_root, "train", None)
    val = build_cls_dataset("imagefolder", folder_root, "val", None)
    assert len(train) == 8 and len(val) == 2 and val.classes == train.classes and val.targets == [0, 1]

    ho_train = build_cls_dataset("imagefolder", folder_root, "train", None, holdout=4)
    ho_val = build_cls_dataset("imagefolder", folder_root, "val", None, holdout=4)
    names = [os.path.relpath(ho_val.sample_name(i), folder_root / "train") for i in range(len(ho_val))]
    assert names == [os.path.join("cat", "02.png"), os.path.join("cat", "03.jpg"),
                     os.path.join("dog", "02.png"), os.path.join("dog", "03.jpg")]
    assert ho_val.targets == [0, 0, 1, 1] and len(ho_train) == 4
    assert not set(ho_train.indices) & set(ho_val.indices)

    # root without train/: root itself is the training folder, 'val' needs holdout
    flat = build_cls_dataset("imagefolder", folder_root / "train", "train", None)
    assert len(flat) == 8
    with pytest.raises(FileNotFoundError, match="validation folder not found"):
        build_cls_dataset("imagefolder", folder_root / "train", "val", None)
    # val folders must match train's classes
    (folder_root / "val" / "dog").rename(folder_root / "val" / "wolf")
    with pytest.raises(FileNotFoundError, match=r"val[/\\]dog: class folder not found"):
        build_cls_dataset("imagefolder", folder_root, "val", None)
    with pytest.raises(ValueError, match="unknown option 'holdot'"):
        build_cls_dataset("imagefolder", folder_root, "train", None, holdot=4)
    with pytest.raises(ValueError, match="split: expected 'train' or 'val'"):
        build_cls_dataset("imagefolder", folder_root, "test", None)
    with pytest.raises(ValueError, match="dataset 'mnist' is unknown"):
        build_cls_dataset("mnist", folder_root, "train", None)


def test_build_cifar_splits(cifar10_root, cifar100_root):
    assert len(build_cls_dataset("cifar10", cifar10_root, "val", None)) == 3
    val = build_cls_dataset("cifar10", cifar10_root, "val", None, holdout=4)
    train = build_cls_dataset("cifar10", cifar10_root, "train", None, holdout=4)
    assert val.targets == [6, 7, 8, 9] and train.targets == list(range(6))
    assert build_cls_dataset("cifar100", cifar100_root, "train", None).targets == [99, 0, 42]


# ---------------------------------------------------------------------------------- digits
def test_digits_split():
    train, val = Digits(train=True, seed=0), Digits(train=False, seed=0)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert not set(train.indices) & set(val.indices)
    assert np.array_equal(Digits(train=False, seed=0).indices, val.indices)
    assert not np.array_equal(Digits(train=False, seed=1).indices, val.indices)
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~20% of each ~180-digit class
    assert train.classes == [str(d) for d in range(10)]
    image, label = val[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[2]) and int(image.max()) > 200 and label == val.targets[0]
    assert build_cls_dataset("digits", None, "val", None, seed=0).indices.tolist() == val.indices.tolist()
    with pytest.raises(ValueError, match="val_fraction"):
        Digits(val_fraction=1.5)


# ------------------------------------------------------------------------------ transforms
_INPUTS = {  # (input size, expected output size) per preset
    "cifar": ((32, 32), (32, 32)),
    "imagenet": ((375, 500), (224, 224)),
    "swin": ((375, 500), (224, 224)),
    "digits": ((8, 8), (8, 8)),
    "none": ((40, 60), (40, 60)),
}


@pytest.mark.parametrize("preset", list(_INPUTS))
@pytest.mark.parametrize("train", [True, False])
def test_transform_presets(preset, train):
    torch.manual_seed(0)
    (h, w), out = _INPUTS[preset]
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    tf = build_cls_transform(preset, train)
    for _ in range(3):
        x = tf(image)
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, *out)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert tf(pil).shape == (3, *out)


def test_transform_values_and_sizes():
    const = tv_tensors.Image(torch.full((3, 32, 32), 200, dtype=torch.uint8))
    x = build_cls_transform("cifar", False)(const)
    expected = (200 / 255 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-5)
    x = build_cls_transform("cifar", False, mean=CIFAR100_MEAN)(const)
    assert torch.allclose(x[:, 0, 0], (200 / 255 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR10_STD), atol=1e-5)
    # train: padding 4 with zeros shows up as -mean/std at some corner over a few draws
    torch.manual_seed(0)
    corners = torch.stack([build_cls_transform("cifar", True)(const)[:, 0, 0] for _ in range(20)])
    pad = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    assert any(torch.allclose(c, pad, atol=1e-5) for c in corners)
    x = build_cls_transform("imagenet", False)(tv_tensors.Image(torch.full((3, 300, 400), 255, dtype=torch.uint8)))
    assert torch.allclose(x[:, 100, 100], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD), atol=1e-4)
    # eval: short side to 256 (a no-op for height 256), then the centre 224: columns 144..367 of 512
    ramp = tv_tensors.Image((torch.arange(512) // 2).to(torch.uint8).expand(3, 256, 512).clone())
    x = build_cls_transform("imagenet", False)(ramp)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], (72 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD), atol=1e-4)
    big = tv_tensors.Image(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))
    assert build_cls_transform("imagenet", False, img_size=160)(big).shape == (3, 160, 160)
    assert build_cls_transform("swin", True, img_size=96, interpolation="bilinear")(big).shape == (3, 96, 96)
    assert build_cls_transform("cifar", True, img_size=64)(const).shape == (3, 64, 64)
    assert build_cls_transform("digits", True, img_size=32)(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape == (3, 32, 32)
    d = build_cls_transform("digits", False)(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert torch.all(d == -1.0)
    x = build_cls_transform("none", True)(const)
    assert torch.allclose(x, torch.full((3, 32, 32), 200 / 255))


def test_swin_random_erasing_fills_with_noise():
    tf = build_cls_transform("swin", True)
    (erase,) = [t for t in tf.transforms if isinstance(t, v2.RandomErasing)]
    assert erase.p == 0.25
    erase.p = 1.0
    torch.manual_seed(0)
    out = erase(torch.zeros(3, 224, 224))
    erased = out[out != 0]
    assert erased.numel() >= 0.02 * out.numel() and erased.std() > 0.5  # N(0, 1) noise, not a constant


def test_transform_bad_arguments():
    with pytest.raises(ValueError, match="preset 'resnet' is unknown"):
        build_cls_transform("resnet", True)
    with pytest.raises(ValueError, match="preset 'none' takes no img_size"):
        build_cls_transform("none", True, img_size=32)
    with pytest.raises(ValueError, match="mean: expected 3 values"):
        build_cls_transform("cifar", True, mean=(0.5,))
    with pytest.raises(ValueError, match="interpolation: unknown mode 'cubic'"):
        build_cls_transform("imagenet", True, interpolation="cubic")
