"""Semantic-segmentation datasets: a generic image/mask folder, ADE20K, Cityscapes and CamVid.

Sample representation
    ``dataset[i]`` reads image ``i`` as a ``torchvision.tv_tensors.Image`` (uint8, ``(3, H, W)``,
    RGB) and its mask as a ``tv_tensors.Mask`` (int64, ``(H, W)``) whose values are class indices
    ``0..C-1`` or the ignore index 255, then returns ``transforms(image, mask)`` (or the pair itself
    when ``transforms`` is None). The presets of :mod:`dnc.data.seg_transforms` turn the pair into
    a normalised float32 image and an int64 mask.

Label mapping (MMSegmentation semantics)
    A mask file's raw values are mapped to train ids by one look-up table, applied when the mask is
    read: first ``reduce_zero_label`` (0 -> 255, v -> v - 1 for 1..254, 255 stays 255), then
    ``label_map`` (``{old: new}`` or a LUT with ``lut[old] == new``) on the result. Raw values
    that the table does not cover pass through unchanged, so :func:`check_masks` can report them.

Class subsets (MMSegmentation's ``classes=``)
    :meth:`SegFolder.select_classes` keeps some of a dataset's classes, renumbered in the order given;
    the pixels of the others become the ignore index (unlabelled: neither trained on nor scored), or
    :data:`LEFT_OUT_INDEX` where open-set evaluation scores them as unknown (``dnc test --ood-pixels``).

Every dataset has the attributes ``classes`` (names; class ``i`` is ``classes[i]``),
``num_classes``, ``ignore_index`` (255), ``left_out`` (the names of the classes a subset leaves out)
and ``files`` (list of ``(image path, mask path)``), and ``sample_name(i)`` for error messages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .classification import read_rgb

__all__ = [
    "ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CAMVID_CLASSES",
    "SegFolder", "ADE20K", "Cityscapes", "CamVid",
    "build_label_lut", "read_mask", "check_masks", "build_seg_dataset", "LEFT_OUT_INDEX",
]

IGNORE_INDEX = 255
LEFT_OUT_INDEX = 254  # pixels of a class left out of a subset, where they are asked for (select_classes)

# MMSegmentation's ADE20KDataset order (its 'bed ' has a stray trailing space, dropped here).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
    "pedestrian", "bicyclist",
)

LabelMap = Union[Mapping[int, int], Sequence[int], np.ndarray, torch.Tensor]


# ------------------------------------------------------------------------------ label mapping
def build_label_lut(reduce_zero_label: bool = False, label_map: Optional[LabelMap] = None,
                    ignore_index: int = IGNORE_INDEX) -> Optional[np.ndarray]:
    """One int64 look-up table for ``reduce_zero_label`` followed by ``label_map``, or None.

    The table covers raw values ``0..255`` (and further when ``label_map`` is a longer LUT or has
    larger keys); :func:`read_mask` leaves values beyond it unchanged.
    """
    if not reduce_zero_label and label_map is None:
        return None
    if isinstance(label_map, Mapping):
        if any(int(k) < 0 for k in label_map):
            raise ValueError(f"label_map: keys must be raw mask values >= 0, got {sorted(label_map)}")
        size = max([256] + [int(k) + 1 for k in label_map])
    elif label_map is not None:
        label_map = np.asarray(label_map, dtype=np.int64)
        if label_map.ndim != 1:
            raise ValueError(f"label_map: a LUT must be one-dimensional, got shape {label_map.shape}")
        size = max(256, len(label_map))
    else:
        size = 256
    lut = np.arange(size, dtype=np.int64)
    if reduce_zero_label:  # MMSeg: 0 -> 255, then -1 everywhere, then 254 (the former 255) -> 255
        lut[0] = ignore_index
        lut[1:] -= 1
        lut[lut == ignore_index - 1] = ignore_index
    if isinstance(label_map, Mapping):
        old = np.array([int(k) for k in label_map], dtype=np.int64)
        new = np.array([int(v) for v in label_map.values()], dtype=np.int64)
        table = np.arange(size, dtype=np.int64)
        table[old] = new
        lut = table[lut]
    elif label_map is not None:
        table = np.arange(size, dtype=np.int64)
        table[: len(label_map)] = label_map
        lut = table[lut]
    return lut


def read_mask(path, lut: Optional[np.ndarray] = None) -> np.ndarray:
    """Read a single-channel mask file as int64 ``(H, W)`` and map it through ``lut``.

    Palette PNGs give their palette indices (as in VOC/ADE-style annotations), not colours.
    """
    try:
        with Image.open(path) as img:
            array = np.array(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"{path}: cannot read mask: {err}") from None
    if array.ndim != 2:
        raise ValueError(f"{path}: mask must be single-channel (class ids), got shape {array.shape}")
    array = array.astype(np.int64, copy=False)
    if lut is None:
        return array
    inside = array < len(lut)
    if inside.all():
        return lut[array]
    out = array.copy()
    out[inside] = lut[array[inside]]
    return out


# ------------------------------------------------------------------------------------ datasets
class SegFolder(Dataset):
    """Images and masks in two folders, paired by relative path and stem (MMSeg's custom dataset).

    Every file under ``img_dir`` (searched recursively) whose name ends with ``img_suffix`` is a
    sample; its mask is ``ann_dir / <same relative folder> / <stem + seg_suffix>``, where the stem
    is the file name without ``img_suffix``. For Cityscapes, ``img_suffix='_leftImg8bit.png'``
    and ``seg_suffix='_gtFine_labelTrainIds.png'`` pair ``aachen/x_leftImg8bit.png`` with
    ``aachen/x_gtFine_labelTrainIds.png``.

    Args:
        img_dir, ann_dir: image and mask folders.
        img_suffix, seg_suffix: file-name endings of images and masks (e.g. ``'.jpg'``, ``'.png'``).
        num_classes: number of classes C; valid mask values are ``0..C-1`` and 255.
        classes: C class names (default ``'0'``, ``'1'``, ...).
        reduce_zero_label: raw 0 is "other" -> 255 and the rest shift down by one (ADE20K).
        label_map: ``{old: new}`` or LUT applied after ``reduce_zero_label``.
        transforms: callable ``(image, mask) -> anything``, applied to every sample.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, img_dir, ann_dir, img_suffix: str, seg_suffix: str, num_classes: int,
                 classes: Optional[Sequence[str]] = None, reduce_zero_label: bool = False,
                 label_map: Optional[LabelMap] = None, transforms: Optional[Callable] = None):
        img_dir, ann_dir = Path(img_dir), Path(ann_dir)
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir}: image folder not found")
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"{ann_dir}: annotation folder not found")
        if not 0 < int(num_classes) <= IGNORE_INDEX:
            raise ValueError(f"num_classes: must be in 1..{IGNORE_INDEX}, got {num_classes!r}")
        if classes is None:
            classes = [str(i) for i in range(num_classes)]
        if len(classes) != num_classes:
            raise ValueError(f"classes: {len(classes)} names given for num_classes={num_classes}")

        files: List[Tuple[Path, Path]] = []
        for img in sorted(p for p in img_dir.rglob(f"*{img_suffix}") if p.is_file()):
            rel = img.relative_to(img_dir)
            mask = ann_dir / rel.parent / (rel.name[: -len(img_suffix)] + seg_suffix)
            if not mask.is_file():
                raise FileNotFoundError(f"{img}: mask not found (expected {mask})")
            files.append((img, mask))
        if not files:
            raise FileNotFoundError(f"{img_dir}: no images ending with {img_suffix!r}")

        self.img_dir, self.ann_dir = img_dir, ann_dir
        self.files = files
        self.classes: List[str] = list(classes)
        self.num_classes = int(num_classes)
        self.reduce_zero_label = reduce_zero_label
        self.lut = build_label_lut(reduce_zero_label, label_map, self.ignore_index)
        self.left_out: List[str] = []
        self.left_out_index = IGNORE_INDEX
        self.transforms = transforms

    def select_classes(self, names: Sequence[str], left_out_index: int = IGNORE_INDEX) -> "SegFolder":
        """Keep the classes ``names`` (some of :attr:`classes`, in the order given: MMSeg's ``classes=``):
        their pixels read as ``0..len(names)-1``, the other classes' pixels as ``left_out_index`` (the
        ignore index by default). Returns the dataset, changed in place."""
        names = [str(n) for n in names]
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise ValueError(f"classes: {unknown[0]!r} is not a class of this dataset "
                             f"(its classes: {', '.join(self.classes)})")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"classes: each class once and at least one, got {names}")
        lut = self.lut if self.lut is not None else np.arange(256, dtype=np.int64)
        remap = np.arange(max(256, int(lut.max()) + 1), dtype=np.int64)
        remap[: self.num_classes] = left_out_index
        remap[[self.classes.index(n) for n in names]] = np.arange(len(names))
        self.lut = remap[lut]
        self.left_out, self.left_out_index = [c for c in self.classes if c not in names], left_out_index
        self.classes, self.num_classes = names, len(names)
        return self

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        img_path, mask_path = self.files[index]
        image = F.to_image(read_rgb(img_path))
        mask = tv_tensors.Mask(torch.from_numpy(read_mask(mask_path, self.lut)))
        if image.shape[-2:] != mask.shape:
            raise ValueError(f"{img_path}: image is {tuple(image.shape[-2:])} (H, W) but its mask "
                             f"{mask_path} is {tuple(mask.shape)}")
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask

    def sample_name(self, index: int) -> str:
        """The image path of sample ``index``."""
        return str(self.files[index][0])


def _split_dir(split: str, names: Mapping[str, str], dataset: str) -> str:
    if split not in names:
        raise ValueError(f"{dataset} split: expected one of {', '.join(sorted(set(names)))}, got {split!r}")
    return names[split]


class ADE20K(SegFolder):
    """ADE20K / SceneParse150: ``root/ADEChallengeData2016/{images,annotations}/{training,validation}``.

    ``root`` may also be the ``ADEChallengeData2016`` folder itself. Raw label 0 ("other") is
    ignored and 1..150 become classes 0..149 (``reduce_zero_label``, as in MMSeg).
    """

    def __init__(self, root, split: str = "train", transforms: Optional[Callable] = None):
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        sub = _split_dir(split, {"train": "training", "training": "training",
                                 "val": "validation", "validation": "validation"}, "ADE20K")
        super().__init__(root / "images" / sub, root / "annotations" / sub, ".jpg", ".png",
                         num_classes=150, classes=ADE20K_CLASSES, reduce_zero_label=True,
                         transforms=transforms)


class Cityscapes(SegFolder):
    """Cityscapes fine annotations: ``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 ignored).

    The ``labelTrainIds`` files come from cityscapesScripts' ``createTrainIdLabelImgs``.
    """

    def __init__(self, root, split: str = "train", transforms: Optional[Callable] = None):
        root = Path(root)
        sub = _split_dir(split, {"train": "train", "val": "val", "test": "test"}, "Cityscapes")
        super().__init__(root / "leftImg8bit" / sub, root / "gtFine" / sub, "_leftImg8bit.png",
                         "_gtFine_labelTrainIds.png", num_classes=19, classes=CITYSCAPES_CLASSES,
                         transforms=transforms)


class CamVid(SegFolder):
    """CamVid, 11 classes: ``root/<split>/images/*.jpg`` with ``root/<split>/labels/*.png``.

    Mask values 0..10 are :data:`CAMVID_CLASSES`; 11 (void) is mapped to 255.
    """

    def __init__(self, root, split: str = "train", transforms: Optional[Callable] = None):
        root = Path(root)
        sub = _split_dir(split, {"train": "train", "val": "val", "test": "test"}, "CamVid")
        super().__init__(root / sub / "images", root / sub / "labels", ".jpg", ".png",
                         num_classes=11, classes=CAMVID_CLASSES, label_map={11: IGNORE_INDEX},
                         transforms=transforms)


# --------------------------------------------------------------------------------- validation
class _MaskScan(Dataset):
    """Reads mask ``i``, maps it and returns its values that are neither a class nor one of ``allowed``."""

    def __init__(self, paths: Sequence[Path], lut: Optional[np.ndarray], num_classes: int, allowed: Sequence[int]):
        self.paths, self.lut = list(paths), lut
        self.num_classes, self.allowed = num_classes, list(allowed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> List[int]:
        values = np.unique(read_mask(self.paths[index], self.lut))
        bad = values[((values < 0) | (values >= self.num_classes)) & ~np.isin(values, self.allowed)]
        return bad.tolist()


def check_masks(dataset, num_workers: int = 0) -> None:
    """Check that every mask of ``dataset`` holds only class ids ``0..C-1`` and the ignore index.

    Each mask file is read raw and mapped by the dataset's label mapping (its transforms are not
    applied). Raises ``ValueError`` naming the first bad file (in dataset order). ``dataset`` is a
    :class:`SegFolder` (or subclass), or a ``torch.utils.data.Subset`` of one. With
    ``num_workers > 0`` the files are read by a DataLoader's worker processes.
    """
    indices = None
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    if not isinstance(dataset, SegFolder):
        raise ValueError(f"check_masks: expected a SegFolder dataset, got {type(dataset).__name__}")
    paths = [m for _, m in dataset.files]
    if indices is not None:
        paths = [paths[i] for i in indices]
    scan = _MaskScan(paths, dataset.lut, dataset.num_classes, {dataset.ignore_index, dataset.left_out_index})
    if num_workers > 0:
        results = DataLoader(scan, batch_size=None, num_workers=num_workers)
    else:
        results = (scan[i] for i in range(len(scan)))
    for path, bad in zip(paths, results):
        if bad:
            raise ValueError(f"{path}: value(s) {bad} are neither a class (0..{dataset.num_classes - 1}) "
                             f"nor the ignore index {dataset.ignore_index}")


# ------------------------------------------------------------------------------------ factory
_FOLDER_KEYS = {"img_dir", "ann_dir", "img_suffix", "seg_suffix", "num_classes", "classes",
                "reduce_zero_label", "label_map"}


def build_seg_dataset(name: str, root, split: str = "train", transforms: Optional[Callable] = None,
                      left_out_index: int = IGNORE_INDEX, **kwargs) -> SegFolder:
    """Build the ``split`` of segmentation dataset ``name``.

    ``'ade20k'``, ``'cityscapes'``, ``'camvid'``: the official layouts under ``root``; the one option,
    ``classes``, keeps those classes (:meth:`SegFolder.select_classes`: the others' pixels read as
    ``left_out_index``, by default the ignore index).
    ``'folder'``: :class:`SegFolder` with ``img_dir`` (default ``'img_dir/{split}'``) and
    ``ann_dir`` (default ``'ann_dir/{split}'``, MMSeg's custom layout), both formatted with the
    split and taken relative to ``root`` unless absolute; ``num_classes`` is required, and
    ``img_suffix`` (default ``'.jpg'``), ``seg_suffix`` (``'.png'``), ``classes``,
    ``reduce_zero_label`` and ``label_map`` are passed on.
    """
    name = name.lower()
    named = {"ade20k": ADE20K, "cityscapes": Cityscapes, "camvid": CamVid}
    if name in named:
        unknown = sorted(set(kwargs) - {"classes"})
        if unknown:
            raise ValueError(f"dataset {name!r}: unknown option {unknown[0]!r} (allowed: classes)")
        ds = named[name](root, split, transforms=transforms)
        return ds.select_classes(kwargs["classes"], left_out_index) if kwargs.get("classes") is not None else ds
    if name != "folder":
        raise ValueError(f"dataset {name!r} is unknown (expected one of: {', '.join([*named, 'folder'])})")
    unknown = sorted(set(kwargs) - _FOLDER_KEYS)
    if unknown:
        raise ValueError(f"dataset 'folder': unknown option {unknown[0]!r} "
                         f"(allowed: {', '.join(sorted(_FOLDER_KEYS))})")
    if "num_classes" not in kwargs:
        raise ValueError("dataset 'folder': option 'num_classes' is required")
    root = Path(root)
    img_dir = root / str(kwargs.pop("img_dir", "img_dir/{split}")).format(split=split)
    ann_dir = root / str(kwargs.pop("ann_dir", "ann_dir/{split}")).format(split=split)
    kwargs.setdefault("img_suffix", ".jpg")
    kwargs.setdefault("seg_suffix", ".png")
    return SegFolder(img_dir, ann_dir, transforms=transforms, **kwargs)
