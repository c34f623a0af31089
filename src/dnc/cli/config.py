"""``dnc config CONFIG [key=value ...]``: the resolved config as YAML."""
from __future__ import annotations

import yaml

from .train import OVERRIDES_HELP


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print a config as dnc uses it: _base_ files merged, overrides applied")
    p.add_argument("config", help="YAML config: a file, or a path inside the shipped configs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=run)


def run(args) -> dict:
    """Print the resolved config (``_base_`` files merged, overrides applied) as YAML."""
    from ..config import load_config, to_dict
    data = to_dict(load_config(args.config, tuple(args.overrides)))
    print(yaml.safe_dump(data, sort_keys=False), end="", flush=True)
    return data
