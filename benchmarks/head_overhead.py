#!/usr/bin/env python
"""Cost of the DNC head and of its clustering step, in time and peak memory, side by side with the
baselines: a linear layer with C*K outputs (the floor: the same output product, no clustering) and a
ProtoSeg-style Python loop over classes (the clustering as the prototype-segmentation code does it).

Usage::

    python benchmarks/head_overhead.py [--device cpu|cuda] [--full | --smoke] [--threads N] [--out FILE.json]

Every time is the median over interleaved rounds (warm-up first; CUDA events on a GPU,
``time.perf_counter`` on the CPU), every ratio the median of the per-round ratios, so that a shared
machine's drifts stay out of the ratios; glibc keeps freed memory for reuse (see
:func:`_keep_freed_memory`). Every variant's peak memory is measured once, after the timing, over one
call: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated before; on the CPU the
largest total of the tensors created by the call that are alive at once, tracked op by op (a
``TorchDispatchMode``; the process's resident size proved useless here: it depends on what glibc kept
from earlier calls). Inputs that exist before the call (features, similarities given) are not counted.

Parts (sizes: ``full`` on a GPU, ``cpu`` by default on the CPU, ``smoke`` to check the script):

a. Classification head step (B=256, C=1000, K=4, D=2048): ``head(features, labels)`` in training
   mode, cross-entropy, backward. Variants: ``linear`` (C outputs), ``linear_CK`` (C*K outputs, the
   floor), ``dnc_fwd_bwd`` (no clustering), ``dnc_step`` (clustering every step), ``dnc_memory`` (the
   ImageNet configs: memory 1024, every 8 steps), ``dnc_memory_swin`` (memory 512, every 4 steps),
   ``naive_loop_step`` (the per-class loop every step). One timed call is 8 steps, so that every
   round holds exactly one clustering event of each memory variant (amortised figures per step).
   Also each memory setting's clustering event alone against the loop on the same memory. On CUDA,
   whole ResNet-50 steps with the linear and the DNC head.
b. Per-pixel clustering step (N=262,144, C=150, K=10, D=512): ``SubCentroids.update`` given the
   forward's similarities (fp32, bf16, with the shipped ``max_per_class=4096``) and the per-class loop
   on the same inputs (checked equal). The path that computes each sample's own similarities (the
   memory's) is measured by the memory clustering events of part a, at the shipped memory sizes.
c. Per-pixel head step (N=16,384 on the CPU, 262,144 on a GPU): ``linear_CK`` (a 1x1 convolution with
   C*K outputs), the DNC head (``max_per_class=4096``), the DNC head with the auxiliary losses, and the
   ProtoSeg-style step (amax, per-class loop). Peak memory as a multiple of the (N, C, K) similarities.
d. ``max_per_class`` at N = 65,536 to 262,144 pixels: the update with a binding cap (256 x 150 classes
   < N) against no cap; with the cap the time should stay flat as N grows.
e. ``kmeans_pp`` (the data-driven initialisation) on 50,000 samples of 150 skewed classes, K=10.

On CUDA, one training step of each DNC configuration also runs under
``torch.cuda.set_sync_debug_mode("warn")``; every host-device synchronisation is counted and located.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The package of this checkout, even where another copy is installed: the figures are of this code.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "dnc").is_dir():
    sys.path.insert(0, str(_SRC))
import dnc  # noqa: E402

from dnc.centroids import SubCentroids  # noqa: E402
from dnc.heads import DNCHead, LinearHead  # noqa: E402

DNC_DIR = str(Path(dnc.__file__).resolve().parent)

# --------------------------------------------------------------------------------------------- sizes
SIZES = {
    # head (B, C, K, D); pixel update (N, C, K, D); pixel head step N; cap scaling (Ns, cap)
    "full": dict(head=(256, 1000, 4, 2048), pixel=(262_144, 150, 10, 512), pixel_step=262_144,
                 cap=((65_536, 131_072, 262_144), 256)),
    "cpu": dict(head=(256, 1000, 4, 2048), pixel=(262_144, 150, 10, 512), pixel_step=16_384,
                cap=((65_536, 131_072, 262_144), 256)),
    "smoke": dict(head=(64, 50, 4, 64), pixel=(4_096, 15, 10, 64), pixel_step=2_048, cap=((1_024, 2_048, 4_096), 16)),
}
ROUNDS = {"full": (3, 20, 7), "cpu": (1, 5, 5), "smoke": (1, 2, 2)}  # warm-up, head rounds, pixel rounds
MEMORY_SETTINGS = {"dnc_memory": (1024, 8), "dnc_memory_swin": (512, 4)}  # the shipped ImageNet / Swin configs


# --------------------------------------------------------------------------------------------- timing
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


def _keep_freed_memory() -> None:
    """Time with glibc keeping freed memory for reuse (no mmap, no trimming: a caching allocator of
    sorts), so that a variant's time is its arithmetic, not the page faults of fresh memory (costly in
    a virtual machine), whose number depends on what ran before it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD


_keep_freed_memory()


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


def skewed_labels(n: int, c: int, g: torch.Generator) -> torch.Tensor:
    """Class frequencies as skewed as in scene parsing (p_c ~ 1/(c+1)); 5% of the pixels ignored (-1)."""
    probs = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
    labels = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = -1
    return labels


# --------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def naive_update(centroids: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
                 sims: Optional[torch.Tensor] = None, momentum: float = 0.999, eps: float = 0.05,
                 iters: int = 3, correct_only: bool = True):
    """The clustering step as a plain loop over classes, as in the prototype-segmentation code.

    For each class present: select its samples (boolean mask), take their similarities to the class's
    K sub-centroids, balance them by Sinkhorn-Knopp (``iters`` alternate normalisations of the K
    sub-centroid masses and the per-sample masses), assign each sample to its argmax, and move every
    sub-centroid that received correctly classified samples towards their normalised sum.
    Returns ``(new centroids (C, K, D), assignment (N,), -1 where a sample took no part)``.
    """
    c_all, k, _ = centroids.shape
    protos = centroids.clone()
    assign = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
    tiny = torch.finfo(torch.float32).tiny
    for c in labels.unique().tolist():
        if c < 0 or c >= c_all:
            continue
        mask = labels == c
        zc = z[mask].float()
        g = sims[mask, c].float() if sims is not None else zc @ centroids[c].float().t()
        x = g / eps
        q = torch.exp((x - x.max()).clamp_min(-80.0))
        for _ in range(iters):
            q = q / q.sum(0, keepdim=True).clamp_min(tiny)  # each sub-centroid's mass equal
            q = q / q.sum(1, keepdim=True).clamp_min(tiny)  # each sample's mass equal
        a = q.argmax(1)
        w = correct[mask].float() if correct_only else torch.ones_like(a, dtype=torch.float32)
        onehot = F.one_hot(a, k).float() * w[:, None]
        total = onehot.t() @ zc  # (K, D)
        count = onehot.sum(0)
        moved = F.normalize(momentum * protos[c] + (1 - momentum) * F.normalize(total, dim=1), dim=1)
        protos[c] = torch.where(count[:, None] > 0, moved, protos[c])
        assign[mask] = a
    return protos, assign


# --------------------------------------------------------------------------------------------- helpers
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
    src = Path(DNC_DIR)  # the package measured
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


def naive_head_step(head: DNCHead, x: torch.Tensor, y: torch.Tensor, ignore_index: int = -1) -> None:
    """A ProtoSeg-style training step of the DNC head: class scores by ``amax``, cross-entropy, backward,
    then the clustering as the per-class loop (:func:`naive_update`)."""
    z = head.embed(x)
    sims = head.centroids.similarities(z)
    logits = sims.amax(-1).float() / head.temperature
    F.cross_entropy(logits, y, ignore_index=ignore_index).backward()
    sc = head.centroids
    sc.centroids, _ = naive_update(sc.centroids, z.detach(), y, logits.detach().argmax(1) == y, sims.detach(),
                                   sc.momentum, sc.eps, sc.iters, sc.correct_only)


def head_call(head, x: torch.Tensor, y: torch.Tensor, amp, ignore_index: int = -100) -> None:
    """One training step of a head: ``head(x, y)``, cross-entropy (+ auxiliary losses), backward."""
    with amp():
        logits, losses = head(x, y)
        loss = F.cross_entropy(logits.float(), y, ignore_index=ignore_index) + sum(losses.values())
    loss.backward()


# --------------------------------------------------------------------------------------------- part a
def head_steps(args, device, dtype_feat, amp) -> dict:
    b, c, k, d = SIZES[args.size]["head"]
    warmup, rounds, _ = ROUNDS[args.size]
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(b, d, generator=g).to(device, dtype_feat).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    settings = {name: (args.memory_size, args.update_interval) if name == "dnc_memory" else ms
                for name, ms in MEMORY_SETTINGS.items()}
    heads = {
        "linear": LinearHead(d, c),
        "linear_CK": LinearHead(d, c * k),  # the floor: the same output product, no clustering
        "dnc_fwd_bwd": DNCHead(d, c, k),  # forward + backward only
        "dnc_step": DNCHead(d, c, k),  # clustering of the batch at every step
        **{name: DNCHead(d, c, k, memory_size=m, update_interval=i) for name, (m, i) in settings.items()},
        "naive_loop_step": DNCHead(d, c, k),  # amax and the per-class loop at every step
    }
    for h in heads.values():
        h.to(device).train()

    def step(name):
        head = heads[name]
        if name == "naive_loop_step":
            with amp():
                naive_head_step(head, feats, labels)
        elif name == "dnc_fwd_bwd":
            with amp():
                loss = F.cross_entropy(head.eval()(feats).float(), labels)  # the same arithmetic, no update
            head.train()
            loss.backward()
        else:
            head_call(head, feats, labels, amp)
        feats.grad = None
        for p in head.parameters():
            p.grad = None

    steps = math.lcm(*(i for _, i in settings.values()))  # one call holds one event of every memory variant
    fns = {name: (lambda name=name: [step(name) for _ in range(steps)]) for name in heads}
    per_call = {name: steps for name in heads}
    times = interleaved(Clock(device), fns, per_call, warmup, rounds)
    peak_mib = peaks(Peak(device), fns)

    # Each memory setting's clustering event alone: push one batch and cluster the whole memory, against
    # the per-class loop over the same memory.
    ev_fns = {}
    for name, (m, _) in settings.items():
        sc = SubCentroids(c, d, k, memory_size=m, update_interval=1).to(device)
        zb = F.normalize(torch.randn(m, d, generator=g), dim=1).to(device)
        yb = torch.randint(0, c, (m,), generator=g).to(device)
        ok = (torch.rand(m, generator=g) < 0.7).to(device)
        sc.update(zb, yb, ok)  # fills the memory
        tag = "" if name == "dnc_memory" else "_swin"
        ev_fns[f"event_vectorised{tag}"] = lambda sc=sc, z1=zb[:b], y1=yb[:b], o1=ok[:b]: sc.update(z1, y1, o1)
        ev_fns[f"event_naive_loop{tag}"] = lambda sc=sc: naive_update(sc.centroids, sc.memory_z, sc.memory_y,
                                                                      sc.memory_ok, momentum=sc.momentum)
    ev = interleaved(Clock(device), ev_fns, {}, 1, rounds)
    times.update(ev)
    peak_mib.update(peaks(Peak(device), ev_fns))

    res = {"sizes": {"B": b, "C": c, "K": k, "D": d, "memory": {n: {"size": m, "every": i} for n, (m, i) in settings.items()},
                     "steps_per_call": steps, "features": str(dtype_feat).replace("torch.", ""), "autocast": args.amp},
           "ms": {name: summary(v) for name, v in times.items()}, "peak_mib": peak_mib}
    for base in ("linear", "linear_CK"):
        res[f"ratio_vs_{base}"] = {name: ratio(times[name], times[base]) for name in heads if name not in ("linear", base)}
        res[f"added_ms_vs_{base}"] = {name: statistics.median(a - l for a, l in zip(times[name], times[base]))
                                      for name in heads if name not in ("linear", base)}
    res["event_speedup_naive_over_vectorised"] = {
        name: ratio(times[f"event_naive_loop{t}"], times[f"event_vectorised{t}"])
        for name, t in (("dnc_memory", ""), ("dnc_memory_swin", "_swin"))}
    res["naive_loop_step_over_dnc_step"] = ratio(times["naive_loop_step"], times["dnc_step"])
    return res


def resnet_steps(args, device, amp, rounds: int) -> dict:
    """A whole ResNet-50 training step (timm resnet50, SGD) with the linear head and with the DNC head."""
    import timm
    from torch import nn

    b, c, k, _ = SIZES[args.size]["head"]
    b, size = (args.resnet_batch or b), args.resnet_size
    torch.backends.cudnn.benchmark = True
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(b, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, c, (b,), generator=g).to(device)

    class Net(nn.Module):
        def __init__(self, backbone, head):
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, images, targets):
            out = self.head(self.backbone(images), targets)
            logits, losses = out if isinstance(out, tuple) else (out, {})
            return F.cross_entropy(logits.float(), targets) + sum(losses.values())

    # One backbone shared by both: same weights, same kernels; only the head differs.
    backbone = timm.create_model("resnet50", pretrained=False, num_classes=0)
    nets = {
        "resnet50_linear": Net(backbone, LinearHead(2048, c)),  # = timm resnet50 with its own fc
        "resnet50_dnc_memory": Net(backbone, DNCHead(2048, c, k, memory_size=args.memory_size,
                                                     update_interval=args.update_interval)),
    }
    opts = {}
    for name, net in nets.items():
        net.to(device).to(memory_format=torch.channels_last).train()
        opts[name] = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(name):
        with amp():
            loss = nets[name](x, y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    n = args.update_interval
    fns = {name: (lambda name=name: [step(name) for _ in range(n)]) for name in nets}
    times = interleaved(Clock(device), fns, {name: n for name in nets}, 1, rounds)
    return {"sizes": {"batch": b, "img_size": size, "channels_last": True, "autocast": args.amp,
                      "cudnn_benchmark": True},
            "ms": {name: summary(v) for name, v in times.items()},
            "ratio_dnc_over_linear": ratio(times["resnet50_dnc_memory"], times["resnet50_linear"])}


# --------------------------------------------------------------------------------------------- part b
def pixel_inputs(n: int, c: int, k: int, d: int, device, seed: int = 2):
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    labels = skewed_labels(n, c, g).to(device)
    correct = (torch.rand(n, generator=g) < 0.7).to(device)
    return z, labels, correct


def pixel_steps(args, device) -> dict:
    n, c, k, d = SIZES[args.size]["pixel"]
    warmup, _, rounds = ROUNDS[args.size]
    cap = args.max_per_class
    z, labels, correct = pixel_inputs(n, c, k, d, device)
    base = SubCentroids(c, d, k).to(device)
    counts = torch.bincount(labels[labels >= 0], minlength=c)
    sims = base.similarities(z)  # fp32 (N, C, K)
    sims_bf16 = sims.to(torch.bfloat16)

    mods = {name: copy.deepcopy(base) for name in ("given", "given_bf16", "given_cap")}
    mods["given_cap"].max_per_class = cap
    fns = {
        "update_sims_given": lambda: mods["given"].update(z, labels, correct, sims),
        "update_sims_given_bf16": lambda: mods["given_bf16"].update(z, labels, correct, sims_bf16),
        f"update_sims_given_cap{cap}": lambda: mods["given_cap"].update(z, labels, correct, sims),
        "naive_loop_sims_given": lambda: naive_update(base.centroids, z, labels, correct, sims, base.momentum),
    }
    times = interleaved(Clock(device), fns, {}, warmup, rounds)
    peak_mib = peaks(Peak(device), fns)

    # The vectorised step must equal the per-class loop on the same inputs (no cap: the cap is random).
    check = copy.deepcopy(base)
    got = check.update(z, labels, correct, sims)
    ref, ref_assign = naive_update(base.centroids, z, labels, correct, sims, base.momentum)
    agree = (got == ref_assign).float().mean().item()
    diff = (check.centroids - ref).abs().max().item()

    sims_mib = sims.numel() * 4 / 2**20
    res = {"sizes": {"N": n, "C": c, "K": k, "D": d, "max_per_class": cap, "ignored_fraction": 0.05,
                     "largest_class": int(counts.max()), "smallest_class": int(counts.min()),
                     "label_distribution": "p_c ~ 1/(c+1)", "sims_fp32_mib": sims_mib},
           "ms": {name: summary(v) for name, v in times.items()}, "peak_mib": peak_mib,
           "peak_over_sims": {name: (v / sims_mib if v is not None else None) for name, v in peak_mib.items()}}
    # Like for like: the loop given the similarities against the update given them.
    res["speedup_naive_over"] = {name: ratio(times["naive_loop_sims_given"], times[name])
                                 for name in times if name.startswith("update_sims_given")}
    res["check_vs_naive"] = {"assignment_agreement": agree, "centroid_max_abs_diff": diff}
    return res


# --------------------------------------------------------------------------------------------- part c
def pixel_head_steps(args, device, dtype_feat, amp) -> dict:
    _, c, k, d = SIZES[args.size]["pixel"]
    n = SIZES[args.size]["pixel_step"]
    warmup, _, rounds = ROUNDS[args.size]
    cap = args.max_per_class
    g = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(n, d, generator=g).to(device, dtype_feat).requires_grad_(True)
    y = skewed_labels(n, c, g).to(device)
    heads = {
        "linear_CK": LinearHead(d, c * k),  # a 1x1 convolution with C*K outputs: the floor
        "dnc": DNCHead(d, c, k, max_per_class=cap),
        "dnc_aux": DNCHead(d, c, k, max_per_class=cap, contrast_weight=0.01, compact_weight=0.001),
        "naive_loop": DNCHead(d, c, k),
    }
    for h in heads.values():
        h.to(device).train()

    def step(name):
        head = heads[name]
        if name == "naive_loop":
            with amp():
                naive_head_step(head, x, y)
        else:
            head_call(head, x, y, amp, ignore_index=-1)
        x.grad = None
        for p in head.parameters():
            p.grad = None

    fns = {name: (lambda name=name: step(name)) for name in heads}
    times = interleaved(Clock(device), fns, {}, warmup, rounds)
    peak_mib = peaks(Peak(device), fns)
    sims_mib = n * c * k * 4 / 2**20
    return {"sizes": {"N": n, "C": c, "K": k, "D": d, "max_per_class": cap, "features": str(dtype_feat).replace("torch.", ""),
                      "sims_fp32_mib": sims_mib},
            "ms": {name: summary(v) for name, v in times.items()}, "peak_mib": peak_mib,
            "peak_over_sims": {name: (v / sims_mib if v is not None else None) for name, v in peak_mib.items()},
            "ratio_vs_linear_CK": {name: ratio(times[name], times["linear_CK"]) for name in heads if name != "linear_CK"},
            "speedup_naive_over": {name: ratio(times["naive_loop"], times[name]) for name in ("dnc", "dnc_aux")}}


# --------------------------------------------------------------------------------------------- part d
def cap_scaling(args, device) -> dict:
    ns, cap = SIZES[args.size]["cap"]
    _, c, k, d = SIZES[args.size]["pixel"]
    warmup, _, rounds = ROUNDS[args.size]
    z, labels, correct = pixel_inputs(max(ns), c, k, d, device, seed=5)
    base = SubCentroids(c, d, k).to(device)
    sims = base.similarities(z)
    fns = {}
    for n in ns:
        for name, m in ((f"cap{cap}_N{n}", cap), (f"nocap_N{n}", 0)):
            mod = copy.deepcopy(base)
            mod.max_per_class = m
            fns[name] = lambda mod=mod, n=n: mod.update(z[:n], labels[:n], correct[:n], sims[:n])
    times = interleaved(Clock(device), fns, {}, warmup, rounds)
    return {"sizes": {"N": list(ns), "C": c, "K": k, "D": d, "max_per_class": cap},
            "ms": {name: summary(v) for name, v in times.items()},
            "growth_vs_smallest_N": {name: ratio(times[name], times[name.rsplit("_N", 1)[0] + f"_N{ns[0]}"])
                                     for name in times}}


# --------------------------------------------------------------------------------------------- part e
def kmeans_init(args, device) -> dict:
    """The data-driven initialisation (``kmeans_pp``, K=10) on 50,000 pixel-like samples of 150 classes
    as skewed as in scene parsing (the shipped CamVid config draws 50,000)."""
    from dnc.centroids import kmeans_pp
    n = 2_000 if args.size == "smoke" else 50_000
    _, c, k, d = SIZES[args.size]["pixel"]
    g = torch.Generator().manual_seed(6)
    labels = skewed_labels(n, c, g).clamp_min(0).to(device)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    fn = lambda: kmeans_pp(z, labels, c, k, generator=torch.Generator().manual_seed(0))  # noqa: E731
    times = interleaved(Clock(device), {"kmeans_pp": fn}, {}, 1, 3)
    return {"sizes": {"N": n, "C": c, "K": k, "D": d, "label_distribution": "p_c ~ 1/(c+1)"},
            "ms": {"kmeans_pp": summary(times["kmeans_pp"])}, "peak_mib": peaks(Peak(device), {"kmeans_pp": fn})}


# --------------------------------------------------------------------------------------------- sync check
def sync_check(args, device, dtype_feat, amp) -> dict:
    """Count host-device synchronisations in one training step of each DNC configuration."""
    b, c, k, d = SIZES[args.size]["head"]
    _, pc, pk, pd = SIZES[args.size]["pixel"]
    n = SIZES[args.size]["pixel_step"]
    g = torch.Generator(device="cpu").manual_seed(3)
    feats = torch.randn(b, d, generator=g).to(device, dtype_feat).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    pfeats = torch.randn(n, pd, generator=g).to(device, dtype_feat).requires_grad_(True)
    plabels = torch.randint(-1, pc, (n,), generator=g).to(device)
    cases = {
        "dnc_step": (DNCHead(d, c, k), feats, labels, 1),
        **{f"{name}_cycle": (DNCHead(d, c, k, memory_size=m, update_interval=i), feats, labels, i)
           for name, (m, i) in MEMORY_SETTINGS.items()},
        "linear": (LinearHead(d, c), feats, labels, 1),
        f"pixel_dnc_cap{args.max_per_class}_aux": (
            DNCHead(pd, pc, pk, max_per_class=args.max_per_class, contrast_weight=0.01, compact_weight=0.001),
            pfeats, plabels, 1),
        "pixel_dnc_cap256": (DNCHead(pd, pc, pk, max_per_class=256), pfeats, plabels, 1),
    }
    out = {}
    for name, (head, x, y, steps) in cases.items():
        head.to(device).train()
        for _ in range(2 * steps):  # warm-up: lazy initialisations may synchronise once
            head_call(head, x, y, amp, ignore_index=-1)
        torch.cuda.synchronize()
        where: List[str] = []

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message).lower():
                return
            # The innermost frame in the dnc package names the line that synchronised.
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(DNC_DIR)]
            f = frames[-1] if frames else None
            where.append(f"{Path(f.filename).name}:{f.lineno} ({f.line.strip()[:80]})" if f else f"{Path(filename).name}:{lineno}")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    head_call(head, x, y, amp, ignore_index=-1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        out[name] = {"syncs": len(where), "where": sorted(set(where))}
    return out


# --------------------------------------------------------------------------------------------- targets
def targets(result: dict) -> dict:
    """The issue's targets, from this run's ratios (ratios of one run: comparable across machines)."""
    out = {}

    def put(name, value, limit, what, higher_is_better=False):
        if value is not None:
            out[name] = {"value": value, "limit": limit, "what": what,
                         "met": bool(value >= limit if higher_is_better else value <= limit)}

    p, s, h, cs = (result.get(k) or {} for k in ("pixel", "pixel_step", "head", "cap_scaling"))
    if p:
        put("pixel_update_speedup_over_loop", p["speedup_naive_over"]["update_sims_given"], 2.5,
            f"per-pixel update (N={p['sizes']['N']}) x faster than the per-class loop", True)
        put("pixel_update_temporary_over_sims", p["peak_over_sims"]["update_sims_given"], 0.1,
            "per-pixel update's temporary memory / the (N, C, K) fp32 similarities")
    if s:
        put("pixel_step_peak_over_sims", s["peak_over_sims"]["dnc"], 2.5,
            f"per-pixel head step's peak (N={s['sizes']['N']}) / the (N, C, K) fp32 similarities")
        put("pixel_step_aux_peak_over_sims", s["peak_over_sims"]["dnc_aux"], 3.0,
            "the same with the auxiliary losses")
    if h:
        put("head_step_over_linear_CK", h["ratio_vs_linear_CK"]["dnc_step"], 1.5,
            f"classification head step (B={h['sizes']['B']}, C={h['sizes']['C']}, K={h['sizes']['K']}, "
            f"D={h['sizes']['D']}, update every step) / a linear layer with C*K outputs")
    if cs:
        ns, cap = cs["sizes"]["N"], cs["sizes"]["max_per_class"]
        put("cap_time_growth", cs["growth_vs_smallest_N"][f"cap{cap}_N{ns[-1]}"], 1.5,
            f"update time with max_per_class={cap} at N={ns[-1]} / at N={ns[0]} "
            f"(no cap: x{cs['growth_vs_smallest_N'][f'nocap_N{ns[-1]}']:.2f})")
    return out


# --------------------------------------------------------------------------------------------- main
def mib(v) -> str:
    return "       -" if v is None else f"{v:8.1f}"


def print_table(part: dict, extra: Callable[[str], str] = lambda name: "") -> None:
    for name, v in part["ms"].items():
        print(f"  {name:<30}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]  "
              f"peak {mib(part.get('peak_mib', {}).get(name))} MiB{extra(name)}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="full sizes (default on CUDA; on the CPU: the pixel head step at N=262,144)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds, to check the script")
    ap.add_argument("--out", help="write all figures to this JSON file")
    ap.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                    help="autocast and feature dtype of the head steps (auto: bf16 on CUDA, none on the CPU)")
    ap.add_argument("--memory-size", type=int, default=1024, help="of dnc_memory (default: the ImageNet configs')")
    ap.add_argument("--update-interval", type=int, default=8, help="of dnc_memory (default: the ImageNet configs')")
    ap.add_argument("--max-per-class", type=int, default=4096, help="cap of the per-pixel variants (default: the shipped configs')")
    ap.add_argument("--parts", default="head,resnet,pixel,pixel_step,cap,kmeans,sync",
                    help="comma-separated subset of head,resnet,pixel,pixel_step,cap,kmeans,sync")
    ap.add_argument("--resnet", choices=("auto", "yes", "no"), default="auto",
                    help="measure ResNet-50 steps in the same run (auto: on CUDA only)")
    ap.add_argument("--resnet-batch", type=int, default=0, help="default: the head's batch (256)")
    ap.add_argument("--resnet-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--in-process", action="store_true",
                    help="run all parts in this process (default: each part in a fresh process of its own, so that "
                         "no part's figures depend on what the allocator kept from the one before)")
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = "smoke" if args.smoke else "full" if (args.full or device.type == "cuda") else "cpu"
    if args.smoke:
        args.memory_size, args.max_per_class = min(args.memory_size, 512), min(args.max_per_class, 64)
        args.resnet_size, args.resnet_batch = 64, args.resnet_batch or 8
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "none"
    dtype_feat = torch.bfloat16 if args.amp == "bf16" else torch.float32
    parts = set(args.parts.split(","))

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = {"benchmark": "head_overhead", "date": datetime.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
              "device": args.device, "size": args.size, "machine": machine(device), "code": code_version()}
    print(f"# head_overhead: device={args.device} sizes={args.size} amp={args.amp} "
          f"({result['machine'].get('gpu', result['machine']['cpu'])}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)", flush=True)

    def save():
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, out)

    isolate = not args.in_process and len(parts) > 1

    def child(name):
        """Run one part in a fresh process and merge its figures into ``result``."""
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "part.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--parts", name, "--out", str(out), "--in-process"]
            rc = subprocess.run(cmd).returncode
            part = json.loads(out.read_text()) if out.is_file() else {}
        skip = {"benchmark", "date", "command", "device", "size", "machine", "code", "wall_s", "targets", "sync_check"}
        result.update({k: v for k, v in part.items() if k not in skip and k != "errors"})
        if name == "sync" and "sync_check" in part:
            result["sync_check"] = part["sync_check"]
        errors = part.get("errors") or ({name: f"the part's process ended with code {rc}"} if rc else {})
        if errors:
            result.setdefault("errors", {}).update(errors)

    def guarded(name, fn):
        """Run one part; a failure is recorded and the other parts still run (a GPU lease is one shot)."""
        if name not in parts:
            return
        try:
            child(name) if isolate else fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            print(f"!! part {name} failed: {result['errors'][name]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        gc.collect()
        save()

    def part_head():
        h = result["head"] = head_steps(args, device, dtype_feat, amp)
        s = h["sizes"]
        print(f"\n## a. head training step  B={s['B']} C={s['C']} K={s['K']} D={s['D']} features={s['features']} "
              f"memory={s['memory']} ({s['steps_per_call']} steps per call, figures per step)")

        def extra(name):
            if name in h["ratio_vs_linear_CK"]:
                return f"  x{h['ratio_vs_linear_CK'][name]:.2f} linear_CK  x{h['ratio_vs_linear'][name]:.2f} linear"
            return f"  x{h['ratio_vs_linear']['linear_CK']:.2f} linear" if name == "linear_CK" else ""
        print_table(h, extra)
        print("  per-class loop / vectorised, clustering event: "
              + ", ".join(f"{k} x{v:.1f}" for k, v in h["event_speedup_naive_over_vectorised"].items())
              + f"; per-class loop step / dnc_step: x{h['naive_loop_step_over_dnc_step']:.2f}", flush=True)

    def part_resnet():
        r = result["resnet50"] = resnet_steps(args, device, amp, rounds=max(2, ROUNDS[args.size][1] // 3))
        print(f"\n## ResNet-50 step  batch={r['sizes']['batch']} {r['sizes']['img_size']}px {args.amp} channels_last")
        for name, v in r["ms"].items():
            print(f"  {name:<20}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]")

    def resnet_overhead():
        r = result["resnet50"]
        result["overhead_pct_whole_step"] = 100 * (r["ratio_dnc_over_linear"] - 1)
        print(f"\n## the DNC head in a ResNet-50 step: whole step, DNC(memory) / linear: x{r['ratio_dnc_over_linear']:.4f} "
              f"({result['overhead_pct_whole_step']:+.2f}%)")
        if "head" not in result:
            return
        h, lin_ms = result["head"], r["ms"]["resnet50_linear"]["median_ms"]
        added = h["added_ms_vs_linear"]["dnc_memory"]
        result["overhead_pct_of_resnet50_step"] = {
            name: 100 * h["added_ms_vs_linear"][name] / lin_ms for name in h["added_ms_vs_linear"]}
        result["target_head"] = {"added_ms_dnc_memory": added, "pct": 100 * added / lin_ms,
                                 "met": bool(added < 1.1 and 100 * added / lin_ms <= 2.0),
                                 "target": "DNC head adds <= 2% (< 1.1 ms amortised) to a ResNet-50 step"}
        for name, pct in result["overhead_pct_of_resnet50_step"].items():
            print(f"  head {name:<15} adds {pct:6.2f}% of a ResNet-50 step")

    def part_pixel():
        p = result["pixel"] = pixel_steps(args, device)
        s = p["sizes"]
        print(f"\n## b. per-pixel clustering step  N={s['N']} C={s['C']} K={s['K']} D={s['D']} "
              f"(class sizes {s['smallest_class']}-{s['largest_class']}, 5% ignored; fp32 similarities "
              f"{s['sims_fp32_mib']:.0f} MiB)")

        def extra(name):
            e = f"  (x{p['peak_over_sims'][name]:.3f} sims)" if p["peak_over_sims"].get(name) is not None else ""
            return e + (f"  loop/this x{p['speedup_naive_over'][name]:.2f}" if name in p["speedup_naive_over"] else "")
        print_table(p, extra)
        ck = p["check_vs_naive"]
        print(f"  vectorised vs per-class loop: assignment agreement {100 * ck['assignment_agreement']:.3f}%, "
              f"centroid max |diff| {ck['centroid_max_abs_diff']:.2e}", flush=True)
        if device.type == "cuda":
            ms = p["ms"]["update_sims_given"]["median_ms"]
            result["target_pixel"] = {"update_sims_given_ms": ms, "met": bool(ms < 12.0),
                                      "target": "per-pixel update (sims given) < 12 ms on a GPU"}

    def part_pixel_step():
        p = result["pixel_step"] = pixel_head_steps(args, device, dtype_feat, amp)
        s = p["sizes"]
        print(f"\n## c. per-pixel head step  N={s['N']} C={s['C']} K={s['K']} D={s['D']} cap={s['max_per_class']} "
              f"features={s['features']} (fp32 similarities {s['sims_fp32_mib']:.0f} MiB)")

        def extra(name):
            e = f"  (x{p['peak_over_sims'][name]:.2f} sims)" if p["peak_over_sims"].get(name) is not None else ""
            return e + (f"  x{p['ratio_vs_linear_CK'][name]:.2f} linear_CK" if name in p["ratio_vs_linear_CK"] else "")
        print_table(p, extra)
        print("  per-class loop step / this: " + ", ".join(f"{k} x{v:.2f}" for k, v in p["speedup_naive_over"].items()),
              flush=True)

    def part_cap():
        c = result["cap_scaling"] = cap_scaling(args, device)
        print(f"\n## d. max_per_class={c['sizes']['max_per_class']}, C={c['sizes']['C']}: update time against N")
        print_table(c, lambda name: f"  x{c['growth_vs_smallest_N'][name]:.2f} the smallest N")

    def part_kmeans():
        km = result["kmeans"] = kmeans_init(args, device)
        s = km["sizes"]
        print(f"\n## e. kmeans_pp initialisation  N={s['N']} C={s['C']} K={s['K']} D={s['D']} ({s['label_distribution']})")
        print_table(km)

    def part_sync():
        sc = result["sync_check"] = sync_check(args, device, dtype_feat, amp)
        print("\n## host-device synchronisations in one training step (torch.cuda.set_sync_debug_mode)")
        for name, v in sc.items():
            print(f"  {name:<34}{v['syncs']:3d}  {', '.join(v['where'])}")

    guarded("head", part_head)
    if args.resnet == "yes" or (args.resnet == "auto" and device.type == "cuda"):
        guarded("resnet", part_resnet)
    guarded("pixel", part_pixel)
    guarded("pixel_step", part_pixel_step)
    guarded("cap", part_cap)
    guarded("kmeans", part_kmeans)
    if device.type == "cuda":
        guarded("sync", part_sync)
    else:
        result["sync_check"] = "not run: needs CUDA"
    if "resnet50" in result:
        resnet_overhead()

    result["targets"] = targets(result)
    if result["targets"]:
        print("\n## targets (ratios of this run)")
        for name, t in result["targets"].items():
            print(f"  {'met   ' if t['met'] else 'NOT met'} {name}: {t['value']:.3f} (limit {t['limit']}) - {t['what']}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n(total {result['wall_s']} s)" + (f"; FAILED parts: {', '.join(result['errors'])}" if result.get("errors") else ""))
    save()
    if args.out:
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
