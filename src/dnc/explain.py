"""Explanations: sub-centroids as real training images (``dnc explain`` and ``dnc predict``).

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
* :func:`anchor_model`, :func:`subcentroid_statistics`, :func:`explain_decisions`;
* :func:`render_gallery`, :func:`render_decision` (Pillow only) and :func:`write_report` (one
  self-contained HTML page, images beside it, relative links, no script);
* :func:`run_explain`, :func:`run_predict` and :func:`add_commands`, the command line.

``dnc predict --explain`` shows the training images behind a decision. It needs the anchored
checkpoint written by ``dnc explain`` (``DIR/anchored.pt``), which stores the training-set index of
every anchor, and the training set of its config, from which those images are read.
"""
from __future__ import annotations

import copy
import html
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import Config, from_dict, to_dict
from .engine import load_checkpoint, save_checkpoint, setup_distributed, unwrap
from .data.classification import read_rgb
from .ood import apply_threshold, image_scores, pixel_scores, save_score_map, verdict_text
from .tasks import autocast, build_cls_split, build_datasets, build_eval_loader, evaluate, load_trained_model

__all__ = ["TopMSearch", "TrainingMatches", "search_training_set", "anchor_model", "subcentroid_statistics",
           "explain_decisions", "Decisions", "pixel_decisions", "render_gallery", "render_decision",
           "render_segmentation", "write_report",
           "run_explain", "run_predict", "add_commands"]

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


class _Indexed(Dataset):
    """``(image, label, index)`` samples of a dataset (``None`` stays ``None``: a skipped file)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return None if sample is None else (sample[0], sample[1], index)


def _collate_indexed(batch):
    from .data.classification import collate
    kept = [s for s in batch if s is not None]
    images, labels, _ = collate([(img, y) for img, y, _ in kept])
    return images, labels, torch.tensor([i for _, _, i in kept], dtype=torch.long)


def _head(model: nn.Module) -> nn.Module:
    net = unwrap(model)
    return net.head_module() if hasattr(net, "head_module") else net.head


@torch.no_grad()
def search_training_set(model: nn.Module, dataset: Dataset, m: int = 5, batch_size: int = 256,
                        num_workers: int = 0, device: Optional[torch.device] = None, autocast=None,
                        progress: bool = True) -> TrainingMatches:
    """Embed ``dataset`` (give it its *evaluation* transform) and run :class:`TopMSearch` over it.

    ``model`` is a classifier with ``embeddings(images)`` and a DNC head; ``autocast`` an optional
    context manager factory used around the forward (as in evaluation).
    """
    from contextlib import nullcontext

    from tqdm import tqdm

    net = unwrap(model).eval()
    device = device or next(net.parameters()).device
    search = TopMSearch(_head(net).centroids.centroids.to(device), m)
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_indexed)
    for images, labels, index in tqdm(loader, desc="embedding the training set", unit="batch", leave=False,
                                      dynamic_ncols=True, disable=not progress):
        if not len(labels):
            continue
        with (autocast() if autocast is not None else nullcontext()):
            z, _ = net.embeddings(images.to(device))
        search.update(z.float(), labels.to(device), index.to(device))
    return search.result()


def anchor_model(model: nn.Module, matches: TrainingMatches) -> nn.Module:
    """A copy of ``model`` whose every sub-centroid is the embedding of its nearest training sample of
    its class. A sub-centroid of a class without training samples is left as it was."""
    anchored = copy.deepcopy(unwrap(model))
    sub = _head(anchored).centroids
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
    head = _head(net)
    z, _ = net.embeddings(images)
    best, which = head.centroids.similarities(z).float().max(-1)  # (N, C): class score, its sub-centroid
    logits = head.calibrate(best)
    probs, classes = logits.softmax(1).topk(min(topk, logits.shape[1]), dim=1)
    return Decisions(classes, probs, which.gather(1, classes), best.gather(1, classes), logits)


# ============================================================================ pictures (Pillow only)
_BG, _INK, _MUTED, _RED, _GREEN = (255, 255, 255), (30, 30, 30), (110, 110, 110), (200, 30, 30), (20, 140, 60)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image or a ``(3, H, W)``/``(H, W)`` tensor (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    t = torch.as_tensor(image).detach().cpu()
    if t.is_floating_point():
        t = (t.clamp(0, 1) * 255).round()
    t = t.to(torch.uint8)
    if t.ndim == 3:
        t = t.permute(1, 2, 0)
        if t.shape[2] == 1:
            t = t.expand(-1, -1, 3)
    return Image.fromarray(t.contiguous().numpy()).convert("RGB")


def _tile(image, size: int) -> Image.Image:
    """``image`` fitted into a ``size`` x ``size`` tile: images at most half the tile are enlarged by
    an integer factor with nearest neighbour (8x8 digits stay crisp), others scaled smoothly."""
    tile = Image.new("RGB", (size, size), (236, 236, 236))
    if image is None:
        return tile
    img = _to_pil(image)
    w, h = img.size
    if max(w, h) <= size // 2:
        f = size // max(w, h)
        img = img.resize((w * f, h * f), Image.NEAREST)
    else:
        img = ImageOps.contain(img, (size, size), Image.LANCZOS)
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


@dataclass
class _Cell:
    image: object = None
    above: str = ""
    below: str = ""
    frame: Optional[tuple] = None


def _render(title: str, rows: Sequence[tuple], tile: int, font_size: int = 12) -> Image.Image:
    """Rows of ``(label_lines, label_colour, cells)``: a label block then image tiles with text above
    and below each."""
    font, bold = _font(font_size), _font(font_size + 2)
    line, pad = font_size + 4, 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([int(probe.textlength(s, font=font)) for lines, _, _ in rows for s in lines] + [0])
    label_w = label_w + 2 * pad if label_w else 0
    ncols = max(len(cells) for _, _, cells in rows)
    cell_w = max([tile] + [int(probe.textlength(t, font=font)) + 4 for _, _, cells in rows for c in cells
                          for t in (c.above, c.below)])
    has_above = any(c.above for _, _, cells in rows for c in cells)
    row_h = tile + line + (line if has_above else 0) + 2 * pad
    head_h = line + 2 * pad if title else 0
    width = max(label_w + ncols * (cell_w + pad) + pad, int(probe.textlength(title, font=bold)) + 2 * pad)
    canvas = Image.new("RGB", (width, head_h + len(rows) * row_h), _BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=_INK, font=bold)
    for r, (lines, colour, cells) in enumerate(rows):
        y = head_h + r * row_h + pad
        for i, s in enumerate(lines):
            draw.text((pad, y + (line if has_above else 0) + i * line), s, fill=colour or _INK, font=font)
        for j, cell in enumerate(cells):
            x = label_w + pad + j * (cell_w + pad)
            if cell.above:
                draw.text((x + cell_w / 2, y), cell.above, fill=_INK, font=font, anchor="ma")
            ty = y + (line if has_above else 0)
            tx = x + (cell_w - tile) // 2
            canvas.paste(_tile(cell.image, tile), (tx, ty))
            if cell.frame is not None:
                draw.rectangle((tx - 2, ty - 2, tx + tile + 1, ty + tile + 1), outline=cell.frame, width=2)
            draw.text((x + cell_w / 2, ty + tile + 3), cell.below, fill=_MUTED, font=font, anchor="ma")
    return canvas


def render_gallery(class_name: str, exemplars: Sequence[Sequence[tuple]], wins: Sequence[int],
                   anchor_cosine: Sequence[float], tile: int = 56) -> Image.Image:
    """One class's gallery: a row per sub-centroid with its nearest training images, best first.

    Args:
        exemplars: per sub-centroid, ``(image, cosine)`` pairs (image: PIL or uint8 tensor).
        wins: training samples won by each sub-centroid (0 is flagged "unused").
        anchor_cosine: cosine of each sub-centroid to its nearest sample (NaN if none).
    """
    rows = []
    for k, (row, w, cos) in enumerate(zip(exemplars, wins, anchor_cosine)):
        lines = [f"k={k}", f"wins {int(w)}"] + (["UNUSED"] if w == 0 else [])
        if not row:
            lines.append("no training sample")
        cells = [_Cell(img, below=f"{s:.3f}") for img, s in row] or [_Cell(None, below="-")]
        rows.append((lines, _RED if w == 0 else None, cells))
    return _render(f"class {class_name}", rows, tile)


def render_decision(image, title: str, predicted: tuple, runner_up: Optional[tuple], correct: Optional[bool] = None,
                    tile: int = 80) -> Image.Image:
    """A test image beside the training images that decided it.

    ``predicted`` and ``runner_up`` are ``(caption, anchor image or None, cosine)`` for the nearest
    sub-centroid of the predicted and of the runner-up class. ``correct`` frames the test image green
    or red (None: no frame).
    """
    frame = None if correct is None else (_GREEN if correct else _RED)
    cells = [_Cell(image, above="test image", below=title, frame=frame)]
    for role, item in (("predicted", predicted), ("runner-up", runner_up)):
        if item is not None:
            caption, img, cos = item
            cells.append(_Cell(img, above=f"{role}: {caption}", below=f"cos {cos:.3f}"))
    return _render("", [([], None, cells)], tile)


# ============================================================================ the report


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1e1e1e;background:#fafafa}
h1{font-size:24px;margin:0 0 6px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:16px 0 6px} p.note{color:#555;max-width:1100px;margin:4px 0}
table{border-collapse:collapse;font-size:13px;background:#fff} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left} tr.bad td{color:#c81e1e}
.big td{font-size:15px;padding:5px 12px}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px} figcaption{font-size:12px;color:#444;margin-top:4px}
img{display:block;image-rendering:pixelated}
"""
_BAD = ' class="bad"'


def write_report(out_dir: Path, result: dict, galleries: Sequence[str], examples: Sequence[dict]) -> Path:
    """Write ``out_dir/index.html`` from the ``explain.json`` dict, the gallery files (one per class,
    relative to ``out_dir``) and the explained predictions (dicts with ``file``, ``caption``, ``correct``)."""
    e = html.escape
    classes = result["classes"]
    acc = result["accuracy"]
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>DNC explanation: "
             f"{e(result['config_name'])}</title><style>{_CSS}</style></head><body>",
             "<h1>Deep Nearest Centroids: sub-centroids as real training images</h1>",
             f"<p class=\"note\">Config <code>{e(result['config_name'])}</code>, checkpoint "
             f"<code>{e(result['checkpoint'])}</code>: {len(classes)} classes &times; {result['num_subcentroids']} "
             f"sub-centroids, {result['num_train']} training and {result['num_eval']} evaluation images. "
             "Anchoring replaces every sub-centroid by the embedding of the nearest training image of its class; "
             "the anchored model then classifies a test image by the most similar of these "
             f"{len(classes) * result['num_subcentroids']} training images.</p>",
             "<h2>Accuracy</h2><table class=\"big\"><tr><th class=\"l\">model</th><th>top-1 %</th><th>top-5 %</th></tr>"]
    for name, key in (("original sub-centroids", "before"), ("anchored to training images", "after")):
        parts.append(f"<tr><td class=\"l\">{name}</td><td>{_fmt(acc[key]['top1'])}</td>"
                     f"<td>{_fmt(acc[key]['top5'])}</td></tr>")
    parts.append(f"</table><p class=\"note\">Change {acc['after']['top1'] - acc['before']['top1']:+.2f} points; "
                 f"the two models agree on {_fmt(acc['agreement'])}% of the evaluation images. "
                 f"{result['unused']} of {len(classes) * result['num_subcentroids']} sub-centroids win no training "
                 "image (unused).</p>")

    def decisions(correct: bool) -> None:
        chosen = [x for x in examples if x["correct"] == correct]
        total = result["eval_correct" if correct else "eval_wrong"]
        parts.append(f"<h2>{'Correct decisions' if correct else 'Mistakes'} of the anchored model, explained "
                     f"({len(chosen)} shown of {total})</h2><p class=\"note\">Each evaluation image beside the "
                     "training images that decided it: the anchors of the nearest sub-centroid of the predicted class "
                     "and of the runner-up class, with their cosines to the test image.</p><div class=\"grid\">")
        parts.extend(f"<figure><img src=\"{e(x['file'])}\" alt=\"{e(x['caption'])}\"><figcaption>{e(x['caption'])}"
                     "</figcaption></figure>" for x in chosen)
        parts.append("</div>" if chosen else "<p class=\"note\">none</p></div>")

    decisions(correct=False)
    parts.append("<h2>Sub-centroids as training images</h2><p class=\"note\">One row per sub-centroid k: its "
                 f"{result['top_m']} nearest training images of its class, nearest (the anchor) first, with their "
                 "cosine to the sub-centroid. <i>wins</i>: training images of the class whose nearest sub-centroid "
                 "it is.</p><div class=\"grid\">")
    for c, src in enumerate(galleries):
        pc = result["per_class"][c]
        parts.append(f"<figure><img src=\"{e(src)}\" alt=\"gallery of class {e(classes[c])}\">"
                     f"<figcaption>class <b>{e(classes[c])}</b>: top-1 {_fmt(pc['top1_before'])}% &rarr; "
                     f"{_fmt(pc['top1_after'])}% anchored; diversity {_fmt(pc['diversity'], 3)}</figcaption></figure>")
    parts.append("</div>")
    decisions(correct=True)

    parts.append("<h2>Per-class accuracy and diversity</h2><p class=\"note\">Diversity: mean pairwise cosine of "
                 "a class's sub-centroids (lower is more diverse), original and anchored.</p><table><tr>"
                 "<th class=\"l\">class</th><th>eval images</th><th>top-1 % original</th><th>top-1 % anchored</th>"
                 "<th>training images</th><th>unused sub-centroids</th><th>diversity</th><th>anchored diversity</th></tr>")
    for c, pc in enumerate(result["per_class"]):
        parts.append(f"<tr{_BAD if pc['unused'] else ''}><td class=\"l\">{e(classes[c])}</td>"
                     f"<td>{pc['eval_images']}</td><td>{_fmt(pc['top1_before'])}</td><td>{_fmt(pc['top1_after'])}</td>"
                     f"<td>{pc['train_images']}</td><td>{pc['unused']}</td><td>{_fmt(pc['diversity'], 3)}</td>"
                     f"<td>{_fmt(pc['anchored_diversity'], 3)}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Sub-centroid statistics</h2><table><tr><th class=\"l\">class</th><th>k</th><th>wins</th>"
                 "<th>share of class %</th><th>anchor cosine</th><th class=\"l\">anchor training image</th>"
                 "<th class=\"l\">status</th></tr>")
    for s in result["subcentroids"]:
        parts.append(f"<tr{_BAD if s['unused'] else ''}><td class=\"l\">{e(classes[s['class']])}</td>"
                     f"<td>{s['k']}</td><td>{s['wins']}</td><td>{_fmt(100 * s['share'], 1)}</td>"
                     f"<td>{_fmt(s['anchor_cosine'], 3)}</td><td class=\"l\">{e(str(s['anchor_name']))}</td>"
                     f"<td class=\"l\">{'unused' if s['unused'] else 'used'}</td></tr>")
    parts.append("</table></body></html>\n")
    path = Path(out_dir) / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ============================================================================ dnc explain


def _sample_name(dataset, index: int) -> str:
    name = getattr(dataset, "sample_name", None)
    return (name(index) if name is not None else None) or f"#{index}"


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


def run_explain(cfg, checkpoint, out_dir, top_m: int = 5, examples: int = 24, tile: int = 56,
                progress: bool = True, config_name: str = "") -> dict:
    """``dnc explain``: anchor, evaluate before/after, write ``anchored.pt``, ``explain.json``, the
    galleries and ``index.html`` into ``out_dir``; returns the ``explain.json`` dict."""
    from .data.transforms import build_cls_transform

    _require_dnc(cfg.task, cfg.model.head, checkpoint)
    if examples < 0:
        raise ValueError(f"--examples must be >= 0, got {examples}")
    info = setup_distributed(cfg.train.device)
    if info.world > 1:
        raise ValueError("dnc explain runs in one process; start it without torchrun")
    ckpt = load_checkpoint(checkpoint)
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    _require_dnc(saved.get("task", cfg.task), saved.get("model", {}).get("head", cfg.model.head), checkpoint)
    model = load_trained_model(cfg, ckpt, checkpoint).to(info.device).eval()
    out = Path(out_dir)
    (out / "galleries").mkdir(parents=True, exist_ok=True)
    (out / "decisions").mkdir(parents=True, exist_ok=True)

    d = cfg.data
    train = build_cls_split(cfg, "train", build_cls_transform(d.preset, False, d.img_size))
    classes = list(train.classes)
    batch = d.eval_batch_size or d.batch_size
    matches = search_training_set(model, train, top_m, batch, d.num_workers, info.device,
                                  lambda: autocast(cfg, info.device), progress)
    anchored = anchor_model(model, matches).to(info.device).eval()
    before_p = _head(model).centroids.centroids.detach()
    after_p = _head(anchored).centroids.centroids.detach()
    stats = subcentroid_statistics(before_p, matches, after_p)

    val = build_datasets(cfg, ("val",))[0]["val"]
    loader = build_eval_loader(cfg, val, info)
    before = evaluate(cfg, model, loader, info, predictions=True)
    after = evaluate(cfg, anchored, loader, info, predictions=True)
    c, k = matches.wins.shape
    ok_b, n_eval = _per_class(before["predictions"], c)
    ok_a, _ = _per_class(after["predictions"], c)
    agree = sum(a["pred"] == b["pred"] for a, b in zip(after["predictions"], before["predictions"]))

    raw_train = build_cls_split(cfg, "train", None)
    index, sims = matches.index.cpu(), matches.sims.cpu()
    names = [[_sample_name(raw_train, int(i)) if i >= 0 else None for i in row] for row in index[..., 0].tolist()]
    result = {
        "config_name": config_name or "-", "checkpoint": str(checkpoint), "classes": classes,
        "num_subcentroids": k, "top_m": top_m, "num_train": int(matches.class_counts.sum()), "num_eval": len(val),
        "accuracy": {"before": {"top1": before["top1"], "top5": before["top5"]},
                     "after": {"top1": after["top1"], "top5": after["top5"]},
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

    save_checkpoint(out / "anchored.pt", {
        "model": anchored.state_dict(), "config": to_dict(cfg), "classes": classes, "anchored": True,
        "anchor_index": index[..., 0].clone(), "anchor_cosine": stats["anchor_cosine"].clone(), "anchor_names": names,
        "source_checkpoint": str(checkpoint),
        "metrics": {"top1": after["top1"], "top5": after["top5"], "top1_before_anchoring": before["top1"]}})

    galleries = []
    for ci in range(c):
        rows = [[(raw_train[int(i)][0], float(s)) for i, s in zip(index[ci, kk], sims[ci, kk]) if i >= 0]
                for kk in range(k)]
        img = render_gallery(classes[ci], rows, stats["wins"][ci].tolist(), stats["anchor_cosine"][ci].tolist(), tile)
        galleries.append(f"galleries/class_{ci:03d}.png")
        img.save(out / galleries[-1])

    shown = _explain_examples(cfg, anchored, after["predictions"], val, raw_train, index[..., 0], classes, examples,
                              out, info.device, tile + 16)
    result["examples"] = shown
    (out / "explain.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(out, result, galleries, shown)
    return result


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


# ============================================================================ dnc predict


def _load_image(path: str) -> Image.Image:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image not found")
    return read_rgb(path)


def _predict_transform(cfg):
    """The evaluation transform of the config; digits models (8x8, no ``img_size``) get 8x8 inputs."""
    from torchvision.transforms import v2
    from .data.transforms import build_cls_transform
    tf = build_cls_transform(cfg.data.preset, False, cfg.data.img_size)
    if cfg.data.preset == "digits" and cfg.data.img_size is None:
        return v2.Compose([v2.ToImage(), v2.Resize((8, 8), antialias=True), tf])
    return tf


def _out_name(out: Optional[Path], image: str, taken: set, suffix: str = "explain") -> Path:
    """``<stem>_<suffix>.png`` in ``out``, or beside ``image`` when ``out`` is None; never twice the same."""
    folder, stem = (Path(out) if out is not None else Path(image).parent), Path(image).stem
    name, n = f"{stem}_{suffix}.png", 1
    while str(folder / name) in taken:
        n += 1
        name = f"{stem}_{n}_{suffix}.png"
    taken.add(str(folder / name))
    return folder / name


def run_predict(checkpoint, images: Sequence[str], explain: bool = False, out_dir=None, topk: int = 5,
                device: str = "auto", tile: int = 96) -> list:
    """``dnc predict``: top classes of each image (printed), and with ``explain`` a PNG per image with
    the training images behind the decision (needs an anchored checkpoint from ``dnc explain``).

    Output files go into ``out_dir``, or beside each image when it is None.
    Segmentation checkpoints: the pixel share of the top classes, a colour mask ``<stem>_mask.png`` (a
    palette PNG whose pixel values are the class indices), and with ``explain`` a PNG per image with the
    class map and the map of the sub-centroid that won each pixel (:func:`pixel_decisions`,
    one whole-image forward at the config's evaluation scale). Returns one dict per image.
    """

    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{checkpoint}: has no 'config'; write it with dnc train or dnc explain")
    cfg = from_dict(Config, ckpt["config"])
    classes = list(ckpt.get("classes") or [str(i) for i in range(cfg.data.num_classes)])
    dev = setup_distributed(device).device
    model = load_trained_model(cfg, ckpt, checkpoint).to(dev).eval()
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    pics = [_load_image(p) for p in images]
    if cfg.task == "segmentation":
        return _predict_segmentation(cfg, model, images, pics, classes, out, dev, explain, topk)
    if explain:
        if cfg.model.head != "dnc":
            raise ValueError(f"{checkpoint}: --explain needs a DNC model; this checkpoint has a {cfg.model.head} head")
        if not ckpt.get("anchored"):
            raise ValueError(f"{checkpoint}: --explain needs an anchored checkpoint: run dnc explain CONFIG "
                             f"{checkpoint} --out DIR and pass DIR/anchored.pt")
        anchor_index = ckpt["anchor_index"]
        raw_train = build_cls_split(cfg, "train", None)
        used = anchor_index[anchor_index >= 0]
        if len(used) and int(used.max()) >= len(raw_train):
            raise ValueError(f"{checkpoint}: anchors index {int(used.max())} but the training set has "
                             f"{len(raw_train)} images: it changed since dnc explain")
    tf = _predict_transform(cfg)
    results, taken = [], set()
    for path, pic in zip(images, pics):
        x = tf(pic)[None].to(dev)
        with torch.no_grad():
            if cfg.model.head == "dnc":
                dec = explain_decisions(model, x, topk=max(topk, 2))
                top_c, top_p = dec.classes[0, :topk], dec.probs[0, :topk]
            else:
                top_p, top_c = model(x).float().softmax(1)[0].topk(min(topk, len(classes)))
        rec = {"image": str(path), "top": [{"class": classes[int(ci)], "index": int(ci), "prob": round(float(p), 6)}
                                          for ci, p in zip(top_c, top_p)]}
        line = f"{path}: " + "  ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in rec["top"])
        if ckpt.get("ood"):  # a checkpoint of dnc calibrate: below the threshold, no known class
            rec["ood"] = apply_threshold(image_scores(model, x)[1], ckpt)[0]
            line = f"{path}: {verdict_text(rec['ood'])}; " + line[len(f"{path}: "):]
        if explain:
            panel = []
            for t in range(min(2, dec.classes.shape[1])):
                ci, kk = int(dec.classes[0, t]), int(dec.subcentroid[0, t])
                i = int(anchor_index[ci, kk])
                if i >= 0 and int(raw_train.targets[i]) != ci:
                    raise ValueError(f"{checkpoint}: training image {i} is not of class {classes[ci]}: the training "
                                     "set changed since dnc explain")
                panel.append({"class": classes[ci], "subcentroid": kk, "similarity": round(float(dec.similarity[0, t]), 6),
                              "anchor_index": i, "anchor_name": _sample_name(raw_train, i) if i >= 0 else None,
                              "image": raw_train[i][0] if i >= 0 else None})
            cells = [(f"{p['class']} (k={p['subcentroid']})", p["image"], p["similarity"]) for p in panel]
            img = render_decision(pic, Path(path).name, cells[0], cells[1] if len(cells) > 1 else None, None, tile)
            file = _out_name(out, path, taken)
            img.save(file)
            rec["decided_by"] = [{k: v for k, v in p.items() if k != "image"} for p in panel]
            rec["explanation"] = str(file)
            p0 = panel[0]
            line += (f"\n  decided by sub-centroid {p0['subcentroid']} of {p0['class']} (training image "
                     f"{p0['anchor_name']}, cos {p0['similarity']:.3f})")
            if len(panel) > 1:
                p1 = panel[1]
                line += (f" over sub-centroid {p1['subcentroid']} of {p1['class']} (training image {p1['anchor_name']}, "
                         f"cos {p1['similarity']:.3f}) -> {file}")
        print(line, flush=True)
        results.append(rec)
    return results


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
    head = _head(net)
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


def _palette(n: int) -> torch.Tensor:
    """``(n, 3)`` uint8 distinct colours (the PASCAL VOC bit-interleaving colour map, without black)."""
    i = torch.arange(1, n + 1)
    rgb = torch.zeros(n, 3, dtype=torch.long)
    for bit in range(8):
        for ch in range(3):
            rgb[:, ch] |= ((i >> (3 * bit + ch)) & 1) << (7 - bit)
    return rgb.to(torch.uint8)


def render_segmentation(image: Image.Image, classes: torch.Tensor, subcentroid: torch.Tensor, names: Sequence[str],
                        k: int, width: int = 384) -> Image.Image:
    """Image | class map | sub-centroid map (class colour, darker for lower k), with a legend of
    the classes present (pixel share, most used sub-centroids)."""
    pal = _palette(len(names))
    cls, sub = classes.cpu(), subcentroid.cpu()
    class_rgb = pal[cls]
    shade = 0.35 + 0.65 * (sub.float() + 1) / k
    sub_rgb = (pal[cls].float() * shade[..., None]).round().to(torch.uint8)
    base = image.convert("RGB")
    panels = [base, Image.blend(base, _to_pil(class_rgb.permute(2, 0, 1)), 0.6), _to_pil(sub_rgb.permute(2, 0, 1))]
    panels = [ImageOps.contain(p, (width, width * 4), Image.LANCZOS if j == 0 else Image.NEAREST)
              for j, p in enumerate(panels)]
    font, line, pad = _font(12), 16, 6
    counts = torch.bincount(cls.flatten(), minlength=len(names))
    present = counts.argsort(descending=True)[: int((counts > 0).sum())].tolist()
    legend = []
    for ci in present:
        ks = torch.bincount(sub[cls == ci], minlength=k)
        top = ", ".join(f"k={j} {100 * ks[j] / ks.sum():.1f}%" for j in ks.argsort(descending=True)[:3].tolist() if ks[j])
        legend.append((ci, f"{names[ci]}: {100 * counts[ci] / cls.numel():.1f}% of pixels; sub-centroids {top}"))
    ph = panels[0].height
    canvas = Image.new("RGB", (3 * width + 4 * pad, line + ph + 3 * pad + line * (len(legend) + 1)), _BG)
    draw = ImageDraw.Draw(canvas)
    for j, (p, title) in enumerate(zip(panels, ("image", "predicted classes", "winning sub-centroid (darker: lower k)"))):
        x = pad + j * (width + pad)
        draw.text((x, pad), title, fill=_INK, font=font)
        canvas.paste(p, (x, line + pad))
    y = line + ph + 2 * pad
    for ci, text in legend:
        draw.rectangle((pad, y + 2, pad + 12, y + 13), fill=tuple(pal[ci].tolist()), outline=_MUTED)
        draw.text((pad + 18, y), text, fill=_INK, font=font)
        y += line
    return canvas


def _predict_segmentation(cfg, model, paths, pics, classes, out: Path, device, explain: bool, topk: int) -> list:
    """``dnc predict`` for a segmenter: pixel shares of the top classes, and with ``explain`` a PNG
    with the class map and the map of the sub-centroid that won each pixel."""
    from .data.seg_transforms import build_seg_transforms
    d = cfg.data
    if explain and cfg.model.head != "dnc":
        raise ValueError(f"--explain needs a DNC segmenter; this checkpoint has a {cfg.model.head} head")
    tf = build_seg_transforms(False, scale=tuple(d.scale) if d.scale else None)
    palette = _palette(len(classes)).flatten().tolist()
    results, taken = [], set()
    for path, pic in zip(paths, pics):
        x, _ = tf(pic, torch.zeros(pic.height, pic.width, dtype=torch.uint8))
        x = x[None].to(device)
        size = (pic.height, pic.width)
        if cfg.model.head == "dnc":
            dec = pixel_decisions(model, x, size)
            pred = dec["classes"][0]
        else:
            with torch.no_grad():
                pred = F.interpolate(model(x).float(), size=size, mode="bilinear", align_corners=False).argmax(1)[0]
        share = torch.bincount(pred.flatten().cpu(), minlength=len(classes)).float() / pred.numel()
        top = share.argsort(descending=True)[:topk]
        rec = {"image": str(path), "top": [{"class": classes[int(ci)], "index": int(ci),
                                            "pixels": round(float(share[ci]), 6)} for ci in top if share[ci] > 0]}
        line = f"{path}: " + "  ".join(f"{t['class']} {100 * t['pixels']:.1f}%" for t in rec["top"])
        mask = Image.fromarray(pred.cpu().to(torch.uint8).numpy())  # "L"; the palette makes it "P"
        mask.putpalette(palette)
        rec["mask"] = str(_out_name(out, path, taken, "mask"))
        mask.save(rec["mask"])
        line += f"\n  colour mask -> {rec['mask']}"
        rec["score_map"] = str(_out_name(out, path, taken, "score"))
        save_score_map(pixel_scores(model, x, size)[0], rec["score_map"])
        line += f"\n  per-pixel score map (known-class evidence, white = high) -> {rec['score_map']}"
        if explain:
            file = _out_name(out, path, taken)
            render_segmentation(pic, pred, dec["subcentroid"][0], classes, cfg.model.dnc.num_subcentroids).save(file)
            rec["explanation"] = str(file)
            line += f"\n  class and sub-centroid maps -> {file}"
        print(line, flush=True)
        results.append(rec)
    return results


# ============================================================================ command line


def _cmd_explain(args) -> dict:
    from .config import load_config
    cfg = load_config(args.config, tuple(args.overrides))
    result = run_explain(cfg, args.checkpoint, args.out_dir, args.top_m, args.examples, progress=True,
                         config_name=str(args.config))
    acc = result["accuracy"]
    print(f"top-1 original {acc['before']['top1']:.2f}%, anchored {acc['after']['top1']:.2f}% "
          f"({acc['after']['top1'] - acc['before']['top1']:+.2f}); unused sub-centroids {result['unused']}; "
          f"report {Path(args.out_dir) / 'index.html'}", flush=True)
    return result


def _cmd_predict(args) -> list:
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    return run_predict(args.checkpoint, args.images, args.explain, args.out_dir, args.topk, args.device)


def add_commands(subparsers) -> None:
    """Register ``dnc explain`` and ``dnc predict`` on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("explain", help="anchor sub-centroids to training images; galleries and an HTML report")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                   help="output folder: anchored.pt, explain.json, index.html, galleries/, decisions/")
    p.add_argument("--top-m", type=int, default=5, metavar="M",
                   help="nearest training images kept per sub-centroid (default 5)")
    p.add_argument("--examples", type=int, default=24, metavar="N",
                   help="correct and wrong evaluation predictions shown in the report, each (default 24)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_explain)

    p = subparsers.add_parser("predict", help="classify images with a checkpoint (and show the deciding exemplars)")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--explain", action="store_true",
                   help="write a PNG per image with the deciding training images (needs DIR/anchored.pt of dnc explain)")
    p.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="folder of the PNGs (default: beside each input image)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes printed per image (default 5)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=_cmd_predict)
