#!/usr/bin/env python
"""Markdown tables from one or more ``head_overhead.py --out`` files: per figure, the median over the
files (repeated runs of the same command on the same machine), with the range when there are several.

    python benchmarks/summarize_head.py RUN1.json [RUN2.json ...]
"""
from __future__ import annotations

import json
import statistics
import sys


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    digits = 3 if abs(m) < 10 else 1 if abs(m) < 1000 else 0
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"



def table(runs, part: str, header: tuple, ratios: tuple) -> None:
    """A Markdown table of ``runs[i][part]``: median ms per entry and the median of each ratio field."""
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    first = runs[0][part]
    for name in first["ms"]:
        cells = [med([r[part]["ms"][name]["median_ms"] for r in runs])]
        cells += [med([r[part][f].get(name) for r in runs]) if name in first[f] else "" for f in ratios]
        print(f"| {name} | " + " | ".join(cells) + " |")

def main(paths) -> int:
    runs = [json.load(open(p)) for p in paths]
    r0 = runs[0]
    n = len(runs)
    words = r0["command"].split()
    command = " ".join(w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out"))
    print(f"{n} run(s) of `{command}` on {r0['machine'].get('gpu') or r0['machine']['cpu']} "
          f"({r0['machine']['cpu_count']} CPUs, torch {r0['machine']['torch']}, {r0['machine']['torch_threads']} threads), "
          f"{r0['date']}; code {r0.get('code')}. Median over the runs (range); each run's figure is itself the median "
          f"of interleaved rounds, and each ratio the median of per-round ratios.\n")

    h = r0["head"]["sizes"]
    print(f"**a. Head training step** (B={h['B']}, C={h['C']}, K={h['K']}, D={h['D']}, features {h['features']}, "
          f"memory {h['memory_size']} / every {h['update_interval']} steps)\n")
    table(runs, "head", ("variant", "ms per step", "x linear", "added ms vs linear"),
          ("ratio_vs_linear", "added_ms_vs_linear"))
    print(f"\nnaive per-class loop / vectorised, memory clustering event: "
          f"x{med([r['head']['event_speedup_naive_over_vectorised'] for r in runs])}")
    if "resnet50" in r0:
        print("\n| ResNet-50 step | ms |\n| --- | --- |")
        for name in r0["resnet50"]["ms"]:
            print(f"| {name} | {med([r['resnet50']['ms'][name]['median_ms'] for r in runs])} |")
        for name in r0["overhead_pct_of_resnet50_step"]:
            print(f"\nhead {name}: adds {med([r['overhead_pct_of_resnet50_step'][name] for r in runs])} % of a ResNet-50 step")
        print(f"\nwhole step DNC(memory) vs linear: {med([r['overhead_pct_whole_step'] for r in runs])} %")

    p = r0["pixel"]["sizes"]
    print(f"\n**b/c. Per-pixel clustering step** (N={p['N']}, C={p['C']}, K={p['K']}, D={p['D']}, class sizes "
          f"{p['smallest_class']}-{p['largest_class']} ({p['label_distribution']}), 5% ignored, cap {p['max_per_class']})\n")
    table(runs, "pixel", ("what", "ms", "naive loop / this (like for like)", "this / matmul"),
          ("speedup_naive_over", "ratio_vs_matmul"))
    ck = [r["pixel"]["check_vs_naive"] for r in runs]
    print(f"\nvectorised vs naive loop on the same inputs: assignment agreement "
          f"{min(c['assignment_agreement'] for c in ck) * 100:.3f}% (worst run), centroid max |diff| "
          f"{max(c['centroid_max_abs_diff'] for c in ck):.1e}")
    sc = r0.get("sync_check")
    if isinstance(sc, dict):
        print("\n| training step | host-device syncs | where |\n| --- | --- | --- |")
        for name, v in sc.items():
            print(f"| {name} | {v['syncs']} | {'; '.join(v['where'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
