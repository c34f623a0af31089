"""The ``[CONFIG] CHECKPOINT [key=value ...]`` positionals of the commands on a checkpoint (test, explain,
calibrate, extend): the config is optional, the checkpoint holds its own."""
from __future__ import annotations


def add_checkpoint_inputs(p, what: str) -> None:
    """Register the ``[CONFIG] CHECKPOINT [key=value ...]`` positionals on parser ``p``."""
    p.add_argument("inputs", nargs="+", metavar="[CONFIG] CHECKPOINT",
                   help=f"{what}, which holds its config; or a config file and the checkpoint. key=value overrides "
                        "may follow")
    p.set_defaults(overrides=[])


def split_inputs(args, command: str) -> tuple:
    """``(config or None, checkpoint, overrides)`` of ``dnc COMMAND [CONFIG] CHECKPOINT [key=value ...]``."""
    from ..config import ConfigError
    files = [x for x in args.inputs if "=" not in x]
    overrides = [x for x in args.inputs if "=" in x] + list(args.overrides)
    if len(files) not in (1, 2):
        raise ConfigError(f"dnc {command} takes [CONFIG] CHECKPOINT, got {len(files)} paths: {' '.join(files)}")
    return (files[0] if len(files) == 2 else None), files[-1], overrides


def checkpoint_config(args, command: str) -> tuple:
    """``(config, checkpoint path, config file or None)``: the config file's (resolved as ``dnc train``
    resolves it), else the one saved in the checkpoint, with the overrides."""
    from ..engine import load_checkpoint
    from ..runconfig import command_config
    config, checkpoint, overrides = split_inputs(args, command)
    ckpt = {} if config else load_checkpoint(checkpoint, mmap=True)
    return command_config(config, ckpt, checkpoint, overrides), checkpoint, config
