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

The parts live in ``head_classification.py`` (a, ResNet-50), ``head_pixel.py`` (b-e) and ``head_sync.py``;
their sizes and the per-class loop reference in ``head_cases.py``; timing and memory in ``common.py``.
"""
from __future__ import annotations

import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import common
import torch
from head_cases import ROUNDS
from head_classification import head_steps, resnet_overhead, resnet_steps, show_head, show_resnet
from head_pixel import (cap_scaling, kmeans_init, pixel_head_steps, pixel_steps, show_cap, show_kmeans, show_pixel,
                        show_pixel_step)
from head_sync import show_sync, sync_check

common.keep_freed_memory()

# part: (key of its figures in the result, measure(run), show(result, args, device))
PARTS = {
    "head": ("head", lambda r: head_steps(r.args, r.device, r.dtype_feat, r.amp), show_head),
    "resnet": ("resnet50", lambda r: resnet_steps(r.args, r.device, r.amp, rounds=max(2, ROUNDS[r.args.size][1] // 3)),
               show_resnet),
    "pixel": ("pixel", lambda r: pixel_steps(r.args, r.device), show_pixel),
    "pixel_step": ("pixel_step", lambda r: pixel_head_steps(r.args, r.device, r.dtype_feat, r.amp), show_pixel_step),
    "cap": ("cap_scaling", lambda r: cap_scaling(r.args, r.device), show_cap),
    "kmeans": ("kmeans", lambda r: kmeans_init(r.args, r.device), show_kmeans),
    "sync": ("sync_check", lambda r: sync_check(r.args, r.device, r.dtype_feat, r.amp), show_sync),
}


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




def parse(argv) -> SimpleNamespace:
    """The options, and what follows from them: ``device``, ``size``, features dtype and autocast."""
    ap = common.parser(__doc__, device=True, threads=True)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="full sizes (default on CUDA; on the CPU: the pixel head step at N=262,144)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds, to check the script")
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
    ap.add_argument("--in-process", action="store_true",
                    help="run all parts in this process (default: each part in a fresh process of its own, so that "
                         "no part's figures depend on what the allocator kept from the one before)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    common.set_threads(args.threads)
    args.size = "smoke" if args.smoke else "full" if (args.full or device.type == "cuda") else "cpu"
    if args.smoke:
        args.memory_size, args.max_per_class = min(args.memory_size, 512), min(args.max_per_class, 64)
        args.resnet_size, args.resnet_batch = 64, args.resnet_batch or 8
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "none"

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    return SimpleNamespace(args=args, device=device, amp=amp, parts=set(args.parts.split(",")),
                           dtype_feat=torch.bfloat16 if args.amp == "bf16" else torch.float32,
                           argv=list(sys.argv[1:] if argv is None else argv))


def child(run: SimpleNamespace, name: str, result: dict) -> None:
    """Run one part in a fresh process and merge its figures into ``result``."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *run.argv, "--parts", name, "--out", str(out), "--in-process"]
        rc = subprocess.run(cmd).returncode
        part = json.loads(out.read_text()) if out.is_file() else {}
    skip = {"benchmark", "date", "command", "device", "size", "machine", "code", "wall_s", "targets", "sync_check"}
    result.update({k: v for k, v in part.items() if k not in skip and k != "errors"})
    if name == "sync" and "sync_check" in part:
        result["sync_check"] = part["sync_check"]
    errors = part.get("errors") or ({name: f"the part's process ended with code {rc}"} if rc else {})
    if errors:
        result.setdefault("errors", {}).update(errors)


def guarded(run: SimpleNamespace, name: str, result: dict) -> None:
    """Run one part (in a process of its own unless ``--in-process``); a failure is recorded and the other
    parts still run (a GPU lease is one shot)."""
    if name not in run.parts:
        return
    try:
        if not run.args.in_process and len(run.parts) > 1:
            child(run, name, result)
        else:
            key, measure, show = PARTS[name]
            result[key] = measure(run)
            show(result, run.args, run.device)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
        print(f"!! part {name} failed: {result['errors'][name]}", flush=True)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    gc.collect()
    if run.args.out:
        common.write_json(run.args.out, result)


def main(argv=None) -> dict:
    run = parse(argv)
    args, device = run.args, run.device
    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = {"benchmark": "head_overhead", "date": datetime.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).as_posix()] + run.argv),
              "device": args.device, "size": args.size, "machine": common.machine(device), "code": common.code_version()}
    print(f"# head_overhead: device={args.device} sizes={args.size} amp={args.amp} "
          f"({result['machine'].get('gpu', result['machine']['cpu'])}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)", flush=True)
    for name in PARTS:
        if name == "resnet" and not (args.resnet == "yes" or (args.resnet == "auto" and device.type == "cuda")):
            continue
        if name == "sync" and device.type != "cuda":
            result["sync_check"] = "not run: needs CUDA"
            continue
        guarded(run, name, result)
    if "resnet50" in result:
        resnet_overhead(result)
    result["targets"] = targets(result)
    if result["targets"]:
        print("\n## targets (ratios of this run)")
        for name, t in result["targets"].items():
            print(f"  {'met   ' if t['met'] else 'NOT met'} {name}: {t['value']:.3f} (limit {t['limit']}) - {t['what']}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n(total {result['wall_s']} s)" + (f"; FAILED parts: {', '.join(result['errors'])}" if result.get("errors") else ""))
    if args.out:
        common.write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
