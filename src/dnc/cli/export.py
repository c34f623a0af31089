"""``dnc export CHECKPOINT --format FORMAT --out FILE``: a checked ONNX, TorchScript, .pt2 or safetensors file."""
from __future__ import annotations

from ..export import FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript, torch.export or safetensors")
    p.add_argument("checkpoint", help="checkpoint to export (dnc train, dnc explain, dnc extend or dnc calibrate)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists (never the checkpoint)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest allowed difference from PyTorch (default 1e-3)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size traced and checked (default: the config's evaluation size)")
    p.add_argument("--with-preprocessing", nargs="?", const="nhwc", choices=("nhwc", "nchw"), default=None,
                   metavar="LAYOUT", help="ONNX classifiers: the graph takes uint8 images of any size (LAYOUT nhwc, "
                                          "the default, or nchw) and resizes, crops and normalises them itself")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..export import run_export
    r = run_export(args.checkpoint, args.format, args.out, args.atol, args.size, args.with_preprocessing, args.force)
    shapes = ", ".join("x".join(map(str, s)) for s in r["inputs"])
    print(f"{r['format']} -> {r['out']}; largest difference from PyTorch {r['max_abs_diff']:.3g} on inputs {shapes} "
          f"(tolerance {r['atol']:g}); description -> {r['metadata']}", flush=True)
    if "preprocessing_max_steps" in r:
        print(f"preprocessing inside the graph: within {r['preprocessing_max_steps']:.3g} 8-bit steps of PyTorch's",
              flush=True)
    return r
