"""``dnc calibrate CONFIG CHECKPOINT --out CKPT2``: an open-set threshold stored in a checkpoint."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="store an open-set threshold in a checkpoint (predict says 'unknown' below it)")
    p.add_argument("config", help="YAML config of the model (a file, or a path inside the shipped configs)")
    p.add_argument("checkpoint", help="checkpoint to calibrate (dnc train or dnc explain)")
    p.add_argument("--out", required=True, metavar="CKPT2", help="the calibrated checkpoint to write")
    p.add_argument("--force", action="store_true", help="replace CKPT2 if it exists (never the checkpoint)")
    p.add_argument("--tpr", type=float, default=0.95, help="fraction of validation images kept (default 0.95)")
    p.add_argument("--score", default=None, help="cosine (DNC, default), msp or energy (linear default: msp)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..config import load_config
    from ..ood import calibrate
    cfg = load_config(args.config, tuple(args.overrides))
    ood = calibrate(cfg, args.checkpoint, args.out, args.tpr, args.score, args.device, args.force)
    print(f"{ood['score']} threshold {ood['threshold']:.6f} keeps {100 * ood['kept']:.2f}% of "
          f"{ood['val_images']} validation images -> {args.out}", flush=True)
    return ood
