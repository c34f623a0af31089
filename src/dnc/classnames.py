"""Class names, checked once where they enter ``dnc``: class folders, ``extend --add NAME=DIR`` and
checkpoints. A name becomes a file name in ``dnc explain``'s report and ``dnc predict``'s pictures,
a CSV cell and a terminal line, so it may hold no control character and no path separator, and may
not be empty, ``.`` or ``..``."""
from __future__ import annotations

import unicodedata
from typing import Iterable

__all__ = ["check_class_names"]


def _problem(name) -> str:
    if not isinstance(name, str) or not name.strip():
        return "is empty or not text"
    if name in (".", ".."):
        return "is a path component"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        return "holds a control character"
    return ""


def check_class_names(names: Iterable, where) -> list:
    """``names`` as a list, or a ``ValueError`` naming ``where`` (a folder, a checkpoint, an option) and
    the first bad name."""
    names = list(names)
    for name in names:
        why = _problem(name)
        if why:
            raise ValueError(f"{where}: class name {name!r} {why}; rename it")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{where}: class name {dup!r} is listed twice")
    return names
