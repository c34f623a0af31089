"""``head_overhead.py``, CUDA only: host-device synchronisations in one training step of each DNC configuration,
counted and located under ``torch.cuda.set_sync_debug_mode("warn")``."""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import List

import torch
from head_cases import MEMORY_SETTINGS, SIZES, head_call

import dnc
from dnc.heads import DNCHead, LinearHead

DNC_DIR = str(Path(dnc.__file__).resolve().parent)


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



def show_sync(result: dict, args, device) -> None:
    sc = result["sync_check"]
    print("\n## host-device synchronisations in one training step (torch.cuda.set_sync_debug_mode)")
    for name, v in sc.items():
        print(f"  {name:<34}{v['syncs']:3d}  {', '.join(v['where'])}")
