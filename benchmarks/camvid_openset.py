#!/usr/bin/env python
"""Issue 20, open set in segmentation: CamVid with car, pedestrian and bicyclist left out of training,
every per-pixel score of both heads, settings chosen on validation.

    python benchmarks/camvid_openset.py TRAIN_ARCHIVE VAL_ARCHIVE --work-dir W [--seeds 0 1 2] [--jobs 2]
        [--out JSON] [key=value ...]

The shipped CPU recipes as shipped (``configs/segmentation/camvid/fcn_effnet-lite0_cpu_camvid_{dnc,linear}.yaml``)
train through ``dnc train`` on the 8 other classes (``data.dataset_kwargs.classes``): the pixels of the 3
left-out classes are unlabelled, as void is. CamVid's official train split (367 images) trains; its val
split (101 frames of sequence 0016E5) is cut in two: ``val`` (the first 50 frames, which choose every
setting) and ``test`` (the last 51, scored once with the chosen settings). Both halves are frames of a
sequence that also trains (the test split of other sequences is not shipped to us).

Per run and half, ``dnc test --split S --ood-pixels`` gives AUROC and FPR at 95% TPR of the known pixels
(the 8 classes) against the left-out classes' pixels for the scores without a setting (``msp``,
``maxlogit``, ``energy``; DNC: ``cosine``, ``subenergy`` at the head's temperature) and the closed-set
mIoU. This script adds the scores with settings, from the decoder's pixel features: ``knn`` (Sun et al.
2022: the cosine to the k-th nearest of 20,000 known training pixels, L2-normalised decoder features),
``knn_enc`` (the same on the encoder's last level, the decoder's input, at the same pixels),
and for DNC heads ``subenergy`` at other temperatures, ``knn_z`` (the same in the head's unit embedding),
``cos_knn`` (cosine + knn_z) and ``cos_knnf`` (cosine + knn). Scores are computed at the decoder's resolution and upsampled
bilinearly to the mask, as the library's are. The best setting of each family and the best family of
each head are chosen on the validation mean over seeds; their test figures are reported.

Runs go to ``W/<head>_seed<S>``; twins train side by side (``--jobs 2``, ``train.threads=1`` each);
finished runs and evaluations are reused (the protocol resumes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extract_once, write_json  # noqa: E402  (also puts this checkout's dnc first on the path)
from openset import load_run, run_dnc  # noqa: E402
from openset_posthoc import summarise  # noqa: E402

from dnc.data.segmentation import CAMVID_CLASSES, LEFT_OUT_INDEX  # noqa: E402
from dnc.ood import knn_topk, separation, subcentroid_energy  # noqa: E402

CONFIG = "configs/segmentation/camvid/fcn_effnet-lite0_cpu_camvid_{head}.yaml"
LEFT_OUT = ("car", "pedestrian", "bicyclist")
KNOWN = [c for c in CAMVID_CLASSES if c not in LEFT_OUT]
ITERS, VAL_FRAMES, BANK = 300, 50, 20000
K_SWEEP = (1, 5, 10, 20, 50, 100, 200)
T_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2)


def lay_out(archives: list, work: Path) -> Path:
    """``W/data/camvid/{train,val,test}``: links to the train split, and to the two halves of the val split."""
    raw, root = extract_once(archives, work / "data" / "raw"), (work / "data" / "camvid").resolve()
    if (root / "test").is_dir():
        return root
    frames = sorted((raw / "val" / "images").glob("*.jpg"))
    splits = {"train": sorted((raw / "train" / "images").glob("*.jpg")), "val": frames[:VAL_FRAMES],
              "test": frames[VAL_FRAMES:]}
    tmp = root.with_name("camvid.partial")
    for split, files in splits.items():
        for f in files:
            for sub, src in (("images", f), ("labels", f.parent.parent / "labels" / (f.stem + ".png"))):
                (tmp / split / sub).mkdir(parents=True, exist_ok=True)
                (tmp / split / sub / src.name).symlink_to(src)
    tmp.rename(root)
    return root


def overrides(root: Path, seed: int, extra: list) -> list:
    return [f"data.root={root}", f"data.dataset_kwargs.classes=[{','.join(KNOWN)}]", f"data.num_classes={len(KNOWN)}",
            f"train.seed={seed}", "train.threads=1", "data.num_workers=1", *extra]


def train(root: Path, run_dir: Path, head: str, seed: int, extra: list, log: Path) -> dict:
    """Train one run unless it has finished (``metrics.json``); its command and training time."""
    command = ["train", CONFIG.format(head=head), "--work-dir", run_dir, f"train.eval_interval={ITERS}",
               *overrides(root, seed, extra)]
    seconds = None
    if not (run_dir / "metrics.json").is_file():
        start = time.time()
        run_dnc(*command, log=log)
        seconds = round(time.time() - start)
    return {"train_seconds": seconds, "command": "dnc " + " ".join(map(str, command))}


def ood_test(root: Path, run_dir: Path, seed: int, split: str, extra: list, log: Path) -> dict:
    """``dnc test --split SPLIT --ood-pixels`` of a run (reused when its result file exists)."""
    out = run_dir / f"ood_pixels_{split}.json"
    if not out.is_file():
        run_dnc("test", run_dir / "last.pt", "--split", split, "--ood-pixels", "--out", out,
                *overrides(root, seed, extra), log=log)
    return json.loads(out.read_text())


@torch.no_grad()
def pixel_features(model, loader, bank: int = 0) -> tuple:
    """Unit decoder features ``(P, D)``, unit encoder features (its last level, at the decoder's resolution)
    and, for a DNC head, head embeddings, of every decoder pixel of the loader, with the masks at full size;
    with ``bank`` instead a random sample of that many known pixels (labels at the decoder's resolution,
    nearest)."""
    feats, encoded, embeds, masks, shapes = [], [], [], [], []
    head = model.head.head
    for images, target, *_ in loader:
        levels = model.encoder(images)
        x = model.decoder(levels)
        b, d, h, w = x.shape
        f, e = x.permute(0, 2, 3, 1).reshape(-1, d), levels[-1].permute(0, 2, 3, 1).flatten(0, 2)
        if bank:
            small = model.resize_labels(target, (h, w)).flatten()
            f, e = f[small < len(KNOWN)], e[small < len(KNOWN)]
        feats.append(f)
        encoded.append(e)
        embeds.append(head.embed(f) if hasattr(head, "centroids") else f[:, :0])
        masks.append(target)
        shapes.append((b, h, w))
    feats, encoded, embeds = torch.cat(feats), torch.cat(encoded), torch.cat(embeds)
    if bank:
        pick = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:bank]
        return F.normalize(feats[pick], dim=1), F.normalize(encoded[pick], dim=1), embeds[pick]
    return F.normalize(feats, dim=1), F.normalize(encoded, dim=1), embeds, masks, shapes


def to_pixels(score: torch.Tensor, masks: list, shapes: list) -> tuple:
    """Per-decoder-pixel ``score`` upsampled to each mask: (scores of known pixels, of left-out pixels)."""
    known, unknown, start = [], [], 0
    for mask, (b, h, w) in zip(masks, shapes):
        part = score[start: start + b * h * w].view(b, 1, h, w)
        start += b * h * w
        up = F.interpolate(part, size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        known.append(up[mask < len(KNOWN)])
        unknown.append(up[mask == LEFT_OUT_INDEX])
    return torch.cat(known), torch.cat(unknown)


def knn_family(run_dir: Path) -> dict:
    """``{split: {score: {"auroc", "fpr95"}}}`` of the scores with settings (see the module text) of one run."""
    from dnc.engine import DistInfo
    from dnc.tasks import build_eval_loader, build_eval_split
    cfg, model, _ = load_run(run_dir)
    head = model.head.head

    def loader(split: str):
        return build_eval_loader(cfg, build_eval_split(cfg, split, mark_left_out=True)[0], DistInfo(0, 1, torch.device("cpu")))

    bank_f, bank_e, bank_z = pixel_features(model, loader("train"), BANK)
    out = {}
    for split in ("val", "test"):
        feats, encoded, embeds, masks, shapes = pixel_features(model, loader(split))
        near, near_e = knn_topk(feats, bank_f, max(K_SWEEP)), knn_topk(encoded, bank_e, max(K_SWEEP))
        scores = {f"knn k={k}": near[:, k - 1] for k in K_SWEEP}
        scores.update({f"knn_enc k={k}": near_e[:, k - 1] for k in K_SWEEP})
        if hasattr(head, "centroids"):
            sims = head.centroids.similarities(embeds).float()
            cos = sims.flatten(1).amax(1)
            scores.update({f"subenergy T={t}": subcentroid_energy(sims, t) for t in T_SWEEP})
            near_z = knn_topk(embeds, bank_z, max(K_SWEEP))
            for k in K_SWEEP:
                scores[f"knn_z k={k}"] = near_z[:, k - 1]
                scores[f"cos_knn k={k}"] = cos + near_z[:, k - 1]
                scores[f"cos_knnf k={k}"] = cos + near[:, k - 1]
        out[split] = {}
        for name, score in scores.items():
            out[split][name] = separation(*to_pixels(score, masks, shapes))
    return out


def evaluate(root: Path, run_dir: Path, seed: int, extra: list, log: Path) -> dict:
    """Every score of one run on both halves, in the layout of ``openset_posthoc.summarise``."""
    cached = run_dir / "knn.json"
    if not cached.is_file():
        write_json(cached, knn_family(run_dir))
    with_settings = json.loads(cached.read_text())
    res = {"scores": {}}
    for split in ("val", "test"):
        tested = ood_test(root, run_dir, seed, split, extra, log)
        res[f"{split}_mIoU"] = tested["mIoU"]
        for name, v in {**tested["ood_pixels"]["scores"], **with_settings[split]}.items():
            res["scores"].setdefault(name, {})[split] = {"auroc": v["auroc"], "fpr95": v["fpr95"]}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archives", type=Path, nargs=2, metavar="ARCHIVE", help="camvid-train and camvid-val archives")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="trainings at the same time (each with train.threads=1)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log = args.work_dir / "commands.log"
    root = lay_out(args.archives, args.work_dir)
    runs = {f"{h}_seed{s}": args.work_dir / f"{h}_seed{s}" for s in args.seeds for h in ("dnc", "linear")}
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = {name: pool.submit(train, root, d, name.split("_")[0], int(name.split("seed")[1]), args.overrides, log)
                for name, d in runs.items()}
        trained = {name: job.result() for name, job in jobs.items()}
    torch.set_num_threads(2)
    results = {name: {**evaluate(root, d, int(name.split("seed")[1]), args.overrides, log), **trained[name]}
               for name, d in runs.items()}
    summary = summarise(results, ["dnc", "linear"], args.seeds, closed="mIoU")
    print("| head | score (setting chosen on validation) | val AUROC | test AUROC | test FPR95 |")
    print("| --- | --- | --- | --- | --- |")
    for m, s in summary.items():
        for name in s["best_of_family"].values():
            r = s["scores"][name]
            mark = "**" if name == s["best_on_val"] else ""
            print(f"| {m} (test mIoU {s['test_mIoU']:.2f}) | {mark}{name}{mark} | {r['val_auroc'][0]:.2f} | "
                  f"{r['test_auroc'][0]:.2f} ± {r['test_auroc'][1]:.2f} | {r['test_fpr95'][0]:.2f} ± {r['test_fpr95'][1]:.2f} |")
    full = {"seeds": args.seeds, "left_out": LEFT_OUT, "overrides": args.overrides, "summary": summary,
            "per_run": results}
    if args.out:
        write_json(args.out, full)
    return full


if __name__ == "__main__":
    main()
