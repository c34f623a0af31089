#!/usr/bin/env python
"""Cost of the DNC head and of its clustering step, measured side by side with the baselines.

Usage::

    python benchmarks/head_overhead.py [--device cpu|cuda] [--full | --smoke] [--out FILE.json]

Default: full sizes on CUDA, reduced sizes on the CPU (the whole run takes about two minutes on two
cores). Three parts, every figure the median over interleaved rounds (warm-up first; CUDA events on a
GPU, ``time.perf_counter`` on the CPU), every ratio the median of the per-round ratios:

a. A training step of the head at ImageNet scale (B=256, C=1000, K=4, D=2048; D=512 reduced):
   ``head(features, labels)`` in training mode, cross-entropy, backward (everything a training step does
   in the head, the clustering update included), for the linear head, the DNC head's forward + backward
   alone, the DNC head with a per-step update, and the DNC head with a memory (default 4096 embeddings,
   clustered every 16 steps; amortised per step). With a ResNet-50 step measured in the same run (on a
   GPU: timm resnet50, batch 256, 224 px, bf16 autocast, channels_last, SGD), the head's added cost as a
   percentage of that step, and a whole ResNet-50 step with each head.
b. The per-pixel clustering step (N = 16 x 128 x 128 = 262,144 pixels, C=150, K=10, D=512; N=16,384
   reduced): ``SubCentroids.update`` with the similarities given (as in training), with and without
   ``max_per_class``, with the similarities computed in the step, and the N x D x (C*K) product alone.
c. A naive per-class Python loop of the same clustering update (as the original ProtoSeg code: for each
   class select its samples, Sinkhorn, update), timed on the same inputs like for like (given the
   similarities, or computing each class's own), and checked against the vectorised update; also on the
   memory clustering event of part a.

On CUDA, one training step of each DNC configuration also runs under
``torch.cuda.set_sync_debug_mode("warn")``; every host-device synchronisation is counted and located.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
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

try:
    import dnc
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import dnc

from dnc.centroids import SubCentroids  # noqa: E402
from dnc.heads import DNCHead, LinearHead  # noqa: E402

DNC_DIR = str(Path(dnc.__file__).resolve().parent)

# --------------------------------------------------------------------------------------------- sizes
SIZES = {
    # name: head (B, C, K, D), memory (size, interval), pixels (N, C, K, D), max_per_class
    "full": dict(head=(256, 1000, 4, 2048), pixel=(262_144, 150, 10, 512)),
    "reduced": dict(head=(256, 1000, 4, 512), pixel=(16_384, 150, 10, 512)),
    "smoke": dict(head=(64, 50, 4, 64), pixel=(2_048, 15, 10, 64)),
}
ROUNDS = {"full": (3, 30, 7), "reduced": (1, 7, 5), "smoke": (1, 2, 2)}  # warm-up, head rounds, pixel rounds


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


def interleaved(clock: Clock, fns: Dict[str, Callable[[], None]], per_call: Dict[str, int], warmup: int,
                rounds: int) -> Dict[str, List[float]]:
    """Run every function ``warmup`` times, then ``rounds`` rounds of one call each, in turn.

    Returns, per name, the time of each round divided by ``per_call[name]`` (steps per call), in ms.
    Interleaving keeps slow drifts of a shared machine out of the ratios.
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


def summary(samples: List[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(s), "q25_ms": q(0.25), "q75_ms": q(0.75), "n": len(s)}


def ratio(num: List[float], den: List[float]) -> float:
    """Median of the per-round ratios (both lists from the same interleaved rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


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
    src = Path(__file__).resolve().parents[1] / "src" / "dnc"
    out = {f: hashlib.sha1((src / f).read_bytes()).hexdigest()[:12] for f in ("centroids.py", "heads.py")
           if (src / f).is_file()}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=src, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        out["commit"] = git("rev-parse", "--short", "HEAD") or None
        out["uncommitted_changes"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def fmt(ms: float) -> str:
    return f"{ms:9.3f} ms"


# --------------------------------------------------------------------------------------------- part a
def head_steps(args, device, dtype_feat, amp) -> dict:
    b, c, k, d = SIZES[args.size]["head"]
    mem, interval = args.memory_size, args.update_interval
    warmup, rounds, _ = ROUNDS[args.size]
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(b, d, generator=g).to(device, dtype_feat).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g).to(device)

    heads = {
        "linear": LinearHead(d, c),
        "dnc_fwd_bwd": DNCHead(d, c, k),  # forward + backward only (no target: no clustering)
        "dnc_step": DNCHead(d, c, k),  # clustering of the batch at every step
        "dnc_memory": DNCHead(d, c, k, memory_size=mem, update_interval=interval),
    }
    for h in heads.values():
        h.to(device).train()

    def step(name):
        head = heads[name]
        with amp():
            if name == "dnc_fwd_bwd":
                logits, losses = head(feats), {}
            else:
                logits, losses = head(feats, labels)
            loss = F.cross_entropy(logits.float(), labels) + sum(losses.values())
        loss.backward()
        feats.grad = None
        for p in head.parameters():
            p.grad = None

    # One call = `interval` steps, so that the memory variant's figure is its amortised cost per step.
    fns = {name: (lambda name=name: [step(name) for _ in range(interval)]) for name in heads}
    per_call = {name: interval for name in heads}
    times = interleaved(Clock(device), fns, per_call, warmup, rounds)

    # The clustering event of the memory variant on its own: push one batch and cluster the whole memory,
    # against the naive per-class loop over the same memory.
    sc = SubCentroids(c, d, k, memory_size=mem, update_interval=1).to(device)
    zb = F.normalize(torch.randn(mem, d, generator=g), dim=1).to(device)
    yb = torch.randint(0, c, (mem,), generator=g).to(device)
    ok = (torch.rand(mem, generator=g) < 0.7).to(device)
    sc.update(zb, yb, ok)  # fills the memory
    z1, y1, ok1 = zb[:b], yb[:b], ok[:b]
    ev = interleaved(Clock(device), {
        "event_vectorised": lambda: sc.update(z1, y1, ok1),
        "event_naive_loop": lambda: naive_update(sc.centroids, sc.memory_z, sc.memory_y, sc.memory_ok,
                                                 momentum=sc.momentum),
    }, {}, 1, max(2, rounds // 3))
    times.update(ev)

    res = {"sizes": {"B": b, "C": c, "K": k, "D": d, "memory_size": mem, "update_interval": interval,
                     "features": str(dtype_feat).replace("torch.", ""), "autocast": args.amp},
           "ms": {name: summary(v) for name, v in times.items()}}
    lin = times["linear"]
    res["ratio_vs_linear"] = {name: ratio(times[name], lin) for name in heads if name != "linear"}
    res["added_ms_vs_linear"] = {name: statistics.median(a - l for a, l in zip(times[name], lin))
                                 for name in heads if name != "linear"}
    res["event_speedup_naive_over_vectorised"] = ratio(times["event_naive_loop"], times["event_vectorised"])
    res["naive_event_amortised_ms"] = res["ms"]["event_naive_loop"]["median_ms"] / interval
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


# --------------------------------------------------------------------------------------------- part b, c
def pixel_steps(args, device) -> dict:
    n, c, k, d = SIZES[args.size]["pixel"]
    warmup, _, rounds = ROUNDS[args.size]
    cap = args.max_per_class
    g = torch.Generator(device="cpu").manual_seed(2)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    # Class frequencies as skewed as in scene parsing (p_c ~ 1/(c+1)); 5% of the pixels are ignored (-1).
    probs = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
    labels = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = -1
    labels = labels.to(device)
    correct = (torch.rand(n, generator=g) < 0.7).to(device)
    base = SubCentroids(c, d, k).to(device)
    counts = torch.bincount(labels.clamp_min(0)[labels >= 0], minlength=c)
    sims = base.similarities(z)  # fp32 (N, C, K)
    sims_bf16 = sims.to(torch.bfloat16)
    p_flat = base.centroids.flatten(0, 1).contiguous()

    mods = {name: copy.deepcopy(base) for name in ("given", "given_bf16", "given_cap", "with_sims", "own_path")}
    mods["given_cap"].max_per_class = cap
    fns = {
        "matmul_N_D_CK": lambda: z @ p_flat.t(),
        "update_sims_given": lambda: mods["given"].update(z, labels, correct, sims),
        "update_sims_given_bf16": lambda: mods["given_bf16"].update(z, labels, correct, sims_bf16),
        f"update_sims_given_cap{cap}": lambda: mods["given_cap"].update(z, labels, correct, sims),
        "similarities_plus_update": lambda: mods["with_sims"].update(z, labels, correct,
                                                                      mods["with_sims"].similarities(z)),
        "update_own_similarities": lambda: mods["own_path"].update(z, labels, correct),
        "naive_loop_sims_given": lambda: naive_update(base.centroids, z, labels, correct, sims, base.momentum),
        "naive_loop_own_similarities": lambda: naive_update(base.centroids, z, labels, correct, None, base.momentum),
    }
    times = interleaved(Clock(device), fns, {}, warmup, rounds)

    # The vectorised step must equal the per-class loop on the same inputs (no cap: the cap is random).
    check = copy.deepcopy(base)
    got = check.update(z, labels, correct, sims)
    ref, ref_assign = naive_update(base.centroids, z, labels, correct, sims, base.momentum)
    agree = (got == ref_assign).float().mean().item()
    diff = (check.centroids - ref).abs().max().item()

    res = {"sizes": {"N": n, "C": c, "K": k, "D": d, "max_per_class": cap, "ignored_fraction": 0.05,
                     "largest_class": int(counts.max()), "smallest_class": int(counts.min()),
                     "label_distribution": "p_c ~ 1/(c+1)"},
           "ms": {name: summary(v) for name, v in times.items()}}
    # Like for like: the loop given the similarities against the update given them, and the loop that
    # computes each class's own similarities against the update that does (the memory path).
    res["speedup_naive_over"] = {name: ratio(times["naive_loop_sims_given"], times[name])
                                 for name in times if name.startswith("update_sims_given")}
    res["speedup_naive_over"]["update_own_similarities"] = ratio(times["naive_loop_own_similarities"],
                                                                 times["update_own_similarities"])
    res["ratio_vs_matmul"] = {name: ratio(times[name], times["matmul_N_D_CK"]) for name in times if name != "matmul_N_D_CK"}
    res["check_vs_naive"] = {"assignment_agreement": agree, "centroid_max_abs_diff": diff}
    return res


# --------------------------------------------------------------------------------------------- sync check
def sync_check(args, device, dtype_feat, amp) -> dict:
    """Count host-device synchronisations in one training step of each DNC configuration."""
    b, c, k, d = SIZES[args.size]["head"]
    n, pc, pk, pd = SIZES[args.size]["pixel"]
    g = torch.Generator(device="cpu").manual_seed(3)
    feats = torch.randn(b, d, generator=g).to(device, dtype_feat).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    pfeats = torch.randn(n, pd, generator=g).to(device, dtype_feat).requires_grad_(True)
    plabels = torch.randint(-1, pc, (n,), generator=g).to(device)
    cases = {
        "dnc_step": (DNCHead(d, c, k), feats, labels, 1),
        "dnc_memory_cycle": (DNCHead(d, c, k, memory_size=args.memory_size, update_interval=args.update_interval),
                             feats, labels, args.update_interval),
        "linear": (LinearHead(d, c), feats, labels, 1),
        f"pixel_dnc_cap{args.max_per_class}_aux": (
            DNCHead(pd, pc, pk, max_per_class=args.max_per_class, contrast_weight=0.01, compact_weight=0.001),
            pfeats, plabels, 1),
    }

    def step(head, x, y):
        with amp():
            logits, losses = head(x, y)
            loss = F.cross_entropy(logits.float(), y, ignore_index=-1) + sum(losses.values())
        loss.backward()

    out = {}
    for name, (head, x, y, steps) in cases.items():
        head.to(device).train()
        for _ in range(2 * steps):  # warm-up: lazy initialisations may synchronise once
            step(head, x, y)
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
                    step(head, x, y)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        out[name] = {"syncs": len(where), "where": sorted(set(where))}
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="full sizes (default on CUDA)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds, to check the script")
    ap.add_argument("--out", help="write all figures to this JSON file")
    ap.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                    help="autocast and feature dtype of the head steps (auto: bf16 on CUDA, none on the CPU)")
    ap.add_argument("--memory-size", type=int, default=4096)
    ap.add_argument("--update-interval", type=int, default=16)
    ap.add_argument("--max-per-class", type=int, default=4096, help="cap of the per-pixel variant (0: none)")
    ap.add_argument("--resnet", choices=("auto", "yes", "no"), default="auto",
                    help="measure ResNet-50 steps in the same run (auto: on CUDA only)")
    ap.add_argument("--resnet-batch", type=int, default=0, help="default: the head's batch (256)")
    ap.add_argument("--resnet-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = "smoke" if args.smoke else "full" if (args.full or device.type == "cuda") else "reduced"
    if args.smoke:
        args.memory_size, args.max_per_class = min(args.memory_size, 512), min(args.max_per_class, 64)
        args.update_interval = min(args.update_interval, 4)
        args.resnet_size, args.resnet_batch = 64, args.resnet_batch or 8
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "none"
    dtype_feat = torch.bfloat16 if args.amp == "bf16" else torch.float32

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
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def guarded(name, fn):
        """Run one part; a failure is recorded and the other parts still run (a GPU lease is one shot)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            print(f"!! part {name} failed: {result['errors'][name]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()

    def part_head():
        h = result["head"] = head_steps(args, device, dtype_feat, amp)
        s = h["sizes"]
        print(f"\n## a. head training step  B={s['B']} C={s['C']} K={s['K']} D={s['D']} features={s['features']} "
              f"memory={s['memory_size']}/{s['update_interval']}")
        for name, v in h["ms"].items():
            extra = ""
            if name in h["ratio_vs_linear"]:
                extra = f"  x{h['ratio_vs_linear'][name]:.2f} linear  (+{h['added_ms_vs_linear'][name]:.3f} ms)"
            print(f"  {name:<20}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]{extra}")
        print(f"  naive per-class loop event / vectorised event: x{h['event_speedup_naive_over_vectorised']:.1f}"
              f"  (naive amortised over {s['update_interval']} steps: {h['naive_event_amortised_ms']:.3f} ms/step)",
              flush=True)

    def part_resnet():
        r = result["resnet50"] = resnet_steps(args, device, amp, rounds=max(2, ROUNDS[args.size][1] // 3))
        print(f"\n## ResNet-50 step  batch={r['sizes']['batch']} {r['sizes']['img_size']}px {args.amp} channels_last")
        for name, v in r["ms"].items():
            print(f"  {name:<20}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]")
        result["overhead_pct_whole_step"] = 100 * (r["ratio_dnc_over_linear"] - 1)
        print(f"  whole step, DNC(memory) / linear: x{r['ratio_dnc_over_linear']:.4f} "
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
        print(f"\n## b/c. per-pixel clustering step  N={s['N']} C={s['C']} K={s['K']} D={s['D']} "
              f"(class sizes {s['smallest_class']}-{s['largest_class']}, 5% ignored)")
        for name, v in p["ms"].items():
            extra = f"  naive/this x{p['speedup_naive_over'][name]:.1f}" if name in p["speedup_naive_over"] else ""
            print(f"  {name:<28}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]{extra}")
        ck = p["check_vs_naive"]
        print(f"  vectorised vs naive: assignment agreement {100 * ck['assignment_agreement']:.3f}%, "
              f"centroid max |diff| {ck['centroid_max_abs_diff']:.2e}", flush=True)
        if device.type == "cuda":
            ms = p["ms"]["update_sims_given"]["median_ms"]
            result["target_pixel"] = {"update_sims_given_ms": ms, "met": bool(ms < 12.0),
                                      "target": "per-pixel update (sims given) < 12 ms on a GPU"}

    def part_sync():
        sc = result["sync_check"] = sync_check(args, device, dtype_feat, amp)
        print("\n## host-device synchronisations in one training step (torch.cuda.set_sync_debug_mode)")
        for name, v in sc.items():
            print(f"  {name:<28}{v['syncs']:3d}  {', '.join(v['where'])}")

    guarded("head", part_head)
    if args.resnet == "yes" or (args.resnet == "auto" and device.type == "cuda"):
        guarded("resnet50", part_resnet)
    else:
        print("\n(ResNet-50 step not measured: --resnet yes to force it on the CPU)")
    guarded("pixel", part_pixel)
    if device.type == "cuda":
        guarded("sync_check", part_sync)
    else:
        result["sync_check"] = "not run: needs CUDA"

    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n(total {result['wall_s']} s)" + (f"; FAILED parts: {', '.join(result['errors'])}" if result.get("errors") else ""))
    save()
    if args.out:
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
