"""Explanations: sub-centroids as real training images (``dnc explain``).

A DNC classifier scores a class by the cosine of the nearest of its K sub-centroids. After training,
:func:`anchor_model` replaces every sub-centroid p(c, k) by the embedding of the training sample of
class c nearest to it. The anchored classifier compares a test image with C*K real training images,
so each decision reads "it looks more like *this* training image (predicted class) than like *that*
one (runner-up class)"; its accuracy, next to the original's, says how much that costs.

Pieces, usable on their own:

* :class:`TopMSearch` streams over the training set and keeps, for every sub-centroid, its ``m``
  nearest training samples *of its own class* (a running top-m merged batch by batch, vectorised
  over all sub-centroids: memory ``O(C*K*(m + B + D))``, whatever the size of the training set),
  the embedding of its nearest one (the anchor), and how many samples it wins;
* :func:`anchor_model`, :func:`subcentroid_statistics`, :func:`explain_decisions`,
  :func:`pixel_decisions` (segmentation);
* :func:`run_explain`, what ``dnc explain`` (:mod:`dnc.cli.explain`) runs. The pictures and the HTML page are
  drawn by :mod:`dnc.report`; ``dnc predict --explain`` (:mod:`dnc.predict`) reuses the anchors.

The training images searched are those the model was trained on: the data selection (dataset,
``holdout``, dataset options) saved in the checkpoint, whatever data overrides choose the evaluation
set. ``DIR/anchored.pt`` stores the training-set index of every anchor and that selection.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .config import Config, from_dict, to_dict
from .data.images import sample_name
from .embedding import embed_batches, head_of
from .engine import DistInfo, load_checkpoint, make_loader, save_checkpoint, setup_one_process, unwrap
from .evaluation import evaluate
from .files import write_json
from .report import render_decision, render_gallery, write_report
from .tasks import build_cls_split, build_eval_loader, build_eval_split, cls_transform, load_trained_model, training_subset

__all__ = ["TopMSearch", "TrainingMatches", "search_training_set", "anchor_model", "subcentroid_statistics",
           "explain_decisions", "Decisions", "pixel_decisions", "training_config", "run_explain"]

# ============================================================================ the search and the anchors


@dataclass
class TrainingMatches:
    """What :class:`TopMSearch` found, with the sub-centroids laid out as ``(C, K)``.

    ``sims``/``index``: ``(C, K, m)`` cosines and training-set indices of each sub-centroid's nearest
    samples of its class, best first (``-inf``/``-1`` where the class has fewer than m samples).
    ``anchor_z``: ``(C, K, D)`` embedding of the nearest one (zeros where none). ``wins``: ``(C, K)``
    number of training samples whose nearest sub-centroid of their own class it is.
    ``class_counts``: ``(C,)`` training samples per class.
    """
    sims: torch.Tensor
    index: torch.Tensor
    anchor_z: torch.Tensor
    wins: torch.Tensor
    class_counts: torch.Tensor

    @property
    def found(self) -> torch.Tensor:
        """``(C, K)`` bool: the sub-centroid has a training sample of its class."""
        return self.index[..., 0] >= 0


class TopMSearch:
    """Running top-m training samples of every sub-centroid among the samples of its own class.

    Call :meth:`update` with each batch of unit embeddings, labels and dataset indices, then
    :meth:`result`. Per batch: similarities ``(B, C*K)``, masked to ``-inf`` where the sample's class
    is not the sub-centroid's, concatenated to the running ``(C*K, m)`` top-m and cut back to m by one
    ``topk``. Nothing is kept per training sample.

    Args:
        centroids: ``(C, K, D)`` unit sub-centroids.
        m: number of nearest samples kept per sub-centroid.
    """

    def __init__(self, centroids: torch.Tensor, m: int = 5):
        if m < 1:
            raise ValueError(f"top-m: m must be >= 1, got {m}")
        c, k, d = centroids.shape
        dev = centroids.device
        self.shape, self.m = (c, k, d), m
        self.points = centroids.detach().float().reshape(c * k, d)
        self.owner = torch.arange(c, device=dev).repeat_interleave(k)  # class of each flat sub-centroid
        self.sims = torch.full((c * k, m), float("-inf"), device=dev)
        self.index = torch.full((c * k, m), -1, dtype=torch.long, device=dev)
        self.anchor_z = torch.zeros(c * k, d, device=dev)
        self.wins = torch.zeros(c * k, dtype=torch.long, device=dev)
        self.counts = torch.zeros(c, dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        """Merge one batch: ``z (B, D)`` unit embeddings, ``labels (B,)``, ``index (B,)`` dataset indices.

        Labels outside ``[0, C)`` match no sub-centroid.
        """
        c, k, _ = self.shape
        z, labels, index = z.float(), labels.long(), index.long()
        sims = z @ self.points.t()                                                 # (B, C*K)
        own = labels[:, None] == self.owner[None, :]
        merged = torch.cat([self.sims, sims.masked_fill(~own, float("-inf")).t()], 1)  # (C*K, m + B)
        ids = torch.cat([self.index, index[None, :].expand(c * k, -1)], 1)
        top, pos = merged.topk(self.m, dim=1)
        found = torch.isfinite(top)
        self.sims, self.index = top, torch.where(found, ids.gather(1, pos), -1)
        new_best = found[:, 0] & (pos[:, 0] >= self.m)  # the nearest sample is in this batch
        batch_best = z[(pos[:, 0] - self.m).clamp(0, max(len(z) - 1, 0))] if len(z) else self.anchor_z
        self.anchor_z = torch.where(new_best[:, None], batch_best, self.anchor_z)
        valid = (labels >= 0) & (labels < c)
        cls = labels.clamp(0, c - 1)
        winner = sims.view(-1, c, k)[torch.arange(len(z), device=z.device), cls].argmax(1)  # own-class nearest
        self.wins += torch.bincount((cls * k + winner)[valid], minlength=c * k)
        self.counts += torch.bincount(cls[valid], minlength=c)

    def result(self) -> TrainingMatches:
        c, k, d = self.shape
        return TrainingMatches(self.sims.view(c, k, self.m), self.index.view(c, k, self.m),
                               self.anchor_z.view(c, k, d), self.wins.view(c, k), self.counts)


def search_training_set(model: nn.Module, dataset: Dataset, m: int = 5, batch_size: int = 256,
                        num_workers: int = 0, device: Optional[torch.device] = None,
                        progress: bool = True) -> TrainingMatches:
    """Embed ``dataset`` (give it its *evaluation* transform; :func:`~dnc.embedding.embed_batches`, fp32)
    and run :class:`TopMSearch` over it. ``model`` is a classifier with ``embeddings(images)`` and a DNC head."""
    from tqdm import tqdm

    from .data.classification import collate
    net = unwrap(model).eval()
    device = device or next(net.parameters()).device
    search = TopMSearch(head_of(net).centroids.centroids.to(device), m)
    loader = make_loader(dataset, batch_size, False, DistInfo(0, 1, device), 0, num_workers, collate)
    batches = tqdm(loader, desc="embedding the training set", unit="batch", leave=False, dynamic_ncols=True,
                   disable=not progress)
    for z, labels, (_, index) in embed_batches(net, batches, device):
        search.update(z, labels, index.to(device))
    return search.result()


def anchor_model(model: nn.Module, matches: TrainingMatches) -> nn.Module:
    """A copy of ``model`` whose every sub-centroid is the embedding of its nearest training sample of
    its class. A sub-centroid of a class without training samples is left as it was."""
    anchored = copy.deepcopy(unwrap(model))
    sub = head_of(anchored).centroids
    p = sub.centroids
    sub.centroids = torch.where(matches.found[..., None].to(p.device), matches.anchor_z.to(p), p)
    return anchored


def _mean_pairwise_cosine(p: torch.Tensor) -> torch.Tensor:
    """``(C,)`` mean cosine over the distinct pairs of each class's ``(C, K, D)`` vectors (NaN if K=1)."""
    k = p.shape[1]
    gram = torch.einsum("ckd,cjd->ckj", p.float(), p.float())
    off = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)
    return off / (k * (k - 1)) if k > 1 else torch.full_like(off, float("nan"))


def subcentroid_statistics(centroids: torch.Tensor, matches: TrainingMatches,
                           anchored: Optional[torch.Tensor] = None) -> dict:
    """Statistics of the ``(C, K, D)`` sub-centroids from a :class:`TrainingMatches`.

    Returns tensors: ``wins (C, K)``, ``unused (C, K)`` (wins 0), ``share (C, K)`` (wins / class
    size), ``diversity (C,)`` (mean pairwise cosine of a class's sub-centroids; lower is more
    diverse), ``anchor_cosine (C, K)`` (cosine to the nearest training sample, NaN where none) and,
    given the anchored sub-centroids, ``anchored_diversity (C,)``.
    """
    wins = matches.wins.cpu()
    counts = matches.class_counts.cpu()
    out = {"wins": wins, "unused": wins == 0, "share": wins / counts[:, None].clamp_min(1),
           "diversity": _mean_pairwise_cosine(centroids.cpu()),
           "anchor_cosine": torch.where(matches.found.cpu(), matches.sims[..., 0].cpu(), float("nan"))}
    if anchored is not None:
        out["anchored_diversity"] = _mean_pairwise_cosine(anchored.cpu())
    return out


@dataclass
class Decisions:
    """Why a DNC classifier decided, for ``N`` images and its ``T`` top classes (best first).

    ``classes``/``probs``: ``(N, T)`` top classes and their softmax probabilities. ``subcentroid``:
    ``(N, T)`` index k of the sub-centroid that gave each of these classes its score (its nearest of
    the class), ``similarity``: ``(N, T)`` that cosine. ``logits``: ``(N, C)``. Column 0 is the
    prediction, column 1 the runner-up.
    """
    classes: torch.Tensor
    probs: torch.Tensor
    subcentroid: torch.Tensor
    similarity: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def explain_decisions(model: nn.Module, images: torch.Tensor, topk: int = 2) -> Decisions:
    """Top classes of a DNC classifier for ``images`` and the sub-centroid behind each class score."""
    net = unwrap(model).eval()
    head = head_of(net)
    z, _ = net.embeddings(images)
    best, which = head.centroids.similarities(z).float().max(-1)  # (N, C): class score, its sub-centroid
    logits = head.calibrate(best)
    probs, classes = logits.softmax(1).topk(min(topk, logits.shape[1]), dim=1)
    return Decisions(classes, probs, which.gather(1, classes), best.gather(1, classes), logits)


@torch.no_grad()
def pixel_decisions(model: nn.Module, images: torch.Tensor, out_size: Sequence[int]) -> dict:
    """Per-pixel decisions of a DNC segmenter from one whole-image forward.

    The decoder features entering the pixel head are captured with a forward hook; for every pixel
    the class scores ``max_k <z, p(c, k)>`` give the logits, upsampled bilinearly to ``out_size``
    (as in evaluation), and the winning sub-centroid of the predicted class is read at the nearest
    feature pixel.

    Returns ``classes``, ``subcentroid`` (int64) and ``similarity`` (float), each ``(B, H, W)``.
    """
    net = unwrap(model).eval()
    head = head_of(net)
    captured = []
    hook = net.head.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        net(images)
    finally:
        hook.remove()
    x = captured[-1]
    b, d, h, w = x.shape
    best, which = head.centroids.similarities(head.embed(x.permute(0, 2, 3, 1).reshape(-1, d))).float().max(-1)
    c = best.shape[1]
    best, which = (t.view(b, h, w, c).permute(0, 3, 1, 2) for t in (best, which))  # (B, C, h, w)
    logits = F.interpolate(head.calibrate(best.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), size=tuple(out_size),
                           mode="bilinear", align_corners=False)
    classes = logits.argmax(1)
    H, W = classes.shape[-2:]
    dev = classes.device
    rows = (torch.arange(H, device=dev) * h // H)[None, :, None]
    cols = (torch.arange(W, device=dev) * w // W)[None, None, :]
    batch = torch.arange(b, device=dev)[:, None, None]
    return {"classes": classes, "subcentroid": which[batch, classes, rows, cols],
            "similarity": best[batch, classes, rows, cols]}


# ============================================================================ dnc explain


def _sample_name(dataset, index: int) -> str:
    return sample_name(dataset, index) or f"#{index}"


def _require_dnc(task: str, head: str, path) -> None:
    if task != "classification":
        raise ValueError(f"{path}: dnc explain needs a classification checkpoint (this one is {task})")
    if head != "dnc":
        raise ValueError(f"{path}: a {head} head has no sub-centroids to explain; "
                         "dnc explain needs a DNC checkpoint (model.head=dnc)")


def _per_class(records: list, num_classes: int) -> tuple:
    """``(correct (C,), total (C,))`` top-1 counts from ``evaluate(..., predictions=True)`` records."""
    y = torch.tensor([r["label"] for r in records], dtype=torch.long)
    ok = torch.tensor([r["pred"] == r["label"] for r in records], dtype=torch.long)
    return torch.bincount(y, ok, minlength=num_classes), torch.bincount(y, minlength=num_classes)


def _nan_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else round(float(x), 6)


def training_config(cfg: Config, ckpt: dict) -> Config:
    """``cfg`` with the training data of checkpoint ``ckpt``: its saved data selection (dataset,
    ``holdout``, dataset options, transforms), with the root, loader sizes and checks of ``cfg``. So
    that anchors are only ever images the model was trained on, whatever data overrides ``cfg`` has
    (e.g. ``data.holdout=0`` to score a separate test folder). ``cfg`` itself without a saved config."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
        return cfg
    trained = from_dict(Config, {"data": saved["data"]}).data
    keep = {k: getattr(cfg.data, k) for k in ("root", "batch_size", "eval_batch_size", "num_workers",
                                               "on_bad_sample", "check_labels")}
    return dataclasses.replace(cfg, data=dataclasses.replace(trained, **keep))


def run_explain(cfg, checkpoint, out_dir, top_m: int = 5, examples: int = 24, tile: int = 56,
                progress: bool = True, config_name: str = "") -> dict:
    """``dnc explain``: anchor, evaluate before/after, write ``anchored.pt``, ``explain.json``, the
    galleries and ``index.html`` into ``out_dir``; returns the ``explain.json`` dict."""
    _require_dnc(cfg.task, cfg.model.head, checkpoint)
    if examples < 0:
        raise ValueError(f"--examples must be >= 0, got {examples}")
    info, ckpt, model = _load_dnc(cfg, checkpoint)
    out = Path(out_dir)
    (out / "galleries").mkdir(parents=True, exist_ok=True)
    (out / "decisions").mkdir(parents=True, exist_ok=True)

    train_cfg = training_config(cfg, ckpt)
    d = train_cfg.data
    train = training_subset(train_cfg, build_cls_split(train_cfg, "train", cls_transform(train_cfg, False)))
    classes = list(train.classes)
    batch = d.eval_batch_size or d.batch_size
    matches = search_training_set(model, train, top_m, batch, d.num_workers, info.device, progress)
    anchored = anchor_model(model, matches).to(info.device).eval()
    before_p = head_of(model).centroids.centroids.detach()
    after_p = head_of(anchored).centroids.centroids.detach()
    stats = subcentroid_statistics(before_p, matches, after_p)

    val, evaluated = build_eval_split(cfg, "val")
    loader = build_eval_loader(cfg, val, info)
    before = evaluate(cfg, model, loader, info, predictions=True)
    after = evaluate(cfg, anchored, loader, info, predictions=True)
    raw_train = training_subset(train_cfg, build_cls_split(train_cfg, "train", None))
    index = matches.index.cpu()
    names = [[_sample_name(raw_train, int(i)) if i >= 0 else None for i in row] for row in index[..., 0].tolist()]
    result = {"config_name": config_name or "-", "checkpoint": str(checkpoint), "classes": classes,
              **_summary(matches, stats, before, after, classes, names, top_m, len(val), evaluated)}

    save_checkpoint(out / "anchored.pt", {
        "model": anchored.state_dict(), "config": to_dict(train_cfg), "classes": classes, "anchored": True,
        "anchor_index": index[..., 0].clone(), "anchor_cosine": stats["anchor_cosine"].clone(), "anchor_names": names,
        "source_checkpoint": str(checkpoint),
        "metrics": {"top1": after["top1"], "top5": after.get("top5"), "top1_before_anchoring": before["top1"]}})
    galleries = _write_galleries(out, raw_train, matches, stats, classes, tile)
    shown = _explain_examples(cfg, anchored, after["predictions"], val, raw_train, index[..., 0], classes, examples,
                              out, info.device, tile + 16)
    result["examples"] = shown
    write_json(out / "explain.json", result)
    write_report(out, result, galleries, shown)
    return result


def _load_dnc(cfg, checkpoint) -> tuple:
    """``(DistInfo, checkpoint dict, model in eval mode)`` of a DNC classification checkpoint (one process)."""
    info = setup_one_process("dnc explain", cfg.train.device)
    ckpt = load_checkpoint(checkpoint)
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    _require_dnc(saved.get("task", cfg.task), saved.get("model", {}).get("head", cfg.model.head), checkpoint)
    return info, ckpt, load_trained_model(cfg, ckpt, checkpoint).to(info.device).eval()


def _summary(matches: TrainingMatches, stats: dict, before: dict, after: dict, classes: list, names: list,
             top_m: int, num_eval: int, evaluated: dict) -> dict:
    """The figures of ``explain.json``: accuracy before and after anchoring, per class and per sub-centroid."""
    c, k = matches.wins.shape
    ok_b, n_eval = _per_class(before["predictions"], c)
    ok_a, _ = _per_class(after["predictions"], c)
    agree = sum(a["pred"] == b["pred"] for a, b in zip(after["predictions"], before["predictions"]))
    index, sims = matches.index.cpu(), matches.sims.cpu()
    return {
        "num_subcentroids": k, "top_m": top_m, "num_train": int(matches.class_counts.sum()), "num_eval": num_eval,
        "evaluated": evaluated,
        "accuracy": {"before": {"top1": before["top1"], "top5": before.get("top5")},
                     "after": {"top1": after["top1"], "top5": after.get("top5")},
                     "agreement": 100.0 * agree / max(len(after["predictions"]), 1)},
        "unused": int(stats["unused"].sum()),
        "eval_correct": sum(r["pred"] == r["label"] for r in after["predictions"]),
        "eval_wrong": sum(r["pred"] != r["label"] for r in after["predictions"]),
        "per_class": [{"class": ci, "name": classes[ci], "eval_images": int(n_eval[ci]),
                       "top1_before": _nan_none(100.0 * ok_b[ci].item() / n_eval[ci].item()) if n_eval[ci] else None,
                       "top1_after": _nan_none(100.0 * ok_a[ci].item() / n_eval[ci].item()) if n_eval[ci] else None,
                       "train_images": int(matches.class_counts[ci]), "unused": int(stats["unused"][ci].sum()),
                       "diversity": _nan_none(stats["diversity"][ci].item()),
                       "anchored_diversity": _nan_none(stats["anchored_diversity"][ci].item())} for ci in range(c)],
        "subcentroids": [{"class": ci, "k": kk, "wins": int(stats["wins"][ci, kk]), "share": float(stats["share"][ci, kk]),
                          "unused": bool(stats["unused"][ci, kk]), "anchor_index": int(index[ci, kk, 0]),
                          "anchor_name": names[ci][kk], "anchor_cosine": _nan_none(stats["anchor_cosine"][ci, kk].item()),
                          "exemplars": [{"index": int(i), "cosine": round(float(s), 6)}
                                        for i, s in zip(index[ci, kk], sims[ci, kk]) if i >= 0]}
                         for ci in range(c) for kk in range(k)],
    }


def _write_galleries(out: Path, raw_train, matches: TrainingMatches, stats: dict, classes: list, tile: int) -> list:
    """One picture per class (``galleries/class_<c>.png``): each sub-centroid's nearest training images."""
    c, k = matches.wins.shape
    index, sims = matches.index.cpu(), matches.sims.cpu()
    galleries = []
    for ci in range(c):
        rows = [[(raw_train[int(i)][0], float(s)) for i, s in zip(index[ci, kk], sims[ci, kk]) if i >= 0]
                for kk in range(k)]
        img = render_gallery(classes[ci], rows, stats["wins"][ci].tolist(), stats["anchor_cosine"][ci].tolist(), tile)
        galleries.append(f"galleries/class_{ci:03d}.png")
        img.save(out / galleries[-1])
    return galleries


def _explain_examples(cfg, anchored, records, val, raw_train, anchor_index, classes, count, out, device, tile) -> list:
    """Render up to ``count`` correct and ``count`` wrong predictions of the anchored model."""
    rng = random.Random(cfg.train.seed)
    chosen = []
    for correct in (False, True):
        pool = [r for r in records if (r["pred"] == r["label"]) == correct]
        chosen += sorted(rng.sample(pool, min(count, len(pool))), key=lambda r: r["index"])
    if not chosen:
        return []
    raw_val = build_cls_split(cfg, "val", None)
    images = torch.stack([torch.as_tensor(val[r["index"]][0]) for r in chosen]).to(device)
    dec = explain_decisions(anchored, images, topk=2)
    shown = []
    for n, r in enumerate(chosen):
        pred = int(dec.classes[n, 0])
        items = []
        for t in range(dec.classes.shape[1]):
            ci, kk = int(dec.classes[n, t]), int(dec.subcentroid[n, t])
            i = int(anchor_index[ci, kk])
            items.append({"class": ci, "subcentroid": kk, "similarity": round(float(dec.similarity[n, t]), 6),
                          "prob": round(float(dec.probs[n, t]), 6), "anchor_index": i,
                          "image": raw_train[i][0] if i >= 0 else None})
        correct = pred == r["label"]
        panel = [(f"{classes[x['class']]} (k={x['subcentroid']})", x["image"], x["similarity"]) for x in items]
        img = render_decision(raw_val[r["index"]][0], f"label {classes[r['label']]}", panel[0],
                              panel[1] if len(panel) > 1 else None, correct, tile)
        file = f"decisions/{'correct' if correct else 'wrong'}_{r['index']:06d}.png"
        img.save(out / file)
        runner = f", runner-up {classes[items[1]['class']]} ({items[1]['similarity']:.3f})" if len(items) > 1 else ""
        shown.append({"file": file, "index": r["index"], "label": r["label"], "pred": pred, "correct": correct,
                      "caption": f"#{r['index']}: label {classes[r['label']]}, predicted {classes[pred]} "
                                 f"({items[0]['similarity']:.3f}){runner}",
                      "decided_by": [{k: v for k, v in x.items() if k != "image"} for x in items]})
    return shown
