"""``dnc`` command line: one module per command (``dnc.cli.<command>``), each with ``add_parser`` and ``run``.

    dnc train CONFIG [--work-dir DIR] [--resume [CKPT]] [--force] [key=value ...]
    torchrun --nproc_per_node 8 -m dnc train CONFIG ...
    dnc test [CONFIG] CHECKPOINT [--split NAME] [--out result.json|result.pkl] [--metrics accuracy|mIoU] [key=value ...]
    dnc explain [CONFIG] CHECKPOINT --out DIR [key=value ...]
    dnc predict CHECKPOINT IMAGE|FOLDER|GLOB... [--out preds.json|preds.csv] [--explain]
    dnc calibrate [CONFIG] CHECKPOINT --out CKPT2 [--tpr 0.95] [--score KIND]
    dnc extend [CONFIG] CHECKPOINT --add NAME=DIR ... [--remove NAME ...] --out CKPT2
    dnc export CHECKPOINT --format onnx|torchscript|pt2|safetensors --out FILE
    dnc config CONFIG [key=value ...]
    dnc demo

A command parses its arguments, calls the library and prints; the library reports progress and warnings
through the ``dnc`` logger, which :func:`main` prints (warnings on stderr as ``dnc: warning: ...``).
Errors are reported as one line naming the file, key or sample at fault (``DNC_DEBUG=1`` shows the
traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .. import __version__
from . import calibrate, config, demo, explain, export, extend, predict, test, train
from .demo import DEMO_TIME
from .train import EXIT_STOPPED

__all__ = ["main", "build_parser", "EXIT_STOPPED", "DEMO_TIME"]

COMMANDS = (train, test, config, demo, explain, predict, calibrate, extend, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnc", description="Deep Nearest Centroids: train, test, explain and predict.")
    parser.add_argument("--version", action="version", version=f"dnc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _parse(argv) -> argparse.Namespace:
    """argparse stops collecting the positional ``key=value`` overrides at the first option, and
    ``--resume [CKPT]`` / ``--metrics M...`` swallow a following override: gather them all back."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if not hasattr(args, "overrides"):
        return args
    taken = []
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():
        taken, args.resume = [resume], "auto"
    if getattr(args, "metrics", None):
        taken += [m for m in args.metrics if "=" in m]
        args.metrics = [m for m in args.metrics if "=" not in m] or None
    args.overrides = list(args.overrides) + taken + extra
    return args


class _Terminal(logging.Handler):
    """The ``dnc`` logger on the terminal: messages on stdout, warnings on stderr (``dnc: warning: ...``);
    the streams are looked up at each message (they may be replaced, e.g. by pytest)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            print(f"dnc: warning: {record.getMessage()}", file=sys.stderr, flush=True)
        else:
            print(record.getMessage(), flush=True)


def _show_messages() -> None:
    logger = logging.getLogger("dnc")
    if not any(isinstance(h, _Terminal) for h in logger.handlers):
        logger.addHandler(_Terminal())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _error_line(e: BaseException) -> str:
    """The one line of ``dnc: error: ...``."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.strerror and e.filename is None:  # our own "FILE: what" messages
        msg = e.strerror                                             # without "[Errno N]"
    if msg.startswith("Caught ") and "Original Traceback" in str(e):  # re-raised from a DataLoader worker:
        msg = str(e).strip().splitlines()[-1].split(": ", 1)[-1]     # its own message is the last line
    return msg


def main(argv=None) -> int:
    args = _parse(argv)
    _show_messages()
    try:
        result = args.func(args)
        if isinstance(result, dict) and result.get("stopped") and result.get("reason") != "stop_after":
            return EXIT_STOPPED
    except KeyboardInterrupt:
        print("dnc: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get("DNC_DEBUG"):
            raise
        print(f"dnc: error: {_error_line(e)}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
