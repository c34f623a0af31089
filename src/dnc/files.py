"""Atomic file writing: a temporary file in the same folder, flushed to disk, then renamed over the
target, so that a reader never sees a half-written file and an error leaves the old one intact."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "write_atomic", "write_json", "remove_stale_temporaries", "check_output"]

_TMP = ".tmp"


def atomic_write(path, write: Callable) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file of the same folder (named
    ``.NAME.tmpPID``, created with the usual permissions, e.g. 0644), flushed, then renamed over ``path``.
    A failure leaves ``path`` as it was and is one ``OSError`` naming it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError):  # torch.save's own writer reports a failed write this way
            if "write" not in str(e):
                raise
            full = shutil.disk_usage(path.parent).free < 2**20
        else:
            full = e.errno == errno.ENOSPC
        if full:
            raise OSError(errno.ENOSPC, f"no space left while writing {path}") from None
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise OSError(getattr(e, "errno", None), f"cannot write {path}: {why}") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder) -> list:
    """Remove the temporary files of :func:`atomic_write` left in ``folder`` by a process that no longer
    runs (a killed save); returns their paths."""
    removed = []
    for p in Path(folder).glob(f".*{_TMP}*"):
        pid = p.name.rsplit(_TMP, 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON atomically. NaN and infinity are refused (they are not JSON): a
    ``ValueError`` naming the file, and nothing is written."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        raise ValueError(f"{path}: not written: a value is NaN or infinite (not JSON)") from None
    write_atomic(path, (text + "\n").encode())


def check_output(out, inputs=(), force: bool = False, option: str = "--out") -> Path:
    """Refuse an output path that is one of the command's ``inputs`` (even with ``force``) or an existing
    file (unless ``force``): one ``FileExistsError`` line naming ``option``. Returns ``Path(out)``."""
    out = Path(out)
    if out.exists() and any(out.resolve() == Path(i).resolve() for i in inputs):
        raise FileExistsError(f"{option} {out}: is an input of this command; write to another file")
    if out.is_dir():
        raise IsADirectoryError(f"{option} {out}: is a folder; name a file")
    if out.exists() and not force:
        raise FileExistsError(f"{option} {out}: exists; choose another file, or pass --force to replace it")
    return out
