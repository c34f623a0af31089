"""``head_overhead.py`` part a: the classification head's training step against a linear layer and the
per-class loop (and on CUDA, whole ResNet-50 steps with each head)."""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from common import Clock, Peak, fmt, interleaved, peaks, print_table, ratio, summary
from head_cases import MEMORY_SETTINGS, ROUNDS, SIZES, head_call, naive_head_step, naive_update

from dnc.centroids import SubCentroids
from dnc.heads import DNCHead, LinearHead


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



def show_head(result: dict, args, device) -> None:
    h = result["head"]
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


def show_resnet(result: dict, args, device) -> None:
    r = result["resnet50"]
    print(f"\n## ResNet-50 step  batch={r['sizes']['batch']} {r['sizes']['img_size']}px {args.amp} channels_last")
    for name, v in r["ms"].items():
        print(f"  {name:<20}{fmt(v['median_ms'])}  [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}]")


def resnet_overhead(result: dict) -> None:
    """The DNC head's share of a ResNet-50 step: of the whole step, and (with part a) per head variant."""
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
