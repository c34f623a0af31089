"""What the benchmarks share: this checkout's package on the path, the usual options, timing and peak memory,
and the description of the machine and the code measured.

* :func:`use_checkout` puts ``src/`` first on ``sys.path`` (the figures are of this code);
* :func:`extract_once` (data archives, extracted once);
* :func:`parser` builds an ``ArgumentParser`` with ``--device``, ``--threads`` and ``--out`` as wanted;
  :func:`set_threads`, :func:`write_json` (atomic);
* :class:`Clock` (CUDA events or ``perf_counter``), :class:`Peak` (peak memory of one call),
  :func:`interleaved` (warm-up, then rounds of every variant in turn), :func:`summary`, :func:`ratio`;
* :func:`keep_freed_memory` (glibc keeps freed memory for reuse: times without page faults);
* :func:`machine`, :func:`code_version`.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    """Import ``dnc`` from this checkout's ``src/``, even where another copy is installed."""
    if (REPO / "src" / "dnc").is_dir() and str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))


use_checkout()

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402


def parser(doc: str, device: bool = False, threads: bool = False, out: bool = True) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by the first paragraph of ``doc``, with the shared options:
    ``--device cpu|cuda`` (default cuda where available), ``--threads N``, ``--out FILE.json``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if device:
        ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    if out:
        ap.add_argument("--out", help="write the figures to this JSON file")
    return ap


def set_threads(n: int) -> None:
    """``--threads``: torch's CPU threads (0: torch's choice)."""
    if n:
        torch.set_num_threads(n)


def extract_once(archives, dest: Path) -> Path:
    """Extract ``archives`` into ``dest`` unless it exists (through ``dest.partial``: never half-done)."""
    dest = Path(dest).resolve()
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".partial")
        for archive in archives:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        tmp.rename(dest)
    return dest


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, out)


class Clock:
    """Times ``fn()`` in milliseconds: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def keep_freed_memory() -> None:
    """Time with glibc keeping freed memory for reuse (no mmap, no trimming: a caching allocator of
    sorts), so that a variant's time is its arithmetic, not the page faults of fresh memory (costly in
    a virtual machine), whose number depends on what ran before it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD



class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that the ops run under it create (not views, not
    in-place results, not outputs written into an input), drops them when they die, and keeps the peak.
    Temporaries internal to a single kernel are not seen."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = self.peak = 0

    @staticmethod
    def _storages(tree):
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                yield StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {ref.cdata for ref, _ in self._storages((args, kwargs))}
        for ref, nbytes in self._storages(out):
            if ref.cdata not in inputs and ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


class Peak:
    """Peak memory of one call of ``fn()`` in MiB, above what was in use before it: on a GPU
    ``torch.cuda.max_memory_allocated`` (everything the caching allocator handed out); on the CPU the
    bytes of the tensors the call creates that are alive at once (:class:`_LiveBytes`, exact at op
    granularity, whatever the allocator does; kernels' internal workspaces are not seen)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> Optional[float]:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        with _LiveBytes() as live:
            fn()
        return live.peak / 2**20


def interleaved(clock: Clock, fns: Dict[str, Callable[[], None]], per_call: Dict[str, int], warmup: int,
                rounds: int) -> Dict[str, List[float]]:
    """Run every function ``warmup`` times, then ``rounds`` rounds of one call each, in turn.

    Returns, per name, the time of each round divided by ``per_call[name]`` (steps per call), in ms.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    clock.sync()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(clock(fn) / per_call.get(name, 1))
    return out


def peaks(peak: Peak, fns: Dict[str, Callable[[], None]]) -> Dict[str, Optional[float]]:
    return {name: peak(fn) for name, fn in fns.items()}


def summary(samples: List[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(s), "q25_ms": q(0.25), "q75_ms": q(0.75), "n": len(s)}


def ratio(num: List[float], den: List[float]) -> float:
    """Median of the per-round ratios (both lists from the same interleaved rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))



def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def code_version() -> dict:
    """The commit and the hashes of the measured sources (the tree may hold uncommitted changes)."""
    import hashlib
    import subprocess
    import dnc
    src = Path(dnc.__file__).resolve().parent  # the package measured
    out = {f: hashlib.sha1((src / f).read_bytes()).hexdigest()[:12] for f in ("centroids.py", "heads.py")
           if (src / f).is_file()}
    out["package"] = src.parent.name + "/" + src.name
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=src, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        out["commit"] = git("rev-parse", "--short", "HEAD") or None
        out["uncommitted_changes"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def fmt(ms: float) -> str:
    return f"{ms:9.3f} ms"


def mib(v) -> str:
    return "       -" if v is None else f"{v:8.1f}"


def print_table(part: dict, extra: Callable[[str], str] = lambda name: "") -> None:
    """One line per variant of ``part["ms"]``: median [quartiles], peak memory, and ``extra(name)``."""
    for name, v in part["ms"].items():
        print(f"  {name:<30}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]  "
              f"peak {mib(part.get('peak_mib', {}).get(name))} MiB{extra(name)}")
