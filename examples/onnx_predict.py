"""Classify images with a ``dnc export --format onnx`` file alone: no PyTorch, no ``dnc``.

    pip install onnxruntime numpy pillow
    python examples/onnx_predict.py model.onnx photo.jpg more_photos/ [--out predictions.json|.csv]

Everything comes from the model's metadata (``metadata_props["dnc"]``, written by ``dnc export``): the
class names, the preprocessing (resize, centre crop, interpolation, mean, std), the open-set score and
the threshold of ``dnc calibrate``. The records are those of ``dnc predict --out``: ``path``, ``pred``,
``top`` (class, index, probability) and, for a calibrated model, ``ood`` (``unknown`` when the score is
below the threshold). Images are read as ``dnc`` reads them: EXIF orientation applied, 8-bit RGB.
A model exported with ``--with-preprocessing`` takes the decoded image as it is; otherwise it is resized
and cropped here with PIL (which matches torchvision's antialiased resize to one 8-bit step).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def read_rgb(path) -> Image.Image:
    """8-bit RGB, upright (EXIF orientation applied); 16-bit grayscale scaled to 8 bits (as dnc does)."""
    with Image.open(path) as img:
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode == "F":
            raise ValueError(f"{path}: floating-point pixels (mode F) are not supported")
        if img.mode.startswith("I"):
            scaled = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(scaled, "L").convert("RGB")
        return img.convert("RGB")


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """``(3, h, w)`` float32 network input of an image, as ``pre`` (the metadata's preprocessing) says."""
    if pre["resize"] == "shorter":  # the short side becomes size, the other int(size * long / short)
        w, h = img.size
        short = min(w, h)
        img = img.resize((pre["size"] * w // short, pre["size"] * h // short), RESAMPLE[pre["interpolation"]])
    elif pre["resize"] == "exact":
        img = img.resize((pre["size"][1], pre["size"][0]), RESAMPLE[pre["interpolation"]])
    elif pre["resize"] is not None:
        raise ValueError(f"resize {pre['resize']!r} is not supported here (classifiers only)")
    if pre["crop"] is not None:  # centre crop at torchvision's offsets (Python's round)
        ch, cw = pre["crop"]
        top, left = int(round((img.height - ch) / 2.0)), int(round((img.width - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def find_images(inputs) -> list:
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(str(p) for p in Path(item).rglob("*")
                            if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: image not found")
    return list(dict.fromkeys(found))


class Predictor:
    """An exported classifier and its metadata; :meth:`records` gives ``dnc predict``'s records."""

    def __init__(self, model_path, topk: int = 5):
        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if "dnc" not in props:
            raise ValueError(f"{model_path}: no 'dnc' metadata; export it with a recent dnc export --format onnx")
        self.meta = json.loads(props["dnc"])
        if self.meta["task"] != "classification":
            raise ValueError(f"{model_path}: this example classifies; the model is a {self.meta['task']} model")
        self.classes, self.topk = self.meta["classes"], topk
        self.input = self.meta["input"]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: np.ndarray) -> tuple:
        out = dict(zip(self.outputs, self.session.run(None, {self.input["name"]: batch})))
        return out["logits"], out.get("score")

    def records(self, paths, batch_size: int = 32) -> list:
        pre, in_graph = self.meta["preprocessing"], self.meta["preprocessing"]["in_graph"]
        results = {}
        if in_graph:  # the graph resizes: one image at a time, as decoded
            nhwc = self.input["layout"] == "NHWC"
            for p in paths:
                x = np.asarray(read_rgb(p), dtype=np.uint8)
                results[p] = tuple(o[0] for o in self._run((x if nhwc else x.transpose(2, 0, 1))[None]))
        else:
            groups = {}
            for p in paths:
                x = preprocess(read_rgb(p), pre)
                groups.setdefault(x.shape, []).append((p, x))
            for items in groups.values():
                for i in range(0, len(items), batch_size):
                    chunk = items[i:i + batch_size]
                    logits, score = self._run(np.stack([x for _, x in chunk]))
                    for n, (p, _) in enumerate(chunk):
                        results[p] = (logits[n], None if score is None else score[n])
        return [self._record(p, *results[p]) for p in paths]

    def _record(self, path, logits: np.ndarray, score) -> dict:
        z = logits.astype(np.float32) - logits.max()
        probs = np.exp(z) / np.exp(z).sum()
        top = np.argsort(-probs, kind="stable")[: min(self.topk, len(self.classes))]
        rec = {"path": str(path), "pred": self.classes[top[0]],
               "top": [{"class": self.classes[c], "index": int(c), "score": round(float(probs[c]), 6)} for c in top]}
        s = self.meta["score"]
        if s.get("threshold") is not None and score is not None:
            t = float(s["threshold"])
            rec["ood"] = {"unknown": bool(float(score) < t), "score": round(float(score), 6), "threshold": round(t, 6),
                          "kind": s["name"]}
        return rec


def line(rec: dict) -> str:
    text = "  ".join(f"{t['class']} {100 * t['score']:.1f}%" for t in rec["top"])
    if "ood" in rec:
        o = rec["ood"]
        verdict = "unknown" if o["unknown"] else "known"
        text = f"{verdict} ({o['kind']} {o['score']:.3f} {'<' if o['unknown'] else '>='} {o['threshold']:.3f}); " + text
    return f"{rec['path']}: {text}"


def write_records(path, records) -> None:
    """``.json``: the list of records; ``.csv``: path, class_i and score_i of the top classes (as dnc predict:
    a cell that a spreadsheet would run as a formula gets a leading ``'``)."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(list(records), indent=2) + "\n")
        return
    k = max((len(r["top"]) for r in records), default=0)
    extra = ["unknown"] if any("ood" in r for r in records) else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path"] + [f"{x}_{i}" for i in range(1, k + 1) for x in ("class", "score")] + extra)
    for r in records:
        top = [v for t in r["top"] for v in (t["class"], t["score"])]
        row = [r["path"]] + top + [""] * (2 * k - len(top)) + ([r["ood"]["unknown"]] if extra else [])
        w.writerow([f"'{v}" if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v for v in row])
    path.write_text(buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a dnc export --format onnx file")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    ap.add_argument("--out", metavar="FILE", help="write the records: FILE.json (a list) or FILE.csv")
    ap.add_argument("--topk", type=int, default=5, metavar="K", help="top classes per image (default 5)")
    args = ap.parse_args(argv)
    try:
        if args.out and Path(args.out).suffix not in (".json", ".csv"):
            raise ValueError(f"--out {args.out}: use a .json or .csv file")
        if args.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {args.topk}")
        records = Predictor(args.model, args.topk).records(find_images(args.images))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in records:
        print(line(r))
    if args.out:
        write_records(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
