#!/usr/bin/env python3
"""Every GPU measurement the issues ask for, in ONE call of the device tool (about 9 minutes).

From the repository root on this machine, with the data archives copied into the ignored ``.data/``::

    mkdir -p .data && cp CIFAR10_JPEG_ARCHIVE CAMVID_TRAIN_ARCHIVE CAMVID_VAL_ARCHIVE .data/   # see BENCHMARKS.md

then one device call (tool ``run``)::

    command: bash benchmarks/gpu_suite.sh --data .data     (= PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --data .data)
    carry:   [".data", ".whl"]          timeout_s: 600

It runs, in this order, and writes every figure under ``$OUT`` (without it: /tmp/dnc_suite/out) after
each step: summary.json, summary.txt, head_overhead.json, logs.tar.gz; a cut-off call still returns
what it measured:

1. ``benchmarks/head_overhead.py --device cuda --full``: the head's cost at ImageNet scale against the
   linear head and a ResNet-50 step, the per-pixel clustering step, the naive per-class loop, the
   host-device synchronisation check.
2. CIFAR-10 from the JPEG copy, validation = the last 500 images of each class (``data.holdout=5000``),
   ResNet-18 (CIFAR stem), DNC and linear heads with the identical recipe
   (``configs/cifar10_jpeg/resnet18_1xb512_25e_{dnc,linear}.yaml``: batch 512, SGD nesterov, lr 0.2 cosine
   with warm-up, wd 5e-4, bf16, channels_last), seeds 0 and 1; top-1 and wall time per run.
3. CamVid (240x180 copy), ResNet-18 OS8 + FCN, DNC and linear (the configs under
   ``src/dnc/configs/segmentation/camvid/``), seed 0; mIoU on the 101 validation images and wall time.

Time budget (``--budget``, default 540 s, inside the device tool's 600 s command limit; the machine's
start, ~1-2 min, comes on top: ~11 of the 15 device minutes). The arithmetic, with estimates to be
replaced by what step 1 and the calibration measure:

* set-up (check packages, extract 50k JPEGs, pre-decode them with 16 processes): ~15 s;
* head_overhead.py at full sizes: ~60 s (ResNet-50 steps 2 x 11 x 16 x ~55 ms = 19 s, the rest < 20 s,
  plus imports and CUDA start-up);
* CIFAR calibration: a 100-iteration run of the linear recipe (~25 s) gives the steady seconds per
  iteration (data loading and GPU together) and the fixed cost of a run (start-up, evaluation, checkpoint);
* CamVid: 2 runs of 2,000 iterations of batch 16, reserved at 70 s each (ANCHORS: 24-26 s per run with a
  fast pipeline; ours decodes with PIL in 14 workers), 140 s;
* CIFAR gets the rest: 4 runs (2 heads x 2 seeds) of E epochs of 87 iterations each, with
  E = min(25, floor(((540 - 15 - 60 - 25 - 140 - 15) / 4 - fixed) / (87 * s_per_iter * 1.05))).
  ANCHORS' ~1 s per epoch (25 s per 25-epoch run, H200, fast pipeline) would allow the full 25 epochs.
  Our loader costs, per image and worker process (benchmarks/loader_throughput.py on this project's
  2-core CPU machine, BENCHMARKS.md): ~0.83 ms from the JPEG folder, ~0.55 ms pre-decoded, of which
  ~0.24 ms is the per-sample ``torch.manual_seed``. Over 14 workers that is 45,000 x 0.55 ms / 14 =
  ~1.8 s per epoch pre-decoded (~2.7 s from JPEGs), so the loader, not the GPU, likely sets the pace
  (if the device's cores are no faster than these): E = 25 fits if a run costs
  at most (540 - 255) / 4 = ~71 s, i.e. ~2.4 s per epoch with ~12 s fixed; the calibration checks it on
  the device's own cores and lowers E if needed. Pre-decoding the JPEGs once into the CIFAR python-batch
  layout (``--cifar-format pickle``, the default: the same images, labels and split, verified pixel for
  pixel) takes the JPEG decode out of every epoch (x1.6 per sample here).
  ``--cifar-epochs 25`` forces the ANCHORS schedule (then expect to drop a seed or CamVid).

Before each run the remaining budget is checked against the run's estimate; a run that does not fit is
skipped and reported as such, and every run has its own time limit. ``--parts`` selects steps (e.g.
``--parts cifar`` for a session that has the head figures already). ``--smoke`` is a dry run on the CPU
with tiny sizes (a few minutes): it checks the whole script, not the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR_CONFIGS = {h: REPO / "src" / "dnc" / "configs" / "cifar10_jpeg" / f"resnet18_1xb512_25e_{h}.yaml" for h in ("dnc", "linear")}
CAMVID_DIR = REPO / "src" / "dnc" / "configs" / "segmentation" / "camvid"
# ----------------------------------------------------------------------------------------------------------
# CamVid slot: the 2,000-iteration batch-16 recipe of ANCHORS.md, configs written by the segmentation work.
# If they are renamed, change these two names (or pass --camvid-configs DNC.yaml LINEAR.yaml).
CAMVID_CONFIGS = {"dnc": CAMVID_DIR / "fcn_r18-d8_1x16_176x176_2k_camvid_dnc.yaml",
                  "linear": CAMVID_DIR / "fcn_r18-d8_1x16_176x176_2k_camvid_linear.yaml"}
CAMVID_SMOKE = {"dnc": CAMVID_DIR / "fcn_r18-d8_cpu_camvid_dnc.yaml",
                "linear": CAMVID_DIR / "fcn_r18-d8_cpu_camvid_linear.yaml"}
# ----------------------------------------------------------------------------------------------------------
ARCHIVES = {"cifar": "cifar10-train-jpeg.tar.gz", "camvid_train": "camvid-train-240x180.tar.gz",
            "camvid_val": "camvid-val-240x180.tar.gz"}
CIFAR_TRAIN, BATCH = 45_000, 512
ITERS_PER_EPOCH = CIFAR_TRAIN // BATCH  # 87 (drop_last)
FINAL_RESERVE_S = 15  # summary, logs archive


class Suite:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.out = Path(args.out or os.environ.get("OUT") or Path(args.work) / "out")
        self.work = Path(args.work)
        self.logs = self.work / "logs"
        shutil.rmtree(self.logs, ignore_errors=True)  # logs of an earlier call on the same machine
        for p in (self.out, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
                        PYTHONDONTWRITEBYTECODE="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))
        self.summary = {"suite": "gpu_suite", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                        "args": vars(args), "steps": {}, "runs": []}

    # ------------------------------------------------------------------------------------------- utilities
    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        (self.out / "summary.txt").write_text(self.table() + "\n")
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")

    def run(self, name: str, argv: list, timeout: float) -> dict:
        """Run ``argv`` in its own process group, output to logs/<name>.log; on timeout SIGTERM (the
        engine then saves a checkpoint and stops), then SIGKILL."""
        log_path = self.logs / f"{name}.log"
        t = time.time()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(map(str, argv)) + "\n")
            log.flush()
            proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=REPO, start_new_session=True)
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
        res = {"status": status, "wall_s": round(time.time() - t, 1), "log": f"logs/{name}.log"}
        if status != "ok":
            tail = log_path.read_text(errors="replace").splitlines()[-8:]
            self.say(f"{name}: {status}; last lines:\n    " + "\n    ".join(tail))
        return res

    # ------------------------------------------------------------------------------------------- steps
    def check_env(self) -> None:
        probe = ("import json, os, shutil, torch, torchvision, timm, yaml, tqdm, safetensors, sklearn, PIL, numpy;"
                 "import dnc;"
                 "d = {m.__name__: getattr(m, '__version__', '?') for m in (torch, torchvision, timm, yaml, tqdm, "
                 "safetensors, sklearn, PIL, numpy)};"
                 "d['cuda'] = torch.cuda.is_available();"
                 "d['gpu'] = torch.cuda.get_device_name() if d['cuda'] else None;"
                 "d['cpu_count'] = os.cpu_count();"
                 "d['shm_free_gb'] = round(shutil.disk_usage('/dev/shm').free / 2**30, 1) if os.path.isdir('/dev/shm') else None;"
                 "d['timm_ok'] = tuple(int(x) for x in timm.__version__.split('.')[:2]) >= (1, 0);"
                 "print(json.dumps(d))")

        def probe_env():
            r = subprocess.run([sys.executable, "-c", probe], env=self.env, cwd=REPO, capture_output=True, text=True)
            if r.returncode == 0:
                info = json.loads(r.stdout.strip().splitlines()[-1])
                return info if info.get("timm_ok") else None, r.stderr
            return None, r.stderr

        info, err = probe_env()
        wheels = sorted((REPO / ".whl").glob("*.whl"))
        if info is None and wheels:
            self.say(f"packages missing or too old ({err.strip().splitlines()[-1] if err.strip() else 'timm < 1.0'}); "
                     f"installing {len(wheels)} carried wheels into /tmp/site")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *map(str, wheels)], check=False)
            self.env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), "/tmp/site"] + [
                p for p in self.env["PYTHONPATH"].split(os.pathsep) if p and p != str(REPO / "src")])
            info, err = probe_env()
        if info is None:
            raise SystemExit(f"environment check failed:\n{err}")
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
        self.summary["env"] = info
        self.say(f"environment: {json.dumps(info)}")
        if not self.args.smoke and not info["cuda"]:
            raise SystemExit("no CUDA device: run with --smoke for a CPU dry run")

    def find_archive(self, key: str) -> Path:
        data = Path(self.args.data)
        if not data.is_absolute() and not data.is_dir():
            data = REPO / data
        hits = sorted(data.rglob(ARCHIVES[key])) if data.is_dir() else []
        if not hits:
            raise SystemExit(f"{ARCHIVES[key]} not found under {data} (copy it from ../shared/data into .data/)")
        return hits[0]

    def extract(self, archive: Path, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dst, filter="data")
            else:
                tar.extractall(dst)

    def prepare_data(self, parts) -> None:
        t = time.time()
        data = self.work / "data"
        if "cifar" in parts:
            jpeg = data / "cifar10_jpeg"
            if not (jpeg / "train").is_dir():
                self.extract(self.find_archive("cifar"), jpeg)
            self.cifar_root, self.cifar_dataset = jpeg, "imagefolder"
            if self.args.cifar_format == "pickle":
                pkl = data / "cifar10_pickle"
                if not (pkl / "cifar-10-batches-py" / "batches.meta").is_file():
                    r = self.run("cifar_predecode", [sys.executable, REPO / "benchmarks" / "cifar_jpeg_to_batches.py",
                                                     jpeg, pkl, "--holdout", "5000", "--workers",
                                                     str(min(16, os.cpu_count() or 2))], timeout=180)
                    self.summary["steps"]["cifar_predecode"] = r
                    if r["status"] != "ok":
                        raise SystemExit("pre-decoding CIFAR failed: see logs/cifar_predecode.log")
                self.cifar_root, self.cifar_dataset = pkl, "cifar10"
        if "camvid" in parts:
            cam = data / "camvid"
            if not (cam / "val" / "labels").is_dir():
                self.extract(self.find_archive("camvid_train"), cam)
                self.extract(self.find_archive("camvid_val"), cam)
            self.camvid_root = cam
        self.summary["steps"]["data"] = {"wall_s": round(time.time() - t, 1)}
        self.say(f"data ready in {time.time() - t:.1f} s")

    def head(self) -> None:
        out_json = self.out / "head_overhead.json"
        argv = [sys.executable, REPO / "benchmarks" / "head_overhead.py", "--out", out_json]
        argv += ["--smoke", "--device", "cpu"] if self.args.smoke else ["--device", "cuda", "--full"]
        r = self.run("head_overhead", argv, timeout=min(240, self.left() - FINAL_RESERVE_S))
        if out_json.is_file():
            h = json.loads(out_json.read_text())
            keep = {k: h.get(k) for k in ("overhead_pct_of_resnet50_step", "overhead_pct_whole_step", "target_head",
                                           "target_pixel", "sync_check")}
            keep["errors"] = h.get("errors")
            keep["head_ms"] = {k: v["median_ms"] for k, v in h.get("head", {}).get("ms", {}).items()}
            keep["head_ratio_vs_linear"] = h.get("head", {}).get("ratio_vs_linear", {})
            keep["pixel_ms"] = {k: v["median_ms"] for k, v in h.get("pixel", {}).get("ms", {}).items()}
            keep["pixel_speedup_naive_over"] = h.get("pixel", {}).get("speedup_naive_over", {})
            if "resnet50" in h:
                keep["resnet50_ms"] = {k: v["median_ms"] for k, v in h["resnet50"]["ms"].items()}
            r["figures"] = keep
        self.summary["steps"]["head_overhead"] = r

    # ------------------------------------------------------------------------------------------- training runs
    def train(self, name: str, config: Path, overrides: list, timeout: float, meta: dict) -> dict:
        wd = self.work / "runs" / name
        shutil.rmtree(wd, ignore_errors=True)
        argv = [sys.executable, "-m", "dnc", "train", config, "--work-dir", wd, *overrides]
        self.say(f"{name}: start (limit {timeout:.0f} s)")
        res = {"name": name, **meta, "config": str(Path(config).relative_to(REPO)), "overrides": overrides}
        res.update(self.run(name, argv, timeout))
        res.update(parse_run(wd))
        keep = self.logs / name
        keep.mkdir(exist_ok=True)
        for f in ("log.jsonl", "metrics.json", "config.yaml"):
            if (wd / f).is_file():
                shutil.copy(wd / f, keep / f)
        shutil.rmtree(wd, ignore_errors=True)  # checkpoints: not needed, and the disk is small
        metric = res.get("top1", res.get("mIoU"))
        self.say(f"{name}: {res['status']}, {res['wall_s']} s, metric {metric}")
        self.summary["runs"].append(res)
        self.save()
        return res

    def cifar_overrides(self, head: str, seed: int, epochs: int = 0, iters: int = 0) -> list:
        total = iters or epochs * ITERS_PER_EPOCH
        ov = [f"data.dataset={self.cifar_dataset}", f"data.root={self.cifar_root}", f"train.seed={seed}",
              f"data.num_workers={self.args.workers}", "data.eval_batch_size=1000", "train.eval_interval=1000",
              "sched.warmup_ratio=0.01"]
        ov += [f"train.epochs={epochs}", "train.iters=0"] if epochs else ["train.epochs=0", f"train.iters={iters}",
                                                                          "train.eval_interval=1000000"]
        ov += [f"sched.warmup_iters={max(1, round(0.15 * total))}"]
        if self.args.smoke:  # CPU dry run: tiny batches and validation set, fp32
            ov += ["data.batch_size=16", "data.eval_batch_size=64", "data.holdout=64", "train.amp=none",
                   "train.device=cpu", "train.log_interval=2"]
        else:
            ov += ["train.device=cuda"]
        return ov + list(self.args.cifar_extra)

    def calibrate_cifar(self) -> dict:
        iters = 6 if self.args.smoke else 100
        ov = self.cifar_overrides("linear", 0, iters=iters) + ([] if self.args.smoke else ["train.log_interval=10"])
        r = self.train("cifar_calibration", CIFAR_CONFIGS["linear"], ov, timeout=min(150, self.left()), meta={
            "task": "cifar10", "head": "linear", "seed": 0, "iters": iters, "calibration": True})
        self.summary["runs"].pop()  # not a result: kept under steps
        self.summary["steps"]["cifar_calibration"] = r
        if r["status"] != "ok" or not r.get("s_per_iter"):
            raise SystemExit("CIFAR calibration failed: see logs/cifar_calibration.log")
        fixed = max(5.0, r["wall_s"] - r["s_per_iter"] * iters)
        return {"s_per_iter": r["s_per_iter"], "fixed_s": round(fixed, 1)}

    def plan_epochs(self, cal: dict, n_cifar: int, camvid_reserve: float) -> int:
        if self.args.cifar_epochs:
            return self.args.cifar_epochs
        if self.args.smoke:
            return 1
        avail = self.left() - camvid_reserve - FINAL_RESERVE_S
        per_run = avail / max(n_cifar, 1) - cal["fixed_s"]
        epochs = math.floor(per_run / (ITERS_PER_EPOCH * cal["s_per_iter"] * 1.05))
        self.say(f"CIFAR plan: {avail:.0f} s for {n_cifar} runs, {cal['s_per_iter'] * 1e3:.1f} ms/iter, "
                 f"{cal['fixed_s']} s fixed per run -> {epochs} epochs (max {self.args.cifar_max_epochs})")
        return max(1, min(self.args.cifar_max_epochs, epochs))

    def main(self) -> None:
        a = self.args
        parts = a.parts.split(",")
        self.say(f"gpu_suite: parts={parts} budget={a.budget} s out={self.out} smoke={a.smoke}")
        self.check_env()
        self.prepare_data(parts)
        self.save()
        if "head" in parts:
            self.head()
            self.save()
        seeds = [int(s) for s in a.seeds.split(",")]
        cam_seeds = [int(s) for s in a.camvid_seeds.split(",")] if "camvid" in parts else []
        cam_cfg = dict(zip(("dnc", "linear"), map(Path, a.camvid_configs))) if a.camvid_configs else \
            (CAMVID_SMOKE if a.smoke else CAMVID_CONFIGS)
        if cam_seeds and not all(p.is_file() for p in cam_cfg.values()):
            self.say(f"CamVid configs not found ({', '.join(map(str, cam_cfg.values()))}): CamVid skipped")
            self.summary["steps"]["camvid"] = "skipped: configs not found"
            cam_seeds = []
        camvid_est = [a.camvid_estimate]  # updated by the first CamVid run
        cifar_est = [0.0]

        jobs = []  # (kind, head, seed): CIFAR seed 0 pair, CamVid, then the other CIFAR seeds
        if "cifar" in parts:
            jobs += [("cifar", h, seeds[0]) for h in ("dnc", "linear")]
        jobs += [("camvid", h, s) for s in cam_seeds for h in ("dnc", "linear")]
        if "cifar" in parts:
            jobs += [("cifar", h, s) for s in seeds[1:] for h in ("dnc", "linear")]

        epochs = 0
        if "cifar" in parts:
            cal = self.calibrate_cifar()
            n_cifar = sum(j[0] == "cifar" for j in jobs)
            epochs = self.plan_epochs(cal, n_cifar, len(cam_seeds) * 2 * camvid_est[0])
            iters = 4 if a.smoke else epochs * ITERS_PER_EPOCH
            cifar_est[0] = cal["fixed_s"] + iters * cal["s_per_iter"] * 1.05
            self.summary["cifar_plan"] = {**cal, "epochs": epochs, "iters_per_epoch": ITERS_PER_EPOCH,
                                          "estimated_s_per_run": round(cifar_est[0], 1)}
            self.save()

        for kind, head, seed in jobs:
            est = cifar_est[0] if kind == "cifar" else camvid_est[0]
            name = f"{kind}_{head}_s{seed}"
            room = self.left() - FINAL_RESERVE_S
            if room < 0.9 * est:
                self.say(f"{name}: skipped, {room:.0f} s left for an estimated {est:.0f} s")
                self.summary["runs"].append({"name": name, "task": kind, "head": head, "seed": seed,
                                             "status": f"skipped: budget ({room:.0f} s left, needs ~{est:.0f} s)"})
                self.save()
                continue
            timeout = min(room, 1.6 * est + 30)
            if kind == "cifar":
                ov = self.cifar_overrides(head, seed, iters=4) if a.smoke else self.cifar_overrides(head, seed, epochs=epochs)
                self.train(name, CIFAR_CONFIGS[head], ov, timeout,
                           {"task": "cifar10", "head": head, "seed": seed, "epochs": 0 if a.smoke else epochs})
            else:
                ov = [f"data.root={self.camvid_root}", f"train.seed={seed}"]
                ov += ["train.iters=2", "train.eval_interval=2", "train.log_interval=1", "data.batch_size=2",
                       "data.num_workers=0", "model.dnc.init_samples=500"] if a.smoke else \
                    [f"data.num_workers={a.workers}", "train.device=cuda"]
                r = self.train(name, cam_cfg[head], ov + list(a.camvid_extra), timeout,
                               {"task": "camvid", "head": head, "seed": seed})
                if r["status"] == "ok":
                    camvid_est[0] = r["wall_s"]
        self.summary["finished"] = True
        self.save()
        print("\n" + self.table(), flush=True)

    # ------------------------------------------------------------------------------------------- report
    def table(self) -> str:
        s = self.summary
        lines = [f"# gpu_suite summary ({s.get('env', {}).get('gpu') or 'CPU'}; {s['started']}; "
                 f"{round(self.elapsed())} s)"]
        h = s["steps"].get("head_overhead", {}).get("figures")
        if h:
            lines.append("## head_overhead (ms, medians; full figures in head_overhead.json and logs/head_overhead.log)")
            for k, v in h["head_ms"].items():
                r = h["head_ratio_vs_linear"].get(k)
                lines.append(f"  {k:<28}{v:10.3f}" + (f"   x{r:.2f} linear" if r else ""))
            for k, v in (h.get("resnet50_ms") or {}).items():
                lines.append(f"  {k:<28}{v:10.3f}")
            if h.get("errors"):
                lines.append(f"  FAILED parts: {h['errors']}")
            if h.get("overhead_pct_of_resnet50_step"):
                lines.append("  head overhead, % of a ResNet-50 step: " + ", ".join(
                    f"{k} {v:.2f}%" for k, v in h["overhead_pct_of_resnet50_step"].items()))
            if h.get("overhead_pct_whole_step") is not None:
                lines.append(f"  whole ResNet-50 step, DNC(memory) vs linear: {h['overhead_pct_whole_step']:+.2f}%")
            if h.get("target_head"):
                lines.append(f"  target (head): {h['target_head']}")
            for k, v in h["pixel_ms"].items():
                sp = h["pixel_speedup_naive_over"].get(k)
                lines.append(f"  {k:<28}{v:10.3f}" + (f"   naive loop / this x{sp:.1f}" if sp else ""))
            if h.get("target_pixel"):
                lines.append(f"  target (pixel): {h['target_pixel']}")
            if isinstance(h.get("sync_check"), dict):
                lines.append("  host-device syncs per step: " + ", ".join(
                    f"{k} {v['syncs']}" + (f" ({'; '.join(v['where'])})" if v["where"] else "")
                    for k, v in h["sync_check"].items()))
        if s.get("cifar_plan"):
            lines.append(f"## CIFAR plan: {s['cifar_plan']}")
        if s["runs"]:
            lines.append("## runs")
            lines.append(f"  {'name':<22}{'status':<20}{'metric':>9}{'wall s':>9}{'ms/iter':>9}  schedule")
            for r in s["runs"]:
                metric = r.get("top1", r.get("mIoU"))
                metric = f"{metric:.2f}" if isinstance(metric, float) else "-"
                speed = f"{1e3 * r['s_per_iter']:.1f}" if r.get("s_per_iter") else "-"
                sched = f"{r['epochs']} ep" if r.get("epochs") else f"{r['iters_done']} it" if r.get("iters_done") else ""
                lines.append(f"  {r['name']:<22}{r['status'][:19]:<20}{metric:>9}{r.get('wall_s', '-'):>9}{speed:>9}  {sched}")
            for task, key in (("cifar10", "top1"), ("camvid", "mIoU")):
                for head in ("dnc", "linear"):
                    vals = [r[key] for r in s["runs"] if r.get("task") == task and r.get("head") == head
                            and isinstance(r.get(key), float)]
                    if vals:
                        lines.append(f"  {task} {head}: {key} mean {sum(vals) / len(vals):.2f} over {len(vals)} "
                                     f"seed(s): {', '.join(f'{v:.2f}' for v in vals)}")
        return "\n".join(lines)


def parse_run(wd: Path) -> dict:
    """Metrics and speed of a finished (or stopped) ``dnc train`` work dir."""
    out = {}
    m = wd / "metrics.json"
    if m.is_file():
        metrics = json.loads(m.read_text())
        out.update({k: v for k, v in metrics.items() if k in ("top1", "top5", "mIoU", "mAcc", "aAcc")})
    log = wd / "log.jsonl"
    if log.is_file():
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        train = [r for r in recs if r.get("mode") == "train"]
        if train:
            out["iters_done"] = train[-1]["iter"]
        # Steady speed: skip the first record (workers starting, prefetch queue filling) and, with enough
        # records, the first third (the prefetch queue draining).
        steady = train[max(1, len(train) // 3):] if len(train) >= 3 else train[1:]
        if len(steady) >= 2 and steady[-1]["iter"] > steady[0]["iter"]:
            out["s_per_iter"] = round((steady[-1]["time"] - steady[0]["time"]) / (steady[-1]["iter"] - steady[0]["iter"]), 5)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data", help="folder holding the archives (searched recursively)")
    ap.add_argument("--out", help="results folder (default: $OUT, else WORK/out)")
    ap.add_argument("--work", default="/tmp/dnc_suite", help="scratch folder (data, runs)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole suite")
    ap.add_argument("--parts", default="head,cifar,camvid")
    ap.add_argument("--seeds", default="0,1", help="CIFAR seeds")
    ap.add_argument("--camvid-seeds", default="0")
    ap.add_argument("--cifar-epochs", type=int, default=0, help="fixed epochs (default: fit the budget)")
    ap.add_argument("--cifar-max-epochs", type=int, default=25)
    ap.add_argument("--cifar-format", choices=("pickle", "jpeg"), default="pickle",
                    help="pickle: pre-decode the JPEGs once (same images and split); jpeg: the image folder")
    ap.add_argument("--cifar-extra", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both CIFAR heads")
    ap.add_argument("--camvid-configs", nargs=2, metavar=("DNC", "LINEAR"))
    ap.add_argument("--camvid-extra", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--camvid-estimate", type=float, default=70, help="seconds reserved per CamVid run")
    ap.add_argument("--workers", type=int, default=14, help="data-loading processes")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with tiny sizes")
    args = ap.parse_args(argv)
    if args.smoke:  # a CPU evaluation of the 101 CamVid images alone takes 10 s to minutes on a shared machine
        args.workers, args.camvid_estimate = min(args.workers, 2), max(args.camvid_estimate, 200)
    suite = Suite(args)
    try:
        suite.main()
    except SystemExit as e:
        suite.summary["error"] = str(e)
        suite.save()
        print(f"gpu_suite: {e}", file=sys.stderr, flush=True)
        print("\n" + suite.table(), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
