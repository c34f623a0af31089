"""A training's work dir: one training at a time, and starting over without losing the old run.

* :func:`work_dir_lock` holds an advisory lock (``fcntl.flock`` on ``WORK_DIR/.lock``) while a
  training runs. The kernel drops it when the process ends, however it ends, so a killed run leaves
  no stale lock; a second ``train``, ``--resume`` or ``--force`` is refused in one
  line naming the holder's pid.
* :class:`StartOver` is ``--force``: the old run's files are moved aside into a hidden folder, put back
  if the new run fails before its first checkpoint, and removed once that checkpoint is written.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

__all__ = ["WorkDirBusy", "work_dir_lock", "StartOver", "RUN_FILES"]

RUN_FILES = ("config.yaml", "log.jsonl", "last.pt", "best.pt", "metrics.json", "tensorboard")
_LOCK = ".lock"
_ASIDE = ".replaced."


class WorkDirBusy(RuntimeError):
    """Another process trains in this work dir."""


@contextmanager
def work_dir_lock(work_dir):
    """Hold ``work_dir``'s lock (the folder is created if missing) for the ``with`` block, or raise
    :class:`WorkDirBusy` naming the process that holds it. On leaving, the lock file is removed, and the
    folder too if this call created it and nothing else was written there."""
    import fcntl

    work_dir = Path(work_dir)
    created = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / _LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkDirBusy(f"{work_dir} is in use by another training (process {holder}): wait for it to end "
                              f"or stop it, or use another --work-dir") from None
        try:  # the file we locked may have been removed by the holder we waited for: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created and not any(work_dir.iterdir()):
            work_dir.rmdir()


class StartOver:
    """``--force`` in ``work_dir``: :meth:`begin` moves the old run's files aside, :meth:`commit` (the new
    run's first checkpoint is written) removes them, :meth:`rollback` (the new run failed before that)
    removes the new run's files and puts the old ones back. Folders left aside by a process that no
    longer runs are restored at the next :meth:`begin` if the work dir holds no run, else removed."""

    def __init__(self, work_dir, names: Sequence[str] = RUN_FILES):
        self.work_dir, self.names = Path(work_dir), tuple(names)
        self.aside = self.work_dir / f"{_ASIDE}{os.getpid()}"
        self.moved: list = []

    def begin(self) -> "StartOver":
        self._clean_stale()
        for name in self.names:
            if (self.work_dir / name).exists():
                self.aside.mkdir(exist_ok=True)
                os.replace(self.work_dir / name, self.aside / name)
                self.moved.append(name)
        return self

    def commit(self) -> None:
        if self.moved:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.moved = []

    def rollback(self) -> None:
        if not self.moved:
            return
        for name in self.names:
            new = self.work_dir / name
            if new.is_dir():
                shutil.rmtree(new, ignore_errors=True)
            else:
                new.unlink(missing_ok=True)
        for name in self.moved:
            os.replace(self.aside / name, self.work_dir / name)
        self.aside.rmdir()
        self.moved = []

    def _clean_stale(self) -> None:
        for folder in self.work_dir.glob(f"{_ASIDE}*"):
            pid = folder.name[len(_ASIDE):]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if not any((self.work_dir / n).exists() for n in ("last.pt", "best.pt")):
                    for item in folder.iterdir():
                        os.replace(item, self.work_dir / item.name)
                shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
