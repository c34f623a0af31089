#!/usr/bin/env python
"""Markdown tables from one or more ``head_overhead.py --out`` files: per figure, the median over the
files (repeated runs of the same command on the same machine), with the range when there are several.

    python benchmarks/summarize_head.py RUN1.json [RUN2.json ...]
"""
from __future__ import annotations

import json
import statistics
import sys


def med(values, digits=None):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    if digits is None:
        digits = 3 if abs(m) < 10 else 1 if abs(m) < 1000 else 0
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(runs, part: str, columns) -> None:
    """A Markdown table of ``runs[i][part]``, one row per timed entry. ``columns``: (header, field,
    digits); field ``ms`` is the median time, any other a ``name -> value`` dict of the part."""
    print("| " + " | ".join(["what"] + [h for h, _, _ in columns]) + " |\n|" + " --- |" * (len(columns) + 1))
    for name in runs[0][part]["ms"]:
        cells = []
        for _, field, digits in columns:
            if field == "ms":
                cells.append(med([r[part]["ms"][name]["median_ms"] for r in runs], digits))
            elif name in (runs[0][part].get(field) or {}):
                cells.append(med([(r[part].get(field) or {}).get(name) for r in runs], digits))
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(paths) -> int:
    runs = [json.load(open(p)) for p in paths]
    r0 = runs[0]
    words = r0["command"].split()
    command = " ".join(w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out"))
    print(f"{len(runs)} run(s) of `{command}` on {r0['machine'].get('gpu') or r0['machine']['cpu']} "
          f"({r0['machine']['cpu_count']} CPUs, torch {r0['machine']['torch']}, {r0['machine']['torch_threads']} threads), "
          f"{r0['date']}; code {r0.get('code')}. Median over the runs (range); each run's time is itself the median "
          f"of interleaved rounds, each ratio the median of per-round ratios; peaks in MiB above the memory in use "
          f"before the call.\n")

    if "head" in r0:
        h = r0["head"]["sizes"]
        print(f"**a. Head training step** (B={h['B']}, C={h['C']}, K={h['K']}, D={h['D']}, features {h['features']}; "
              f"memory settings {h['memory']}; figures per step, amortised over {h['steps_per_call']} steps)\n")
        table(runs, "head", [("ms per step", "ms", None), ("x linear C*K", "ratio_vs_linear_CK", 2),
                             ("x linear C", "ratio_vs_linear", 2), ("peak MiB", "peak_mib", 1)])
        for name in r0["head"]["event_speedup_naive_over_vectorised"]:
            print(f"\nper-class loop / vectorised, clustering event of {name}: "
                  f"x{med([r['head']['event_speedup_naive_over_vectorised'][name] for r in runs], 2)}")
        print(f"\nper-class loop step / dnc_step: x{med([r['head']['naive_loop_step_over_dnc_step'] for r in runs], 2)}")
    if "resnet50" in r0:
        print("\n| ResNet-50 step | ms |\n| --- | --- |")
        for name in r0["resnet50"]["ms"]:
            print(f"| {name} | {med([r['resnet50']['ms'][name]['median_ms'] for r in runs])} |")
        for name in r0.get("overhead_pct_of_resnet50_step", {}):
            print(f"\nhead {name}: adds {med([r['overhead_pct_of_resnet50_step'][name] for r in runs])} % of a ResNet-50 step")
        print(f"\nwhole step DNC(memory) vs linear: {med([r['overhead_pct_whole_step'] for r in runs])} %")
    if "pixel" in r0:
        p = r0["pixel"]["sizes"]
        print(f"\n**b. Per-pixel clustering step** (N={p['N']}, C={p['C']}, K={p['K']}, D={p['D']}, class sizes "
              f"{p['smallest_class']}-{p['largest_class']} ({p['label_distribution']}), 5% ignored; fp32 (N, C, K) "
              f"similarities {p['sims_fp32_mib']:.0f} MiB)\n")
        table(runs, "pixel", [("ms", "ms", None), ("loop / this (like for like)", "speedup_naive_over", 2),
                              ("peak MiB", "peak_mib", 1), ("peak / similarities", "peak_over_sims", 3)])
        ck = [r["pixel"]["check_vs_naive"] for r in runs]
        print(f"\nvectorised vs per-class loop on the same inputs: assignment agreement "
              f"{min(c['assignment_agreement'] for c in ck) * 100:.3f}% (worst run), sub-centroid max |diff| "
              f"{max(c['centroid_max_abs_diff'] for c in ck):.1e}")
    if "pixel_step" in r0:
        s = r0["pixel_step"]["sizes"]
        print(f"\n**c. Per-pixel head step** (N={s['N']}, C={s['C']}, K={s['K']}, D={s['D']}, max_per_class "
              f"{s['max_per_class']}, features {s['features']}; fp32 similarities {s['sims_fp32_mib']:.0f} MiB)\n")
        table(runs, "pixel_step", [("ms", "ms", None), ("x linear C*K", "ratio_vs_linear_CK", 2),
                                   ("peak MiB", "peak_mib", 1), ("peak / similarities", "peak_over_sims", 2)])
    if "cap_scaling" in r0:
        c = r0["cap_scaling"]["sizes"]
        print(f"\n**d. `max_per_class`** ({c['max_per_class']} x C={c['C']} slots, K={c['K']}, D={c['D']}): "
              f"update time against N\n")
        table(runs, "cap_scaling", [("ms", "ms", None), ("x the smallest N", "growth_vs_smallest_N", 2)])
    if "kmeans" in r0:
        km = r0["kmeans"]["sizes"]
        print(f"\n**e. `kmeans_pp`** (N={km['N']}, C={km['C']}, K={km['K']}, D={km['D']}, {km['label_distribution']})\n")
        table(runs, "kmeans", [("ms", "ms", None), ("peak MiB", "peak_mib", 1)])
    if r0.get("targets"):
        print("\n| target | limit | value: median (range) | met |\n| --- | --- | --- | --- |")
        for name, t in r0["targets"].items():
            values = [r["targets"][name]["value"] for r in runs if name in r.get("targets", {})]
            met = sum(r["targets"][name]["met"] for r in runs if name in r.get("targets", {}))
            print(f"| {t['what']} | {t['limit']} | {med(values, 3)} | {met} of {len(values)} runs |")
    sc = r0.get("sync_check")
    if isinstance(sc, dict):
        print("\n| training step | host-device syncs | where |\n| --- | --- | --- |")
        for name, v in sc.items():
            print(f"| {name} | {v['syncs']} | {'; '.join(v['where'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
