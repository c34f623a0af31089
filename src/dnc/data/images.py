"""Image files: finding them, decoding them, and a dataset of a list of them.

* :func:`read_rgb` decodes a file as 8-bit RGB (every dataset reads files with it);
* :func:`find_files` / :func:`list_images` / :func:`find_images`: the image files under a folder, or of
  files, folders and glob patterns (``dnc predict``);
* :class:`ImageList`: ``(image, label)`` samples of a list of files, each handed to its transform as a
  ``tv_tensors.Image`` uint8 ``(3, H, W)`` like every dataset of :mod:`dnc.data.classification`;
* :func:`sample_name`: where sample ``i`` of a dataset comes from (a file path, a batch file and row).
"""
from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2 import functional as F

__all__ = ["IMG_EXTENSIONS", "read_rgb", "find_files", "list_images", "find_images", "ImageList", "sample_name"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_rgb(path) -> Image.Image:
    """Decode an image file as 8-bit RGB, upright; any failure is one ``ValueError`` naming the file.

    This is how every command reads an image (datasets, ``dnc test``, ``dnc predict``, ``dnc calibrate``;
    ``examples/onnx_predict.py`` does the same without ``dnc``). The EXIF orientation tag (photos of
    phones and cameras) is applied, so the pixels are those an image viewer shows.

    16-bit grayscale (PIL modes ``I;16*`` and ``I``) is scaled to 8 bits (``round(v / 257)``), where
    PIL's own conversion would clip every value above 255 to white; floating-point images are refused,
    and so are images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 89 million), from their
    header, before anything is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            img = Image.open(path)
        with img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise ValueError(f"{img.width}x{img.height} pixels is too large to decode (the limit is "
                                 f"{limit} pixels); downscale it first")
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


def list_images(folder) -> List[str]:
    """Sorted paths of the image files anywhere under ``folder`` (hidden names skipped, links followed once)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    files = find_files(root, IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"{root}: no images under this folder ({', '.join(IMG_EXTENSIONS)})")
    return files


_GLOB = re.compile(r"[*?\[]")


def find_images(inputs: Sequence[str], extensions: Sequence[str] = IMG_EXTENSIONS) -> List[str]:
    """Image paths of ``inputs``: files as given, folders searched recursively, glob patterns expanded
    (folders and patterns keep the files with an image extension, hidden names skipped, sorted).
    Duplicates are dropped, first occurrence kept. An input that matches nothing is an error."""
    exts = tuple(e.lower() for e in extensions)
    found: List[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            hits = find_files(p, exts)
            if not hits:
                raise FileNotFoundError(f"{item}: folder holds no images ({', '.join(exts)})")
            found += hits
        elif _GLOB.search(item) and not p.exists():
            hits = sorted(f for f in glob.glob(item, recursive=True)
                          if os.path.isfile(f) and f.lower().endswith(exts) and not os.path.basename(f).startswith("."))
            if not hits:
                raise FileNotFoundError(f"{item}: pattern matches no images")
            found += hits
        elif p.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: image not found")
    return list(dict.fromkeys(found))


class ImageList(Dataset):
    """``(image, label)`` samples of a list of files, all with the same ``label``, decoded on demand."""

    def __init__(self, files: Sequence[str], transform: Optional[Callable] = None, label: int = -1):
        self.files, self.transform, self.label = list(files), transform, label

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = F.to_image(read_rgb(self.files[index]))
        return (self.transform(image) if self.transform is not None else image), self.label

    def sample_name(self, index: int) -> str:
        return self.files[index]


def sample_name(dataset, index: int) -> Optional[str]:
    """Where sample ``index`` of ``dataset`` comes from (its ``sample_name``, through subsets), or None."""
    if isinstance(dataset, Subset) and not hasattr(dataset, "sample_name"):
        return sample_name(dataset.dataset, dataset.indices[index])
    name = getattr(dataset, "sample_name", None)
    return name(index) if name is not None else None
