"""``dnc calibrate [CONFIG] CHECKPOINT --out CKPT2``: an open-set threshold stored in a checkpoint."""
from __future__ import annotations

from .inputs import add_checkpoint_inputs, checkpoint_config


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="store an open-set threshold in a checkpoint (predict says 'unknown' below it)")
    add_checkpoint_inputs(p, "checkpoint to calibrate (dnc train or dnc explain)")
    p.add_argument("--out", required=True, metavar="CKPT2", help="the calibrated checkpoint to write")
    p.add_argument("--force", action="store_true", help="replace CKPT2 if it exists (never the checkpoint)")
    p.add_argument("--tpr", type=float, default=0.95, help="fraction of validation images kept (default 0.95)")
    p.add_argument("--score", default=None, help="DNC: cosine (default), subenergy, msp, maxlogit or energy; linear: "
                   "energy (default), msp or maxlogit")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..ood import calibrate
    cfg, checkpoint, _ = checkpoint_config(args, "calibrate")
    ood = calibrate(cfg, checkpoint, args.out, args.tpr, args.score, args.device, args.force)
    print(f"{ood['score']} threshold {ood['threshold']:.6f} keeps {100 * ood['kept']:.2f}% of "
          f"{ood['val_images']} validation images -> {args.out}", flush=True)
    return ood
