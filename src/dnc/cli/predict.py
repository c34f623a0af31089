"""``dnc predict CHECKPOINT IMAGE|FOLDER|GLOB... [--out FILE] [--explain]``."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify or segment images, folders and globs with a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint of dnc train, or DIR/anchored.pt of dnc explain (for --explain)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively) or quoted glob patterns such as 'shots/**/*.jpg'")
    p.add_argument("--out", metavar="FILE", help="write one record per image: FILE.json (a list) or FILE.csv")
    p.add_argument("--explain", action="store_true",
                   help="a picture per image with the deciding training images (classification; needs DIR/anchored.pt "
                        "of dnc explain) or the map of winning sub-centroids (segmentation)")
    p.add_argument("--pictures", metavar="DIR", default=None,
                   help="folder of the pictures, named <image stem>_<predicted class>.png (default: predictions)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="top classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=0, metavar="B",
                   help="images per forward pass (default: the config's evaluation batch size)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images, each named in a warning (default: the first one stops predict)")
    p.set_defaults(func=run)


def run(args) -> list:
    from ..predict import run_predict
    return run_predict(args.checkpoint, args.images, args.explain, args.pictures, args.topk, args.device,
                       args.batch_size, args.out, report=lambda line: print(line, flush=True),
                       skip_bad=args.skip_bad)
