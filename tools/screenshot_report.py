#!/usr/bin/env python
"""Render a ``dnc explain`` report in headless Chromium: check every image loads, save a screenshot.

    python tools/screenshot_report.py DIR/index.html [--out FILE.png] [--window-size 1280,2000]

The screenshot goes to ``DIR/report.png`` beside the report unless ``--out`` names another file (the
README's ``docs/report.png`` is only replaced when asked for by name).

Two Chromium runs, both offline (``file://``, background networking off):

1. image check: a temporary copy of the page, next to it so that relative links resolve, with a
   small script that, on ``load``, writes ``{"total": N, "broken": [src, ...]}`` into the page
   (an image is broken when it is not ``complete`` or has ``naturalWidth == 0``); ``--dump-dom``
   returns the page with that record, which is read back. The report itself has no script.
2. screenshot of the unmodified page at the window size; when larger than ``--max-kb`` it is reduced
   to a 256-colour palette (lossless for a report of flat colours and grey digits, near enough for
   photos).

Exits 1 (one line on stderr) when an image did not load, the page never finished loading or Chromium
is missing (``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                     .map(function (i) { return i.getAttribute("src"); });
  var out = document.createElement("pre");
  out.id = "dnc-image-check";
  out.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium(name: str | None = None) -> str:
    for candidate in ([name] if name else ["chromium", "chromium-browser", "google-chrome", "chrome"]):
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit("screenshot_report: chromium not found (apt-get install chromium, or pass --chromium)")


def _chromium(binary: str, args: list, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="dnc-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def check_images(binary: str, page: Path, timeout: float = 120) -> dict:
    """``{"total": N, "broken": [...]}`` of the page's ``<img>`` elements once it has loaded."""
    text = page.read_text(encoding="utf-8")
    probe = text.replace("</body>", CHECK_SCRIPT + "</body>") if "</body>" in text else text + CHECK_SCRIPT
    fd, tmp = tempfile.mkstemp(prefix=".imgcheck-", suffix=".html", dir=page.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(probe)
        proc = _chromium(binary, ["--virtual-time-budget=20000", "--dump-dom", Path(tmp).resolve().as_uri()], timeout)
    finally:
        Path(tmp).unlink(missing_ok=True)
    match = re.search(r'<pre id="dnc-image-check">(.*?)</pre>', proc.stdout, re.S)
    if match is None:
        err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"screenshot_report: {page}: the page did not finish loading in Chromium ({err[0]})")
    return json.loads(html.unescape(match.group(1)))


def screenshot(binary: str, page: Path, out: Path, size: str, max_kb: int, timeout: float = 120) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dnc-shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        proc = _chromium(binary, [f"--screenshot={shot}", f"--window-size={size}", "--virtual-time-budget=20000",
                                  page.resolve().as_uri()], timeout)
        if not shot.is_file():
            err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"screenshot_report: Chromium wrote no screenshot ({err[0]})")
        img = Image.open(shot).convert("RGB")
        part = out.with_name(f".{out.name}.part")  # written beside, then renamed: never a half-written PNG
        try:
            img.save(part, format="PNG", optimize=True)
            if part.stat().st_size > max_kb * 1024:
                img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                    part, format="PNG", optimize=True)
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="index.html written by dnc explain")
    ap.add_argument("--out", type=Path, default=None, help="screenshot PNG (default: report.png beside the report)")
    ap.add_argument("--window-size", default="1280,2000", help="W,H in CSS pixels (default 1280,2000)")
    ap.add_argument("--max-kb", type=int, default=500, help="reduce to a palette above this size (default 500)")
    ap.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    ap.add_argument("--no-screenshot", action="store_true", help="only check that every image loads")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"screenshot_report: {args.report}: report not found", file=sys.stderr)
        return 1
    binary = find_chromium(args.chromium)
    result = check_images(binary, args.report)
    if result["broken"] or not result["total"]:
        what = ", ".join(result["broken"][:5]) or "the page has no image"
        print(f"screenshot_report: {len(result['broken'])} of {result['total']} images did not load: {what}",
              file=sys.stderr)
        return 1
    print(f"{args.report}: all {result['total']} images loaded in Chromium")
    if not args.no_screenshot:
        out = screenshot(binary, args.report, args.out or args.report.parent / "report.png", args.window_size,
                         args.max_kb)
        w, h = Image.open(out).size
        print(f"screenshot {out}: {w}x{h}, {out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
