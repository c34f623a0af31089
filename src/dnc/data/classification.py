"""Classification datasets: CIFAR-10/100 (python pickles), image folders, scikit-learn digits.

Image representation
    Every dataset hands its transform a ``torchvision.tv_tensors.Image``: a uint8 tensor of shape
    ``(3, H, W)``, RGB (grayscale digits are replicated to 3 channels). With ``transform=None``
    that is what ``dataset[i]`` returns as the image; the presets of :mod:`dnc.data.transforms`
    turn it into a float32 normalised ``(3, H, W)`` tensor. Using one representation for files
    (decoded with PIL) and in-memory arrays makes the v2 transforms behave the same everywhere.

Every dataset returns ``(image, label)`` with ``label`` an ``int`` (an :class:`ImageFolder` with
``on_bad='skip'`` returns ``None`` for an unreadable file; :func:`collate` drops and counts it),
and has the attributes ``classes`` (list of names; label ``i`` is ``classes[i]``) and ``targets``
(one int label per sample, read without decoding any image). ``sample_name(i)`` says where
sample ``i`` comes from (a file path, or a batch file and row) for error messages.
"""
from __future__ import annotations

import bisect
import os
import pickle
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMG_EXTENSIONS", "read_rgb", "find_files", "CIFAR", "ImageFolder", "Digits", "LabeledSubset",
    "find_classes", "holdout", "check_labels", "collate", "build_cls_dataset",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_rgb(path) -> Image.Image:
    """Decode an image file as 8-bit RGB, upright; any failure is one ``ValueError`` naming the file.

    This is how every command reads an image (datasets, ``dnc test``, ``dnc predict``, ``dnc calibrate``;
    ``examples/onnx_predict.py`` does the same without ``dnc``). The EXIF orientation tag (photos of
    phones and cameras) is applied, so the pixels are those an image viewer shows.
    16-bit grayscale (PIL modes ``I;16*`` and ``I``) is scaled to 8 bits (``round(v / 257)``), where
    PIL's own conversion would clip every value above 255 to white; floating-point images are refused.
    """
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode == "F":
                raise ValueError("floating-point pixels (mode F) are not supported; save it as 8 or 16 bits")
            if img.mode.startswith("I"):
                scaled = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
                return Image.fromarray(scaled, "L").convert("RGB")
            return img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"{path}: cannot read image: {err}") from None


def find_files(folder, extensions: Sequence[str]) -> List[str]:
    """Image files under ``folder``, recursively, sorted; hidden names skipped. Symbolic links to folders
    are followed once (a folder reached twice through links is read once), and a link that leads back
    to a folder being read (a loop, e.g. ``cat/loop -> ..``) is refused with one ``ValueError``."""
    extensions = tuple(e.lower() for e in extensions)
    files, seen = [], {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real, keep = os.path.realpath(dirpath), []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            target = os.path.realpath(os.path.join(dirpath, d))
            if target == real or real.startswith(target.rstrip(os.sep) + os.sep):
                raise ValueError(f"{os.path.join(dirpath, d)}: symbolic link loop (it leads back to {target}); "
                                 f"remove the link")
            if target not in seen:
                seen.add(target)
                keep.append(d)
        dirnames[:] = keep
        files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(extensions)]
    return sorted(files)


# --------------------------------------------------------------------------------------- CIFAR
_CIFAR_LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", labels="labels", names="label_names"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     labels="fine_labels", names="fine_label_names"),
}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, so a crafted CIFAR file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_pickle(path: Path, keys: Sequence[str]) -> dict:
    """Load a CIFAR python pickle as a dict with str keys; check that ``keys`` are present."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a CIFAR python pickle: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR python pickle: expected a dict, got {type(obj).__name__}")
    obj = {_str(k): v for k, v in obj.items()}
    for key in keys:
        if key not in obj:
            raise ValueError(f"{path}: missing key {key!r} (found: {', '.join(sorted(obj))})")
    return obj


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 (fine labels) from the official python-pickle release.

    ``root`` is either the batches folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its
    parent. ``train=True`` reads ``data_batch_1..5`` (CIFAR-10) or ``train`` (CIFAR-100), in that
    order; ``train=False`` reads ``test_batch`` / ``test``. Images are ``tv_tensors.Image`` uint8
    ``(3, 32, 32)``.
    """

    def __init__(self, root, train: bool = True, variant: str = "cifar10", transform: Optional[Callable] = None):
        if variant not in _CIFAR_LAYOUT:
            raise ValueError(f"CIFAR variant {variant!r} is unknown (expected 'cifar10' or 'cifar100')")
        layout = _CIFAR_LAYOUT[variant]
        root = Path(root)
        folder = root / layout["folder"] if (root / layout["folder"]).is_dir() else root
        names = layout["train"] if train else layout["test"]
        for name in names + [layout["meta"]]:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: {variant} file not found "
                                        f"(root must be the {layout['folder']} folder or its parent)")

        data, targets, self._files, self._starts = [], [], [], []
        for name in names:
            path = folder / name
            batch = _load_pickle(path, ("data", layout["labels"]))
            array = np.asarray(batch["data"])
            labels = [int(t) for t in batch[layout["labels"]]]
            if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {array.dtype} {array.shape}")
            if len(labels) != len(array):
                raise ValueError(f"{path}: {len(array)} images but {len(labels)} labels")
            self._files.append(path)
            self._starts.append(len(targets))
            data.append(array.reshape(-1, 3, 32, 32))
            targets.extend(labels)
        meta = _load_pickle(folder / layout["meta"], (layout["names"],))

        self.root = folder
        self.variant = variant
        self.train = train
        self.transform = transform
        self.data = np.concatenate(data)
        self.targets: List[int] = targets
        self.classes: List[str] = [_str(n) for n in meta[layout["names"]]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = tv_tensors.Image(torch.from_numpy(self.data[index].copy()))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def sample_name(self, index: int) -> str:
        """``'<batch file>[<row>]'`` for sample ``index``."""
        k = bisect.bisect_right(self._starts, index) - 1
        return f"{self._files[k]}[{index - self._starts[k]}]"


# -------------------------------------------------------------------------------- ImageFolder
def find_classes(root) -> List[str]:
    """Sorted names of the class folders in ``root`` (sub-folders not starting with '.')."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolder(Dataset):
    """Images stored as ``root/<class>/<file>`` (the ImageNet layout), decoded with PIL.

    Class names are the sorted folder names; label ``i`` is ``classes[i]``. If ``classes`` is
    given, its order fixes the labels and the folders must match it exactly. Files are found
    recursively inside each class folder (:func:`find_files`: symbolic links followed once, loops
    refused), keep only ``extensions`` (case-insensitive), skip hidden names (``.``-prefixed, e.g.
    macOS ``._x.jpg``) and are sorted by path.

    ``__getitem__`` decodes lazily (``PIL.Image.open(...).convert('RGB')``) into a
    ``tv_tensors.Image`` uint8 ``(3, H, W)``. An unreadable file raises
    ``ValueError("<path>: cannot read image: <reason>")`` with ``on_bad='error'``; with
    ``on_bad='skip'`` the sample is ``None``, which :func:`collate` drops and counts.
    """

    def __init__(self, root, transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None,
                 on_bad: str = "error", extensions: Sequence[str] = IMG_EXTENSIONS):
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad: expected 'error' or 'skip', got {on_bad!r}")
        root = Path(root)
        found = find_classes(root)
        if not found:
            raise ValueError(f"{root}: no class folders (expected root/<class>/<image>)")
        if classes is None:
            classes = found
        else:
            classes = [str(c) for c in classes]
            if len(set(classes)) != len(classes):
                dup = next(c for c in classes if classes.count(c) > 1)
                raise ValueError(f"classes: {dup!r} is listed twice")
            for c in classes:
                if c not in found:
                    raise FileNotFoundError(f"{root / c}: class folder not found (class {c!r} is in the given classes)")
            for c in found:
                if c not in classes:
                    raise ValueError(f"{root / c}: folder is not one of the {len(classes)} given classes")

        samples: List[Tuple[str, int]] = []
        for label, name in enumerate(classes):
            files = find_files(root / name, extensions)
            if not files:
                raise ValueError(f"{root / name}: class folder has no images ({', '.join(extensions)})")
            samples += [(f, label) for f in files]

        self.root = root
        self.transform = transform
        self.on_bad = on_bad
        self.classes: List[str] = list(classes)
        self.samples = samples
        self.targets: List[int] = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = F.to_image(read_rgb(path))
        except ValueError:
            if self.on_bad == "skip":
                return None
            raise
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def sample_name(self, index: int) -> str:
        """The file path of sample ``index``."""
        return self.samples[index][0]


# ------------------------------------------------------------------------------------- Digits
class Digits(Dataset):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; shipped, no download).

    Pixel values 0-16 become uint8 0-255 (``round(v * 255 / 16)``) and the grayscale plane is
    replicated to a ``tv_tensors.Image`` of shape ``(3, 8, 8)``. The data is split once, stratified
    by class, with ``sklearn.model_selection.train_test_split(test_size=val_fraction,
    random_state=seed)``: the same seed always gives the same split, train and val are disjoint and
    together cover all digits. ``train=False`` is that val split, the *held-out digits* used for
    evaluation. ``indices`` are the positions in ``load_digits()``, in ascending order.
    """

    def __init__(self, train: bool = True, val_fraction: float = 0.2, seed: int = 0,
                 transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be strictly between 0 and 1, got {val_fraction!r}")
        digits = load_digits()
        order = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(order, test_size=val_fraction, stratify=digits.target,
                                              random_state=seed)
        self.indices = np.sort(train_idx if train else val_idx)
        self.images = np.rint(digits.images[self.indices] * (255.0 / 16.0)).astype(np.uint8)
        self.targets: List[int] = [int(t) for t in digits.target[self.indices]]
        self.classes: List[str] = [str(n) for n in digits.target_names]
        self.train = train
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = tv_tensors.Image(torch.from_numpy(self.images[index]).unsqueeze(0).repeat(3, 1, 1))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def sample_name(self, index: int) -> str:
        """``'digits[<position in load_digits()>]'``."""
        return f"digits[{self.indices[index]}]"


# ---------------------------------------------------------------------------- subsets, checks
def _sample_name(dataset, index: int) -> Optional[str]:
    if isinstance(dataset, Subset) and not hasattr(dataset, "sample_name"):
        return _sample_name(dataset.dataset, dataset.indices[index])
    name = getattr(dataset, "sample_name", None)
    return name(index) if name is not None else None


class LabeledSubset(Subset):
    """A ``torch.utils.data.Subset`` that keeps ``classes`` and ``targets`` of its dataset."""

    def __init__(self, dataset, indices: Sequence[int]):
        super().__init__(dataset, [int(i) for i in indices])
        self.classes = dataset.classes
        self.targets: List[int] = [int(dataset.targets[i]) for i in self.indices]

    def sample_name(self, index: int) -> Optional[str]:
        return _sample_name(self.dataset, self.indices[index])


def holdout(dataset, num_val: int, per_class: bool = False) -> Tuple[LabeledSubset, LabeledSubset]:
    """Split ``dataset`` into ``(train, val)`` keeping the dataset order; ``len(val) == num_val``.

    ``per_class=False``: val is the last ``num_val`` samples and train the rest. This is "the last
    5,000 training images" of CIFAR in its original (pickle) order.

    ``per_class=True``: val is the last samples *of each class* (in dataset order), with per-class
    counts proportional to the class sizes (largest remainder, so they sum to ``num_val``). Use it
    for class-sorted datasets such as :class:`ImageFolder`, whose last ``num_val`` samples would
    all be the last class. E.g. 50,000 CIFAR JPEGs (5,000 per class) with ``num_val=5000``: the
    last 500 files (by sorted name) of each class folder.
    """
    n = len(dataset)
    if isinstance(num_val, bool) or not isinstance(num_val, (int, np.integer)) or not 0 < num_val < n:
        raise ValueError(f"holdout: num_val must be an integer in [1, {n - 1}] for a dataset of {n} samples, "
                         f"got {num_val!r}")
    num_val = int(num_val)
    if not per_class:
        return LabeledSubset(dataset, range(n - num_val)), LabeledSubset(dataset, range(n - num_val, n))

    targets = np.asarray(dataset.targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=len(dataset.classes))
    exact = num_val * counts / n
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[: num_val - int(quota.sum())]] += 1
    is_val = np.zeros(n, dtype=bool)
    for k in np.flatnonzero(quota):
        members = np.flatnonzero(targets == k)
        if quota[k] >= len(members):
            raise ValueError(f"holdout: class {dataset.classes[k]!r} has {len(members)} samples; holding out "
                             f"{quota[k]} of them leaves none for training (use a smaller num_val)")
        is_val[members[len(members) - quota[k]:]] = True
    return LabeledSubset(dataset, np.flatnonzero(~is_val)), LabeledSubset(dataset, np.flatnonzero(is_val))


def check_labels(dataset, num_classes: int, name: str) -> None:
    """Check that ``dataset`` has ``num_classes`` classes and every label is in ``[0, num_classes)``.

    Reads only ``dataset.classes`` and ``dataset.targets`` (no image is decoded). Raises
    ``ValueError`` naming the dataset and, for a bad label, the first offending sample (its index
    and, when known, its file path).
    """
    classes = getattr(dataset, "classes", None)
    targets = getattr(dataset, "targets", None)
    if classes is None or targets is None:
        raise ValueError(f"dataset {name} has no 'classes'/'targets' attributes")
    if len(classes) != num_classes:
        raise ValueError(f"dataset {name} has {len(classes)} classes but the config says num_classes={num_classes}")
    targets = np.asarray(targets)
    if len(targets) == 0:
        raise ValueError(f"dataset {name} is empty")
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"dataset {name}: targets must be one integer label per sample, got {targets.dtype} "
                         f"of shape {targets.shape}")
    bad = np.flatnonzero((targets < 0) | (targets >= num_classes))
    if bad.size:
        i = int(bad[0])
        where = _sample_name(dataset, i)
        where = f" ({where})" if where else ""
        raise ValueError(f"dataset {name}: sample {i}{where} has label {int(targets[i])}, "
                         f"outside [0, {num_classes})")


def collate(batch: Sequence) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Collate ``(image, label)`` samples into ``(images, labels, num_skipped)``.

    ``None`` samples (unreadable files with ``on_bad='skip'``) are dropped and counted in
    ``num_skipped``. ``images`` is a plain tensor ``(B, ...)``, ``labels`` a LongTensor ``(B,)``.
    If every sample was skipped, both are empty (``B == 0``): callers should skip that batch.
    """
    kept = [s for s in batch if s is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), num_skipped
    images = [torch.as_tensor(img).as_subclass(torch.Tensor) for img, _ in kept]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) > 1:
        raise ValueError(f"collate: images in a batch have different shapes {sorted(shapes)}; "
                         f"use a transform that resizes or crops to a fixed size")
    labels = torch.tensor([int(label) for _, label in kept], dtype=torch.long)
    return torch.stack(images), labels, num_skipped


# ------------------------------------------------------------------------------------ factory
_OPTIONS = {
    "cifar10": {"holdout"},
    "cifar100": {"holdout"},
    "imagefolder": {"holdout", "classes", "on_bad", "extensions"},
    "digits": {"val_fraction", "seed"},
}


def build_cls_dataset(name: str, root, split: str, transform: Optional[Callable] = None, **kw):
    """Build the ``split`` (``'train'`` or ``'val'``) of dataset ``name``.

    ``'cifar10'`` / ``'cifar100'``: :class:`CIFAR` at ``root``; ``'val'`` is the official test
    batch. With ``holdout=N``, both splits come from the training batches instead: ``'val'`` is
    the last N training images (original order) and ``'train'`` the others.

    ``'imagefolder'``: if ``root/train`` exists, ``'train'`` reads ``root/train`` and ``'val'``
    reads ``root/val``, whose folders must match ``root/train``'s classes (same labels); otherwise
    ``root`` itself is the training folder. With ``holdout=N``, ``'val'`` is carved from the
    training folder (``root/val`` is ignored) as the last files of each class, N in all,
    proportional to the class sizes (``holdout(..., per_class=True)``: the last 500 files of each
    of the 10 CIFAR-JPEG classes for N=5000), and ``'train'`` excludes them. Other options:
    ``classes``, ``on_bad``, ``extensions`` (see :class:`ImageFolder`).

    ``'digits'``: :class:`Digits` (``root`` is ignored); ``'val'`` is the held-out digits.
    Options: ``val_fraction``, ``seed``.

    Each call builds its own dataset, so the train and val splits may use different transforms.
    """
    if name not in _OPTIONS:
        raise ValueError(f"dataset {name!r} is unknown (expected one of: {', '.join(_OPTIONS)})")
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    unknown = sorted(set(kw) - _OPTIONS[name])
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown option {unknown[0]!r} "
                         f"(allowed: {', '.join(sorted(_OPTIONS[name])) or 'none'})")
    num_val = kw.pop("holdout", None)

    if name == "digits":
        return Digits(train=split == "train", transform=transform, **kw)
    if name in ("cifar10", "cifar100"):
        if num_val is None:
            return CIFAR(root, train=split == "train", variant=name, transform=transform)
        train, val = holdout(CIFAR(root, train=True, variant=name, transform=transform), num_val)
        return train if split == "train" else val

    root = Path(root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if num_val is not None:
        train, val = holdout(ImageFolder(train_dir, transform=transform, **kw), num_val, per_class=True)
        return train if split == "train" else val
    if split == "train":
        return ImageFolder(train_dir, transform=transform, **kw)
    val_dir = root / "val"
    if train_dir == root or not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: validation folder not found "
                                f"(or pass holdout=N to carve the validation set from {train_dir})")
    if kw.get("classes") is None:
        kw["classes"] = find_classes(train_dir)
    return ImageFolder(val_dir, transform=transform, **kw)
