"""Photos whose EXIF tag says "rotate me" are read upright by the datasets, dnc test, dnc predict and
open-set folders: the same pixels as the physically rotated image."""
import numpy as np
import pytest
import torch
from PIL import Image

from dnc.config import load_config, to_dict
from dnc.data.classification import ImageFolder
from dnc.data.images import ImageList, read_rgb
from dnc.engine import save_checkpoint
from dnc.predict import run_predict
from dnc.tasks import build_model, eval_transform

from openset_tiny import DNC_CFG


def _pair(folder, name="p"):
    """``(upright.png, sideways.jpg)``: a lossless sideways copy whose EXIF orientation 6 turns it upright."""
    rng = np.random.default_rng(0)
    low = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    upright = low.resize((40, 24), Image.BILINEAR)  # smooth (JPEG keeps it), 40 wide, 24 high
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # 24 wide, 40 high; viewers turn it 90 degrees clockwise
    exif = sideways.getexif()
    exif[0x0112] = 6
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / f"{name}_upright.png", folder / f"{name}_sideways.png"  # PNG: lossless, with an eXIf chunk
    upright.save(a)
    sideways.save(b, exif=exif)
    return a, b


def test_read_rgb_applies_the_exif_orientation(tmp_path):
    a, b = _pair(tmp_path)
    assert Image.open(b).size == (24, 40)  # stored sideways
    assert np.array_equal(np.asarray(read_rgb(a)), np.asarray(read_rgb(b)))
    jpg = tmp_path / "photo.jpg"  # and a JPEG, as a phone writes it
    img = Image.open(b)
    img.save(jpg, exif=img.getexif(), quality=100)
    assert read_rgb(jpg).size == (40, 24)
    assert np.abs(np.asarray(read_rgb(jpg), float) - np.asarray(read_rgb(a), float)).mean() < 8


def test_datasets_and_open_set_folders_read_it_upright(tmp_path):
    a, b = _pair(tmp_path / "train" / "cls")
    ds = ImageFolder(tmp_path / "train")
    items = {s[0].rsplit("/", 1)[-1]: torch.as_tensor(ds[i][0]) for i, s in enumerate(ds.samples)}
    assert torch.equal(items[a.name], items[b.name]) and items[a.name].shape == (3, 24, 40)
    cfg = load_config(DNC_CFG, ("data.preset=imagenet", "data.img_size=16"))
    images = ImageList([str(a), str(b)], eval_transform(cfg))
    assert torch.equal(images[0][0], images[1][0])


def test_predict_gives_the_same_record_for_both(tmp_path, capsys):
    cfg = load_config(DNC_CFG, ("model.backbone_kwargs.width=4", "model.backbone_kwargs.num_features=16",
                                "data.preset=imagenet", "data.img_size=16"))
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": build_model(cfg, pretrained="").state_dict(), "config": to_dict(cfg),
                           "ood": {"score": "cosine", "threshold": 0.5, "tpr": 0.95}})
    a, b = _pair(tmp_path / "img")
    ra, rb = run_predict(ckpt, [str(a), str(b)])
    assert ra["top"] == rb["top"] and ra["ood"] == rb["ood"]


@pytest.mark.parametrize("orientation,turn", [(3, Image.Transpose.ROTATE_180), (8, Image.Transpose.ROTATE_270),
                                              (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_other_orientations(tmp_path, orientation, turn):
    upright = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 16, 3), dtype=np.uint8))
    stored = upright.transpose(turn)  # e.g. 8: viewers turn it 90 degrees counter-clockwise, stored turned clockwise
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "s.png", exif=exif)
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "s.png")), np.asarray(upright))
