"""Pictures and the HTML report of ``dnc explain`` and ``dnc predict`` (Pillow only).

* :func:`render_gallery`: one class's sub-centroids, each beside its nearest training images;
* :func:`render_decision`: a test image beside the training images that decided it;
* :func:`render_segmentation`: an image, its class map and the map of the winning sub-centroids;
* :func:`palette`: the usual colours of a segmentation dataset (CamVid, Cityscapes, ADE20K), or
  distinct generated ones;
* :func:`write_report`: one self-contained HTML page, images beside it, relative links, no script.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .files import write_atomic

__all__ = ["render_gallery", "render_decision", "render_segmentation", "palette", "write_report"]

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
        wins: training samples won by each sub-centroid (0 is flagged "unused": it wins no training
            image, though it may still be the nearest sub-centroid of a test image).
        anchor_cosine: cosine of each sub-centroid to its nearest sample (NaN if none).
    """
    rows = []
    for k, (row, w, cos) in enumerate(zip(exemplars, wins, anchor_cosine)):
        lines = [f"k={k}", f"wins {int(w)}"] + (["unused in training"] if w == 0 else [])
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
                 "image (marked <i>unused</i>): no training image of their class is nearer to them than to the "
                 "class's other sub-centroids. They still take part in every decision, so an unused sub-centroid "
                 "may be the nearest one for a test image and appear below as the one that decided it.</p>")

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
                     f"<td class=\"l\">{'unused (wins no training image)' if s['unused'] else 'used'}</td></tr>")
    parts.append("</table></body></html>\n")
    path = Path(out_dir) / "index.html"
    write_atomic(path, "\n".join(parts).encode("utf-8"))
    return path


def render_segmentation(image: Image.Image, classes: torch.Tensor, subcentroid: torch.Tensor, names: Sequence[str],
                        k: int, width: int = 384, dataset: Optional[str] = None) -> Image.Image:
    """Image | class map | sub-centroid map (class colour, darker for lower k), with a legend of
    the classes present (pixel share, most used sub-centroids); colours of :func:`palette`."""
    pal = palette(len(names), dataset)
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


# ============================================================================ segmentation colours
# The colour maps these datasets are usually shown with: SegNet's for CamVid, the official one for
# Cityscapes' train ids, MMSegmentation's for ADE20K (150 classes), as RRGGBB hex.
_CAMVID = "808080 800000 c0c080 804080 3c28de 808000 c08080 404080 400080 404000 0080c0"
_CITYSCAPES = ("804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 "
               "00008e 000046 003c64 005064 0000e6 770b20")
_ADE20K = (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 "
    "96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff "
    "ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff "
    "e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff "
    "8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff "
    "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 "
    "0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 "
    "ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff "
    "00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff "
    "ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 "
    "ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 00ccff 1400ff "
    "ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff "
    "b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff "
)
_DATASET_PALETTES = {"camvid": _CAMVID, "cityscapes": _CITYSCAPES, "ade20k": "".join(_ADE20K)}


def _generated_palette(n: int) -> torch.Tensor:
    """``(n, 3)`` uint8 distinct colours (the PASCAL VOC bit-interleaving colour map, without black)."""
    i = torch.arange(1, n + 1)
    rgb = torch.zeros(n, 3, dtype=torch.long)
    for bit in range(8):
        for ch in range(3):
            rgb[:, ch] |= ((i >> (3 * bit + ch)) & 1) << (7 - bit)
    return rgb.to(torch.uint8)


def palette(n: int, dataset: Optional[str] = None) -> torch.Tensor:
    """``(n, 3)`` uint8 class colours: the dataset's usual colour map when ``dataset`` is ``camvid``,
    ``cityscapes`` or ``ade20k`` and has ``n`` classes, distinct generated colours otherwise."""
    hexes = _DATASET_PALETTES.get((dataset or "").lower(), "").split()
    if len(hexes) != n:
        return _generated_palette(n)
    return torch.tensor([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in hexes], dtype=torch.uint8)
