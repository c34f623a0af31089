#!/usr/bin/env python
"""CPU latency of a deployed DNC classifier: onnxruntime against eager PyTorch and TorchScript, in one run.

Usage::

    python benchmarks/deploy_latency.py [--backbone resnet18] [--size 224] [--classes 100] [--threads 2]
                                        [--reps 5] [--out FILE.json]

A random-weight classifier (the latency does not depend on the weights) is saved as a checkpoint and
exported with ``dnc export`` (ONNX with its ``logits`` and ``score`` outputs, TorchScript). Each runtime
then runs in a process of its own (so that its peak resident memory is its own: the ONNX process
imports only onnxruntime and numpy), on batches of 1 and 32 normalised images: one warm-up call, then
the median of ``--reps`` timed calls (``time.perf_counter``), reported per image. Peak memory is the
process's peak resident set size (``VmHWM``) after loading the model and running every batch.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = (1, 32)


def _worker(runtime: str, path: str, size: int, threads: int, reps: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    if runtime == "onnxruntime":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"images": x})  # noqa: E731
    else:
        import torch
        torch.set_num_threads(threads)
        if runtime == "torchscript":
            model = torch.jit.load(path, map_location="cpu").eval()
        else:
            from dnc.tasks import load_model
            model = load_model(path)[0]

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x))
    out = {}
    for b in BATCHES:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        run(x)  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
        out[f"batch{b}_ms_per_image"] = round(1000 * statistics.median(times) / b, 3)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (Linux; ``ru_maxrss`` would include the parent's
    size at the fork), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, metavar="FILE.json")
    ap.add_argument("--worker", nargs=2, metavar=("RUNTIME", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.size, args.threads, args.reps)))
        return 0

    import torch

    from dnc.config import load_config, to_dict
    from dnc.engine import save_checkpoint
    from dnc.export import run_export
    from dnc.tasks import build_model
    cfg = load_config("demo/digits_dnc.yaml", (f"model.backbone={args.backbone}", "model.backbone_kwargs={}",
                                               f"data.num_classes={args.classes}", "data.preset=imagenet",
                                               f"data.img_size={args.size}"))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint.pt"
        save_checkpoint(ckpt, {"model": build_model(cfg, pretrained="").state_dict(), "config": to_dict(cfg)})
        files = {"eager": str(ckpt)}
        for fmt, name in (("onnx", "onnxruntime"), ("torchscript", "torchscript")):
            files[name] = str(Path(tmp) / f"model.{'onnx' if fmt == 'onnx' else 'pt'}")
            run_export(ckpt, fmt, files[name])
        results = {}
        for runtime in ("eager", "torchscript", "onnxruntime"):
            cmd = [sys.executable, __file__, "--worker", runtime, files[runtime], "--size", str(args.size),
                   "--threads", str(args.threads), "--reps", str(args.reps)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if r.returncode:
                raise SystemExit(f"{runtime}: {r.stderr.strip().splitlines()[-1]}")
            results[runtime] = json.loads(r.stdout.strip().splitlines()[-1])
    import onnxruntime
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
              "model": {"backbone": args.backbone, "head": "dnc", "classes": args.classes, "size": args.size},
              "threads": args.threads, "reps": args.reps, "results": results}
    print(f"{'runtime':<12} " + " ".join(f"{'batch ' + str(b) + ' ms/img':>16}" for b in BATCHES) + f" {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:<12} " + " ".join(f"{r[f'batch{b}_ms_per_image']:>16.2f}" for b in BATCHES)
              + f" {r['peak_rss_mib']:>13.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
