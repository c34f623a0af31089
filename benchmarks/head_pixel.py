"""``head_overhead.py`` parts b to e, per pixel: the clustering step given the similarities (b), the pixel
head's training step (c), the time of ``max_per_class`` against the number of pixels (d), and the k-means++
initialisation (e)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import Clock, Peak, interleaved, peaks, print_table, ratio, summary
from head_cases import ROUNDS, SIZES, head_call, naive_head_step, naive_update, skewed_labels

from dnc.centroids import SubCentroids
from dnc.heads import DNCHead, LinearHead


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



def show_pixel(result: dict, args, device) -> None:
    p = result["pixel"]
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


def show_pixel_step(result: dict, args, device) -> None:
    p = result["pixel_step"]
    s = p["sizes"]
    print(f"\n## c. per-pixel head step  N={s['N']} C={s['C']} K={s['K']} D={s['D']} cap={s['max_per_class']} "
          f"features={s['features']} (fp32 similarities {s['sims_fp32_mib']:.0f} MiB)")

    def extra(name):
        e = f"  (x{p['peak_over_sims'][name]:.2f} sims)" if p["peak_over_sims"].get(name) is not None else ""
        return e + (f"  x{p['ratio_vs_linear_CK'][name]:.2f} linear_CK" if name in p["ratio_vs_linear_CK"] else "")
    print_table(p, extra)
    print("  per-class loop step / this: " + ", ".join(f"{k} x{v:.2f}" for k, v in p["speedup_naive_over"].items()),
          flush=True)


def show_cap(result: dict, args, device) -> None:
    c = result["cap_scaling"]
    print(f"\n## d. max_per_class={c['sizes']['max_per_class']}, C={c['sizes']['C']}: update time against N")
    print_table(c, lambda name: f"  x{c['growth_vs_smallest_N'][name]:.2f} the smallest N")


def show_kmeans(result: dict, args, device) -> None:
    km = result["kmeans"]
    s = km["sizes"]
    print(f"\n## e. kmeans_pp initialisation  N={s['N']} C={s['C']} K={s['K']} D={s['D']} ({s['label_distribution']})")
    print_table(km)
