"""Open-set rejection: scores of "no known class", AUROC / FPR at 95% TPR, calibration (``dnc calibrate``).

A DNC classifier places every class at K points of the unit sphere, so the cosine of an input to the
nearest sub-centroid of *any* class (before the temperature) says how much it looks like anything
seen in training. The linear twin has no such geometry; its usual scores are the maximum softmax
probability and the energy ``logsumexp(logits)``. Everything here treats a *higher* score as "more
known", so one threshold rule serves every score:

* :func:`image_scores` / :func:`score_loader`: ``{kind: (N,)}`` for a batch / a data loader
  (``cosine`` and ``subenergy`` for DNC heads; ``msp``, ``maxlogit`` and ``energy`` for every head);
* :func:`pixel_scores`: the per-pixel map of a segmenter (``cosine`` for DNC, ``msp`` for linear);
  :func:`pixel_score_maps`: every score per pixel;
* :func:`feature_bank`: training features for the ``knn`` score (``dnc test --knn K``), which every
  head offers next to its own scores;
* :func:`auroc`, :func:`threshold_at_tpr`, :func:`fpr_at_tpr`: metrics in torch, no scikit-learn
  (:func:`separation`: the three of one score);
* :func:`ood_report`: what ``dnc test --ood DIR`` adds to its result; :func:`pixel_ood_report`, what
  ``dnc test --ood-pixels`` adds (the pixels of classes left out of a segmenter's training);
* :func:`calibrate` (``dnc calibrate``) stores ``{"score", "threshold", "tpr"}`` under ``"ood"`` in a
  copy of the checkpoint, and :func:`apply_threshold` turns scores into ``unknown`` verdicts
  (``dnc predict``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .embedding import head_of
from .files import check_output
from .models.decoders import resize

__all__ = ["SCORES", "PIXEL_SCORES", "default_score", "subcentroid_energy", "knn_topk", "knn_scores", "image_scores", "score_loader",
           "pixel_outputs", "pixel_scores", "pixel_score_maps", "auroc", "threshold_at_tpr", "fpr_at_tpr", "ood_report",
           "pixel_ood_report", "separation", "feature_bank", "calibrate", "apply_threshold"]

# The scores each head offers (higher = more like a known class). The first is the default: the best on
# validation in BENCHMARKS.md section 7a (3 seeds; for the linear twin energy 66.2 AUROC, max softmax 62.3).
SCORES = {"dnc": ("cosine", "subenergy", "msp", "maxlogit", "energy"), "linear": ("energy", "msp", "maxlogit")}


# A segmenter has one per-pixel score (pixel_outputs): the max sub-centroid cosine, or the max softmax.
PIXEL_SCORES = {"dnc": "cosine", "linear": "msp"}


def default_score(head: str, segmentation: bool = False) -> str:
    return PIXEL_SCORES[head] if segmentation else SCORES[head][0]


def _logit_scores(logits: torch.Tensor) -> dict:
    logits = logits.float()
    return {"msp": logits.softmax(1).amax(1), "maxlogit": logits.amax(1), "energy": logits.logsumexp(1)}


def subcentroid_energy(sims: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(N,)`` ``T * logsumexp`` over all C*K sub-centroid cosines ``sims (N, C, K)`` at ``T``: a soft
    maximum that, unlike the max cosine, also rewards lying near several sub-centroids."""
    return temperature * torch.logsumexp(sims.float().flatten(1) / temperature, 1)


def knn_topk(z: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """``(N, k)``: the cosines of each unit vector of ``z`` to its ``k`` nearest unit vectors of ``bank``,
    nearest first (column ``j`` is the (j+1)-th neighbour's: one pass gives every smaller k)."""
    if not 0 < k <= len(bank):
        raise ValueError(f"knn_scores: k={k} must be in [1, {len(bank)}] (the bank's size)")
    with torch.no_grad():
        return torch.cat([(part.float() @ bank.float().t()).topk(k, dim=1).values for part in z.split(chunk)])


def knn_scores(z: torch.Tensor, bank: torch.Tensor, k: int = 50, chunk: int = 1024) -> torch.Tensor:
    """``(N,)`` cosine of each unit vector of ``z`` to its ``k``-th nearest unit vector of ``bank``
    (Sun et al. 2022, KNN open-set score: the same order as minus the k-th neighbour's distance)."""
    return knn_topk(z, bank, k, chunk)[:, -1]


def image_scores(model: nn.Module, images: torch.Tensor, bank: Optional[torch.Tensor] = None, k: int = 50) -> tuple:
    """``(logits (N, C), {kind: (N,)})`` of a classifier: ``msp``, ``maxlogit`` and ``energy`` of the
    logits and, for a DNC head, ``cosine``, the max over classes and sub-centroids of ``<z, p(c, k)>``,
    and ``subenergy``, :func:`subcentroid_energy` of those cosines at the head's temperature; with a
    ``bank`` (:func:`feature_bank`), ``knn``: :func:`knn_scores` of the backbone features."""
    with torch.no_grad():
        head = head_of(model)
        feats = model.features(images)
        if not hasattr(head, "centroids"):
            logits = head(feats).float()
            scores = _logit_scores(logits)
        else:
            sims = head.centroids.similarities(head.embed(feats)).float()  # (N, C, K)
            best = sims.amax(-1)
            logits = head.calibrate(best).float()
            scores = {"cosine": best.amax(1), "subenergy": subcentroid_energy(sims, head.temperature),
                      **_logit_scores(logits)}
        if bank is not None:
            scores["knn"] = knn_scores(F.normalize(feats.float(), dim=-1), bank, k)
        return logits, scores


def score_loader(model: nn.Module, loader, device: torch.device, bank: Optional[torch.Tensor] = None,
                 k: int = 50) -> tuple:
    """Scores of every sample of a classification loader: ``({kind: (N,)}, labels (N,), preds (N,))``
    on the CPU, in loader order; in fp32 like ``dnc predict`` (:func:`image_scores`, without gradients)."""
    model.eval()
    parts, labels, preds = {}, [], []
    for images, targets, *_ in loader:
        if not len(targets):
            continue
        with torch.autocast(device.type, enabled=False):
            logits, scores = image_scores(model, images.to(device), bank, k)
        for kind, v in scores.items():
            parts.setdefault(kind, []).append(v.float().cpu())
        labels.append(targets.cpu())
        preds.append(logits.argmax(1).cpu())
    if not labels:
        return {}, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels), torch.cat(preds)


def _pixel_forward(model: nn.Module, images: torch.Tensor) -> tuple:
    """``(features (B*h*w, D), logits (B, C, h, w), sims (B*h*w, C, K) or None)`` of a segmenter at the
    decoder's resolution: its decoder features and logits and, for a DNC head, the cosine of every pixel
    to every sub-centroid (pixels in ``(B, h, w)`` order)."""
    head = model.head.head
    x = model.decoder(model.encoder(images))
    feats, logits = x.permute(0, 2, 3, 1).flatten(0, 2), model.head(x).float()
    if not hasattr(head, "centroids"):
        return feats, logits, None
    return feats, logits, head.centroids.similarities(head.embed(feats)).float()


def _pixel_map(values: torch.Tensor, logits: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """``(B, H, W)``: one value per decoder pixel (``(B*h*w,)``, as ``logits`` is laid out) upsampled to ``out_size``."""
    b, _, h, w = logits.shape
    return resize(values.view(b, 1, h, w), out_size)[:, 0]


def pixel_outputs(model: nn.Module, images: torch.Tensor, out_size: Sequence[int]) -> tuple:
    """``(logits (B, C, h, w), labels (B, H, W), score (B, H, W))`` of a segmenter from one forward:
    the logits at the decoder's resolution, and at ``out_size`` the class of every pixel (argmax of the
    logits upsampled bilinearly) and its :func:`pixel_scores`."""
    with torch.no_grad():
        _, logits, sims = _pixel_forward(model, images)
        up = resize(logits, out_size)
        if sims is None:
            return logits, up.argmax(1), up.softmax(1).amax(1)
        return logits, up.argmax(1), _pixel_map(sims.flatten(1).amax(1), logits, out_size)


def pixel_scores(model: nn.Module, images: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """``(B, H, W)`` per-pixel score of a segmenter at ``out_size``: for a DNC head the max
    sub-centroid cosine of each decoder pixel (upsampled bilinearly), for a linear head the max
    softmax of the upsampled logits."""
    return pixel_outputs(model, images, out_size)[2]


def pixel_score_maps(model: nn.Module, images: torch.Tensor, out_size: Sequence[int],
                     bank: Optional[torch.Tensor] = None, k: int = 50) -> dict:
    """``{kind: (B, H, W)}``: every score of :data:`SCORES` per pixel at ``out_size``: ``msp``, ``maxlogit``
    and ``energy`` of the upsampled logits and, for a DNC head, ``cosine`` and ``subenergy`` of each
    decoder pixel's sub-centroid cosines, upsampled bilinearly (as :func:`pixel_outputs`); with a ``bank``
    (:func:`feature_bank`), ``knn`` of each decoder pixel's features, upsampled too."""
    with torch.no_grad():
        feats, logits, sims = _pixel_forward(model, images)
        maps = _logit_scores(resize(logits, out_size))
        if bank is not None:
            maps["knn"] = _pixel_map(knn_scores(F.normalize(feats.float(), dim=-1), bank, k), logits, out_size)
        if sims is not None:
            maps["cosine"] = _pixel_map(sims.flatten(1).amax(1), logits, out_size)
            maps["subenergy"] = _pixel_map(subcentroid_energy(sims, model.head.head.temperature), logits, out_size)
        return maps


KNN_BANK = 20000  # training samples (a segmenter: pixels) whose features the knn score compares with


def feature_bank(cfg, model: nn.Module, device: torch.device, size: int = KNN_BANK) -> torch.Tensor:
    """``(M, D)`` unit features of the training split for the ``knn`` score (Sun et al. 2022), in fp32 and
    evaluation transforms: a classifier's backbone features of ``size`` random training images (all, if
    fewer), a segmenter's decoder features of random labelled pixels, ``ceil(size / images)`` per image."""
    from .engine import DistInfo
    from .tasks import build_eval_loader, build_eval_split
    dataset, _ = build_eval_split(cfg, "train")
    generator = torch.Generator().manual_seed(0)
    if cfg.task == "classification":
        dataset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset), generator=generator)[:size].tolist())
    per_image = math.ceil(size / max(len(dataset), 1))
    parts = []
    model.eval()
    for images, targets, *_ in build_eval_loader(cfg, dataset, DistInfo(0, 1, device)):
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if cfg.task == "classification":
                parts.append(model.features(images.to(device)).float())
                continue
            feats, logits, _ = _pixel_forward(model, images.to(device))
            labels = model.resize_labels(targets, logits.shape[-2:]).flatten()
            feats = feats[(labels < cfg.data.num_classes).to(device)].float()
            parts.append(feats[torch.randperm(len(feats), generator=generator)[: per_image * len(images)].to(device)])
    if not parts or not sum(len(p) for p in parts):
        raise ValueError("--knn: the training split has no labelled sample for the bank")
    return F.normalize(torch.cat(parts), dim=1)


# ============================================================================ metrics
def _check_pair(known: torch.Tensor, unknown: torch.Tensor) -> tuple:
    known, unknown = torch.as_tensor(known).double().flatten(), torch.as_tensor(unknown).double().flatten()
    if not len(known) or not len(unknown):
        raise ValueError(f"open-set metrics need known and unknown samples, got {len(known)} and {len(unknown)}")
    if not (torch.isfinite(known).all() and torch.isfinite(unknown).all()):
        raise ValueError("open-set metrics: a score is NaN or infinite")
    return known, unknown


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Area under the ROC curve of telling ``known`` (positives, higher scores) from ``unknown``:
    the probability that a known sample scores higher than an unknown one, ties counting half
    (the Mann-Whitney U statistic with tie-averaged ranks)."""
    known, unknown = _check_pair(known, unknown)
    values, inverse, counts = torch.unique(torch.cat([known, unknown]), return_inverse=True, return_counts=True)
    end = counts.cumsum(0).double()
    ranks = (end - (counts.double() - 1) / 2)[inverse]  # 1-based ranks, ties averaged
    n1, n0 = len(known), len(unknown)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def threshold_at_tpr(known: torch.Tensor, tpr: float = 0.95) -> float:
    """The largest threshold ``t`` with at least a fraction ``tpr`` of ``known`` scoring ``>= t``."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"--tpr must be in (0, 1], got {tpr}")
    known = torch.as_tensor(known).double().flatten()
    if not len(known):
        raise ValueError("a threshold needs at least one known sample")
    ordered = known.sort(descending=True).values
    return float(ordered[max(math.ceil(tpr * len(known) - 1e-9), 1) - 1])


def fpr_at_tpr(known: torch.Tensor, unknown: torch.Tensor, tpr: float = 0.95) -> tuple:
    """``(fpr, threshold)``: the fraction of ``unknown`` accepted at :func:`threshold_at_tpr`."""
    known, unknown = _check_pair(known, unknown)
    t = threshold_at_tpr(known, tpr)
    return float((unknown >= t).double().mean()), t


def separation(known: torch.Tensor, unknown: torch.Tensor, tpr: float = 0.95) -> dict:
    """``{"auroc", "fpr95", "threshold"}`` of one score (AUROC and FPR in percent, FPR at ``tpr``)."""
    fpr, t = fpr_at_tpr(known, unknown, tpr)
    return {"auroc": round(100 * auroc(known, unknown), 4), "fpr95": round(100 * fpr, 4), "threshold": t}


def _folder_loader(cfg, folder, device) -> DataLoader:
    from .data.classification import collate
    from .data.images import ImageList, list_images
    from .tasks import eval_transform
    files = list_images(folder)
    return DataLoader(ImageList(files, eval_transform(cfg)), batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                      num_workers=cfg.data.num_workers, collate_fn=collate, pin_memory=device.type == "cuda")


# ============================================================================ dnc test --ood
def ood_report(cfg, model: nn.Module, val_loader, folders: Sequence[str], device: torch.device,
               tpr: float = 0.95, bank: Optional[torch.Tensor] = None, k: int = 50) -> dict:
    """``dnc test --ood DIR...``: for each folder (images of no known class), and for each score of
    the head, AUROC and FPR against the known images of ``val_loader`` (the split being tested), at the
    threshold that keeps a fraction ``tpr`` of them, and that threshold.

    Returns ``{folder: {"images": n, kind: {"auroc", "fpr95", "threshold"}}}`` (``fpr95`` is the
    FPR at ``tpr``, 95% by default)."""
    from .engine import check_one_process
    if cfg.task != "classification":
        raise ValueError("dnc test --ood: open-set rejection is measured for classifiers; for a segmenter, "
                         "dnc predict writes the per-pixel score map")
    check_one_process("dnc test --ood")
    if len(set(map(str, folders))) != len(folders):
        raise ValueError("dnc test --ood: a folder is given twice")
    loaders = {str(f): _folder_loader(cfg, f, device) for f in folders}  # every folder checked before any work
    # In fp32 whatever train.amp, as dnc calibrate and dnc predict score (docs/ALGORITHM.md, "Precision").
    known, _, _ = score_loader(model, val_loader, device, bank, k)
    out = {}
    for name, loader in loaders.items():
        unknown, _, _ = score_loader(model, loader, device, bank, k)
        out[name] = {"images": len(loader.dataset)}
        for kind in known:
            out[name][kind] = separation(known[kind], unknown[kind], tpr)
    return out


def pixel_ood_report(model: nn.Module, loader, left_out: Sequence[str], device: torch.device,
                     tpr: float = 0.95, bank: Optional[torch.Tensor] = None, k: int = 50) -> dict:
    """``dnc test --ood-pixels``: per pixel, the known classes' pixels against those of the classes left out
    of training (``left_out``, marked ``LEFT_OUT_INDEX`` in the masks of ``loader``), for every score of
    :func:`pixel_score_maps`: AUROC, FPR at ``tpr`` and the threshold (as :func:`ood_report`). Every
    labelled pixel's scores are held in memory (4 bytes per pixel and score). Returns ``{"left_out": names,
    "pixels": {"known": n, "unknown": m}, "scores": {kind: {"auroc", "fpr95", "threshold"}}}``."""
    from .data.segmentation import LEFT_OUT_INDEX
    from .engine import check_one_process
    check_one_process("dnc test --ood-pixels")
    model.eval()
    known, unknown = {}, {}
    for images, masks, *_ in loader:
        masks = masks.to(device)
        with torch.autocast(device.type, enabled=False):
            maps = pixel_score_maps(model, images.to(device), masks.shape[-2:], bank, k)
        for kind, m in maps.items():
            known.setdefault(kind, []).append(m[masks < LEFT_OUT_INDEX].cpu())
            unknown.setdefault(kind, []).append(m[masks == LEFT_OUT_INDEX].cpu())
    known, unknown = ({k: torch.cat(v) for k, v in d.items()} for d in (known, unknown))
    if not known or not len(next(iter(unknown.values()))):
        raise ValueError(f"dnc test --ood-pixels: no pixel of the left-out classes ({', '.join(left_out)}) "
                         f"in the split tested")
    return {"left_out": list(left_out),
            "pixels": {"known": len(next(iter(known.values()))), "unknown": len(next(iter(unknown.values())))},
            "scores": {kind: separation(known[kind], unknown[kind], tpr) for kind in known}}


# ============================================================================ calibration and verdicts
def calibrate(cfg, checkpoint, out, tpr: float = 0.95, score: Optional[str] = None, device: str = "auto",
              force: bool = False) -> dict:
    """``dnc calibrate``: the threshold that keeps a fraction ``tpr`` of the validation images of
    ``cfg``, written with the score kind under ``"ood"`` into a copy of the checkpoint at ``out``
    (atomically; an existing file only with ``force``, never the checkpoint). Returns that ``"ood"`` dict."""
    from .config import to_dict
    from .engine import load_checkpoint, save_checkpoint, setup_one_process
    from .tasks import build_datasets, build_eval_loader, load_trained_model

    if cfg.task != "classification":
        raise ValueError("dnc calibrate: thresholds are calibrated for classifiers")
    kind = score or default_score(cfg.model.head)
    if kind not in SCORES[cfg.model.head]:
        raise ValueError(f"--score {kind!r} is not available for a {cfg.model.head} head; "
                         f"choose one of {', '.join(SCORES[cfg.model.head])}")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"--tpr must be in (0, 1], got {tpr}")
    check_output(out, [checkpoint], force)
    info = setup_one_process("dnc calibrate", device if device != "auto" else cfg.train.device)
    ckpt = load_checkpoint(checkpoint)
    model = load_trained_model(cfg, ckpt, checkpoint).to(info.device).eval()
    val = build_datasets(cfg, ("val",))[0]["val"]
    # In fp32 whatever train.amp: the threshold is applied by dnc predict to fp32 scores.
    scores, labels, preds = score_loader(model, build_eval_loader(cfg, val, info), info.device)
    if not len(labels):
        raise ValueError("dnc calibrate: the validation split has no readable image")
    t = threshold_at_tpr(scores[kind], tpr)
    kept = float((scores[kind] >= t).double().mean())
    ood = {"score": kind, "threshold": t, "tpr": tpr, "kept": round(kept, 6), "val_images": len(labels),
           "val_top1": round(100 * float((labels == preds).double().mean()), 4)}
    state = dict(ckpt)
    state.pop("format", None)
    if not isinstance(state.get("config"), dict):
        state["config"] = to_dict(cfg)
    state["ood"] = ood
    save_checkpoint(Path(out), state)
    return ood


def apply_threshold(scores: dict, ckpt: dict) -> Optional[list]:
    """Verdicts of a calibrated checkpoint (``None`` if it has no ``"ood"`` entry): for each sample
    of ``scores`` (``{kind: (N,)}``, e.g. from :func:`image_scores`) a dict ``{"unknown": bool,
    "score": float, "threshold": float, "kind": str}``; unknown means below the threshold."""
    ood = ckpt.get("ood")
    if not ood:
        return None
    kind, t = ood["score"], float(ood["threshold"])
    if kind not in scores:
        raise ValueError(f"the checkpoint is calibrated on the {kind!r} score, which this model does not give")
    return [{"unknown": bool(s < t), "score": round(float(s), 6), "threshold": round(t, 6), "kind": kind}
            for s in scores[kind].float().cpu().tolist()]


def verdict_text(v: dict) -> str:
    """``unknown (cosine 0.412 < 0.550)`` or ``known (cosine 0.801 >= 0.550)``."""
    return (f"unknown ({v['kind']} {v['score']:.3f} < {v['threshold']:.3f})" if v["unknown"]
            else f"known ({v['kind']} {v['score']:.3f} >= {v['threshold']:.3f})")


def save_score_map(score: torch.Tensor, path) -> None:
    """An ``(H, W)`` score map in [0, 1] (cosine or max softmax; lower values clipped) as a grayscale PNG."""
    from PIL import Image
    pixels = (score.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    Image.fromarray(pixels, mode="L").save(path)
