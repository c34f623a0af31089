"""``dnc predict``: classify or segment image files, folders and glob patterns with a checkpoint.

Inputs are expanded into one sorted list of image paths (folders recursively, hidden names skipped;
patterns with :func:`glob.glob`, ``**`` included) and decoded batch by batch, so that memory does not
grow with the number of images. Each image gets one record: its path, the top classes and their
scores (classification: softmax probabilities; segmentation: the share of pixels), and optionally the
pictures written for it. Records are printed, and written with ``--out`` as a JSON list or a CSV table.

Pictures go into ``--pictures DIR`` and are named after the image and its prediction:
``<stem>_<class>.png`` (``--explain``, classification: the test image beside the training images that
decided it; needs the anchored checkpoint of ``dnc explain``), ``<stem>_mask.png`` (segmentation: a
palette PNG whose pixel values are the class indices, in the dataset's usual colours) and
``<stem>_segments.png`` (``--explain``, segmentation: class map and map of the winning sub-centroids).
"""
from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .data.images import ImageList, find_images, read_rgb
from .engine import load_checkpoint, setup_distributed
from .explain import _sample_name, explain_decisions, pixel_decisions
from .files import write_atomic, write_json
from .ood import apply_threshold, image_scores, pixel_scores, save_score_map, verdict_text
from .report import palette, render_decision, render_segmentation
from .runconfig import checkpoint_classes, checkpoint_config
from .tasks import build_cls_split, eval_transform, load_trained_model, training_subset

log = logging.getLogger("dnc")

__all__ = ["run_predict", "write_records"]

def _safe(name: str) -> str:
    """A class name usable in a file name."""
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "class"


class _Namer:
    """``DIR/<stem>_<suffix>.png``, never twice the same in one run."""

    def __init__(self, folder: Path):
        self.folder, self.taken = folder, set()

    def __call__(self, image: str, suffix: str) -> Path:
        stem = Path(image).stem
        name, n = f"{stem}_{suffix}.png", 1
        while name in self.taken:
            n += 1
            name = f"{stem}_{n}_{suffix}.png"
        self.taken.add(name)
        return self.folder / name


def write_records(path, records: Sequence[dict]) -> None:
    """``.json``: the list of records; ``.csv``: one row per image (path, class_i and score_i for each
    of the top classes, ``unknown`` for a calibrated model, the pictures written). Written atomically."""
    path = Path(path)
    if path.suffix == ".json":
        write_json(path, list(records))
        return
    k = max((len(r["top"]) for r in records), default=0)
    ood = ["unknown"] if any("ood" in r for r in records) else []
    extra = [c for c in ("mask", "picture") if any(c in r for r in records)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path"] + [f"{x}_{i}" for i in range(1, k + 1) for x in ("class", "score")] + ood + extra)
    for r in records:
        top = [v for t in r["top"] for v in (t["class"], t["score"])]
        row = [r["path"]] + top + [""] * (2 * k - len(top)) + [r["ood"]["unknown"] for _ in ood] \
            + [r.get(c, "") for c in extra]
        w.writerow([_cell(v) for v in row])
    write_atomic(path, buf.getvalue().encode())


def _cell(value):
    """A CSV cell that a spreadsheet shows as text: one starting as a formula (``=``, ``+``, ``-``, ``@``,
    tab, carriage return) gets a leading ``'``, as OWASP recommends against CSV injection."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _anchors(cfg, ckpt: dict, checkpoint):
    """``(anchor_index (C, K), raw training set)`` of an anchored checkpoint, checked."""
    if cfg.model.head != "dnc":
        raise ValueError(f"{checkpoint}: --explain needs a DNC model; this checkpoint has a {cfg.model.head} head")
    if not ckpt.get("anchored"):
        raise ValueError(f"{checkpoint}: --explain needs an anchored checkpoint: run dnc explain CONFIG "
                         f"{checkpoint} --out DIR and pass DIR/anchored.pt")
    anchor_index = ckpt["anchor_index"]
    raw_train = training_subset(cfg, build_cls_split(cfg, "train", None))
    used = anchor_index[anchor_index >= 0]
    if len(used) and int(used.max()) >= len(raw_train):
        raise ValueError(f"{checkpoint}: anchors index {int(used.max())} but the training set has "
                         f"{len(raw_train)} images: it changed since dnc explain")
    return anchor_index, raw_train


def run_predict(checkpoint, inputs: Sequence[str], explain: bool = False, pictures=None, topk: int = 5,
                device: str = "auto", batch_size: int = 0, out=None, tile: int = 96,
                report: Optional[Callable[[str], None]] = None, skip_bad: bool = False) -> list:
    """``dnc predict``: one record per image of ``inputs`` (see :func:`find_images`), its line of text
    passed to ``report`` (e.g. ``print``) as soon as it is made, and written to ``out`` (``.json`` or ``.csv``) when given; returns the records.

    ``pictures`` is the folder of the pictures (default ``predictions``); ``batch_size`` 0 takes the
    config's evaluation batch size (segmentation: one image at a time, each at its own size).
    ``skip_bad``: an unreadable image is skipped with a warning naming it (else it stops everything).
    """
    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    if out is not None and Path(out).suffix not in (".json", ".csv"):
        raise ValueError(f"--out {out}: use a .json or .csv file")
    paths = find_images(inputs)
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, checkpoint)
    classes = checkpoint_classes(ckpt, cfg, checkpoint)
    dev = setup_distributed(device).device
    model = load_trained_model(cfg, ckpt, checkpoint).to(dev).eval()
    anchors = _anchors(cfg, ckpt, checkpoint) if explain and cfg.task == "classification" else None
    if explain and cfg.task == "segmentation" and cfg.model.head != "dnc":
        raise ValueError(f"{checkpoint}: --explain needs a DNC segmenter; this checkpoint has a {cfg.model.head} head")
    folder = Path(pictures or "predictions")
    if explain or cfg.task == "segmentation":
        folder.mkdir(parents=True, exist_ok=True)
    name = _Namer(folder)
    segment = cfg.task == "segmentation"
    bs = 1 if segment else (batch_size or cfg.data.eval_batch_size or cfg.data.batch_size)
    loader = DataLoader(_Readable(paths, eval_transform(cfg), skip_bad), batch_size=bs,
                        num_workers=cfg.data.num_workers, collate_fn=list)
    records, skipped = [], 0
    for batch in loader:
        # Images of one batch may differ in size (preset "none"): one forward per size.
        shapes = {}
        for x, i in batch:
            if isinstance(x, str):  # unreadable, skipped: x is why
                log.warning(f"skipped {x}")
                skipped += 1
                continue
            shapes.setdefault(tuple(x.shape), []).append((x, i))
        for group in shapes.values():
            x = torch.stack([g[0] for g in group]).to(dev)
            index = [g[1] for g in group]
            if segment:
                recs = [_segment(cfg, model, x, paths[index[0]], classes, topk, explain, name)]
            else:
                recs = _classify(cfg, model, x, [paths[i] for i in index], classes, topk, anchors, name, tile,
                                 ckpt if ckpt.get("ood") else None)
            for r in recs:
                line = r.pop("_line")
                if report is not None:
                    report(line)
            records += recs
    if skipped:
        log.warning(f"skipped {skipped} unreadable image{'s' * (skipped > 1)} of {len(paths)} (--skip-bad)")
    order = {p: i for i, p in enumerate(paths)}
    records.sort(key=lambda r: order[r["path"]])  # back to input order (batches are grouped by image size)
    if out is not None:
        write_records(out, records)
    return records


class _Readable(ImageList):
    """``(image, index)`` of each file; with ``skip_bad``, ``(why, index)`` for an unreadable one."""

    def __init__(self, files: Sequence[str], transform, skip_bad: bool):
        super().__init__(files, transform)
        self.skip_bad = skip_bad

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)[0], index
        except ValueError as e:
            if not self.skip_bad:
                raise
            return str(e), index


@torch.no_grad()
def _classify(cfg, model: nn.Module, x: torch.Tensor, paths: Sequence[str], classes, topk: int, anchors, name,
              tile: int, calibrated: Optional[dict] = None) -> list:
    """Records of a batch of images; with a ``calibrated`` checkpoint (``dnc calibrate``) each says
    whether the image is of a known class (``ood``)."""
    if cfg.model.head == "dnc":
        dec = explain_decisions(model, x, topk=max(topk, 2))
        top_c, top_p = dec.classes[:, :topk], dec.probs[:, :topk]
    else:
        top_p, top_c = model(x).float().softmax(1).topk(min(topk, len(classes)), dim=1)
    top_c, top_p = top_c.cpu().tolist(), top_p.cpu().tolist()
    verdicts = apply_threshold(image_scores(model, x)[1], calibrated) if calibrated else None
    records = []
    for n, path in enumerate(paths):
        rec = {"path": str(path), "pred": classes[top_c[n][0]],
               "top": [{"class": classes[c], "index": c, "score": round(p, 6)} for c, p in zip(top_c[n], top_p[n])]}
        rec["_line"] = f"{path}: " + "  ".join(f"{t['class']} {100 * t['score']:.1f}%" for t in rec["top"])
        if verdicts is not None:  # below the calibrated threshold: no known class
            rec["ood"] = verdicts[n]
            rec["_line"] = f"{path}: {verdict_text(rec['ood'])}; " + rec["_line"][len(f"{path}: "):]
        if anchors is not None:
            _explain_one(rec, dec, n, path, classes, anchors, name, tile)
        records.append(rec)
    return records


def _explain_one(rec: dict, dec, n: int, path: str, classes, anchors, name, tile: int) -> None:
    """Add the deciding exemplars of image ``n`` to its record and write its picture."""
    anchor_index, raw_train = anchors
    panel = []
    for t in range(min(2, dec.classes.shape[1])):
        ci, kk = int(dec.classes[n, t]), int(dec.subcentroid[n, t])
        i = int(anchor_index[ci, kk])
        if i >= 0 and int(raw_train.targets[i]) != ci:
            raise ValueError(f"training image {i} is not of class {classes[ci]}: the training set changed since "
                             "dnc explain")
        panel.append({"class": classes[ci], "subcentroid": kk, "similarity": round(float(dec.similarity[n, t]), 6),
                      "anchor_index": i, "anchor_name": _sample_name(raw_train, i) if i >= 0 else None,
                      "image": raw_train[i][0] if i >= 0 else None})
    cells = [(f"{p['class']} (k={p['subcentroid']})", p["image"], p["similarity"]) for p in panel]
    file = name(path, _safe(rec["pred"]))
    render_decision(read_rgb(path), Path(path).name, cells[0], cells[1] if len(cells) > 1 else None, None,
                    tile).save(file)
    rec["decided_by"] = [{k: v for k, v in p.items() if k != "image"} for p in panel]
    rec["picture"] = str(file)
    p0 = panel[0]
    rec["_line"] += (f"\n  decided by sub-centroid {p0['subcentroid']} of {p0['class']} (training image "
                     f"{p0['anchor_name']}, cos {p0['similarity']:.3f})")
    if len(panel) > 1:
        p1 = panel[1]
        rec["_line"] += (f" over sub-centroid {p1['subcentroid']} of {p1['class']} (training image "
                         f"{p1['anchor_name']}, cos {p1['similarity']:.3f})")
    rec["_line"] += f" -> {file}"


@torch.no_grad()
def _segment(cfg, model: nn.Module, x: torch.Tensor, path: str, classes, topk: int, explain: bool, name) -> dict:
    pic = read_rgb(path)
    size = (pic.height, pic.width)
    if cfg.model.head == "dnc":
        dec = pixel_decisions(model, x, size)
        pred = dec["classes"][0]
    else:
        pred = F.interpolate(model(x).float(), size=size, mode="bilinear", align_corners=False).argmax(1)[0]
    pred = pred.cpu()
    share = torch.bincount(pred.flatten(), minlength=len(classes)).float() / pred.numel()
    top = [int(c) for c in share.argsort(descending=True)[:topk] if share[c] > 0]
    rec = {"path": str(path), "pred": classes[top[0]],
           "top": [{"class": classes[c], "index": c, "score": round(float(share[c]), 6)} for c in top]}
    rec["_line"] = f"{path}: " + "  ".join(f"{t['class']} {100 * t['score']:.1f}% of pixels" for t in rec["top"])
    mask = Image.fromarray(pred.to(torch.uint8).numpy())  # "L"; the palette makes it "P"
    mask.putpalette(palette(len(classes), cfg.data.dataset).flatten().tolist())
    rec["mask"] = str(name(path, "mask"))
    mask.save(rec["mask"])
    rec["_line"] += f"\n  colour mask -> {rec['mask']}"
    rec["score_map"] = str(name(path, "score"))
    save_score_map(pixel_scores(model, x, size)[0], rec["score_map"])
    rec["_line"] += f"\n  per-pixel score map (known-class evidence, white = high) -> {rec['score_map']}"
    if explain:
        file = name(path, "segments")
        render_segmentation(pic, pred, dec["subcentroid"][0], classes, cfg.model.dnc.num_subcentroids,
                            dataset=cfg.data.dataset).save(file)
        rec["picture"] = str(file)
        rec["_line"] += f"\n  class and sub-centroid maps -> {file}"
    return rec
