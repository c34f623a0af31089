"""Checks of what enters ``dnc`` from files, made once where it enters.

* Class names (class folders, ``extend --add NAME=DIR``, checkpoints): a name is shown in ``dnc
  explain``'s report, a CSV cell and a terminal line, so it may hold no control character and may not
  be empty, ``.`` or ``..``; a new name (a folder, ``--add``) may hold no path separator either. A
  checkpoint's names may (a built-in dataset's, such as CamVid's ``sign/symbol``): file names made of
  class names are always sanitised.
* Tensors (checkpoints, pretrained weights): every floating-point tensor is finite; a NaN sub-centroid
  or weight would otherwise send every prediction to class 0 without a word."""
from __future__ import annotations

import unicodedata
from typing import Iterable, Mapping

import torch

__all__ = ["check_class_names", "check_finite"]


def _problem(name, separators: bool) -> str:
    if not isinstance(name, str) or not name.strip():
        return "is empty or not text"
    if name in (".", ".."):
        return "is a path component"
    if not separators and ("/" in name or "\\" in name):
        return "holds a path separator"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        return "holds a control character"
    return ""


def check_class_names(names: Iterable, where, separators: bool = False) -> list:
    """``names`` as a list, or a ``ValueError`` naming ``where`` (a folder, a checkpoint, an option) and
    the first bad name; ``separators``: names may hold ``/`` (a checkpoint's)."""
    names = list(names)
    for name in names:
        why = _problem(name, separators)
        if why:
            raise ValueError(f"{where}: class name {name!r} {why}; rename it")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{where}: class name {dup!r} is listed twice")
    return names


def check_finite(tensors: Mapping, source) -> None:
    """A ``ValueError`` naming ``source`` and the first tensor of ``tensors`` (``name -> value``; nested
    mappings are searched, other values skipped) that holds a NaN or an infinity."""
    for name, value in tensors.items():
        if isinstance(value, Mapping):
            check_finite({f"{name}.{k}": v for k, v in value.items()}, source)
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{source}: tensor {name!r} holds {bad} NaN or infinite values; the file is damaged "
                             f"or the run diverged")
