"""Typed experiment configuration: YAML files with ``_base_`` inheritance and ``key=value`` overrides.

A config file is a YAML mapping whose keys mirror the dataclasses below. ``_base_`` names one file or
a list of files (relative to the including file) that are merged first, later ones winning; mappings
merge key by key, everything else is replaced. Unknown keys, wrong types and invalid choices are
reported as one line naming the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = ["ConfigError", "Config", "load_config", "to_dict", "from_dict", "PACKAGE_CONFIGS", "parse_yaml", "resume_config",
           "RESUME_FREE"]

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


def _choice(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass
class DNCConfig:
    """The sub-centroid head (see docs/ALGORITHM.md)."""
    num_subcentroids: int = 4
    feat_norm: bool = True
    calibration: str = _choice("temperature", "layernorm")
    temperature: float = 0.1
    momentum: float = 0.999
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    correct_only: bool = True
    memory_size: int = 0
    update_interval: int = 1
    max_per_class: int = 0
    init: str = _choice("random", "kmeans++")
    init_samples: int = 10000
    contrast_weight: float = 0.0
    compact_weight: float = 0.0


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    backbone_kwargs: dict = field(default_factory=dict)
    # where the weights come from (see dnc.models.pretrained): "timm" (or true: timm's pretrained tag of
    # model.backbone, e.g. resnet50.a1_in1k), "hf-hub:ORG/NAME", a Hugging Face snapshot folder, a local
    # weights file, a dnc checkpoint, or "imagenet" (pip-installed weights: tf_efficientnet_lite0/1/2)
    pretrained: Optional[str] = field(default=None, metadata={"bools": {True: "timm", False: None}})
    head: str = _choice("dnc", "linear")
    dnc: DNCConfig = field(default_factory=DNCConfig)
    # segmentation only
    decoder: str = _choice("fcn", "deeplabv3", "upernet")
    decoder_channels: int = 512
    output_stride: int = 8
    aux_weight: float = 0.0


@dataclass
class DataConfig:
    dataset: str = _choice("digits", "cifar10", "cifar100", "imagefolder", "ade20k", "cityscapes", "camvid", "folder")
    root: Optional[str] = None
    num_classes: Optional[int] = None  # None: the dataset's (the class folders of an image folder)
    holdout: int = 0
    train_subset: int = 0  # > 0: a fixed, class-balanced random subset of this many training samples
    dataset_kwargs: dict = field(default_factory=dict)
    batch_size: int = 32
    eval_batch_size: int = 0
    num_workers: int = 2
    on_bad_sample: str = _choice("error", "skip")
    check_labels: bool = True
    # classification transforms
    preset: str = _choice("none", "digits", "cifar", "imagenet", "swin")
    img_size: Optional[int] = None
    # None: the pretrained weights' (their timm pretrained_cfg, written into the run's saved config by
    # dnc train), else the preset's. Normalisation on the 0-1 scale; interpolation of the resizes
    # (bilinear, bicubic, ...); crop_pct: the evaluation centre crop of the imagenet/swin presets,
    # resizing the short side to img_size / crop_pct first
    mean: Optional[list] = None
    std: Optional[list] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
    # segmentation transforms and evaluation
    crop_size: list = field(default_factory=lambda: [512, 512])
    scale: Optional[list] = field(default_factory=lambda: [2048, 512])
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    eval_mode: str = _choice("whole", "slide")
    eval_crop: Optional[list] = None
    eval_stride: Optional[list] = None
    eval_scales: list = field(default_factory=lambda: [1.0])
    eval_flip: bool = False


@dataclass
class OptimConfig:
    name: str = _choice("sgd", "adamw")
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_decay_norm_bias: bool = False
    no_decay_keys: list = field(default_factory=list)
    grad_clip: Optional[float] = None


@dataclass
class SchedConfig:
    name: str = _choice("constant", "step", "exp", "cosine", "poly")
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    power: float = 0.9
    min_lr_ratio: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3


@dataclass
class TrainConfig:
    epochs: int = 0
    iters: int = 0
    amp: str = _choice("none", "bf16", "fp16")
    channels_last: bool = False
    device: str = _choice("auto", "cpu", "cuda")
    seed: int = 0
    deterministic: bool = False
    eval_interval: int = 1
    log_interval: int = 20
    stop_after: int = 0
    threads: int = 0  # > 0: torch threads on the CPU (torch.set_num_threads)
    tensorboard: bool = False  # also write the log's numbers as TensorBoard scalars (WORK_DIR/tensorboard)


@dataclass
class Config:
    task: str = _choice("classification", "segmentation")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        t = self.train
        if (t.epochs > 0) == (t.iters > 0):
            raise ConfigError(f"set exactly one of train.epochs and train.iters (got {t.epochs} and {t.iters})")
        if self.data.num_classes is not None and self.data.num_classes < 1:
            raise ConfigError(f"data.num_classes must be >= 1, got {self.data.num_classes}")
        if self.data.crop_pct is not None and not 0 < self.data.crop_pct <= 1:
            raise ConfigError(f"data.crop_pct must be in (0, 1], got {self.data.crop_pct}")
        for key, value in (("data.batch_size", self.data.batch_size),
                           ("model.dnc.num_subcentroids", self.model.dnc.num_subcentroids),
                           ("model.dnc.update_interval", self.model.dnc.update_interval)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in (("train.log_interval", t.log_interval), ("train.eval_interval", t.eval_interval)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        dnc, o = self.model.dnc, self.optim
        if not 0 <= dnc.momentum < 1:
            raise ConfigError(f"model.dnc.momentum must be in [0, 1), got {dnc.momentum}")
        if not 0 <= o.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
        if dnc.calibration == "temperature" and not dnc.temperature > 0:
            raise ConfigError(f"model.dnc.temperature must be > 0, got {dnc.temperature}")
        if not dnc.sinkhorn_eps > 0:  # 0 or below collapses the balanced assignment onto one sub-centroid
            raise ConfigError(f"model.dnc.sinkhorn_eps must be > 0, got {dnc.sinkhorn_eps}")
        for key, value in (("model.dnc.sinkhorn_iters", dnc.sinkhorn_iters), ("optim.lr", o.lr),
                           ("optim.weight_decay", o.weight_decay)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        return self


class _Loader(yaml.SafeLoader):
    """YAML with the YAML 1.2 float syntax: ``1e-3`` and ``5E+4`` are floats (YAML 1.1 reads them as strings)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """``yaml.safe_load`` with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular _base_ inheritance")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read(path.parent / base, seen + (path.resolve(),)))
    return _merge(merged, data)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = {int: int, float: float, bool: bool, str: str, list: list, dict: dict}[tp]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"key '{key}' expects {expected.__name__}, got {value!r}")
    numbers = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ConfigError(f"key '{key}' must be a finite number, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, checking keys, types and choices."""
    if not isinstance(data, dict):
        raise ConfigError(f"key '{prefix.rstrip('.')}' expects a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        if key not in fields:
            raise ConfigError(f"unknown key '{name}'; valid keys: {', '.join(fields)}")
        tp = hints[key]
        bools = fields[key].metadata.get("bools")
        if bools and isinstance(value, bool):  # e.g. model.pretrained: true
            value = bools[value]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, name + ".")
            continue
        value = _coerce(value, tp, name)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"key '{name}' got {value!r}; valid choices: {', '.join(map(str, choices))}")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _override(data: dict, item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    out = node
    parts = key.split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return _merge(data, out)


def resolve_config_path(path: str) -> Path:
    """A config path as given, or else relative to the configs shipped in the package."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (PACKAGE_CONFIGS / path, PACKAGE_CONFIGS / Path(path).relative_to("configs")
                      if Path(path).parts[:1] == ("configs",) else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return p


def load_config(path: str, overrides: tuple = (), validate: bool = True) -> Config:
    """Load a YAML config (with ``_base_`` files) and apply ``key=value`` overrides (keys, types and
    choices are always checked; the relations between values only with ``validate``)."""
    data = _read(resolve_config_path(path))
    for item in overrides:
        data = _override(data, item)
    cfg = from_dict(Config, data)
    return cfg.validate() if validate else cfg


# What ``--resume`` lets an override change: where the data is and how the run is watched, never what
# is trained (the model, data, schedule, seed: the checkpoint continues the run as it was started).
RESUME_FREE = ("data.root", "data.num_workers", "data.eval_batch_size", "train.device", "train.log_interval",
               "train.eval_interval", "train.stop_after", "train.tensorboard", "train.threads")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_config(saved: dict, overrides: tuple, source: str) -> tuple:
    """The config of a resumed run: the one ``saved`` in the checkpoint ``source``, with the overrides
    that may change on resuming (:data:`RESUME_FREE`). Returns ``(config, notes)``: ``optim.*``
    overrides are ignored, with a note (the run keeps its optimiser settings and state); any other
    override that changes the run is a :class:`ConfigError` naming it. ``train.stop_after`` is not
    carried over (it is 0 unless given again)."""
    try:
        data = to_dict(from_dict(Config, saved).validate())
    except ConfigError as e:
        raise ConfigError(f"{source}: the config saved in the checkpoint: {e}") from None
    data["train"]["stop_after"] = 0  # a stop applies to the invocation that asked for it
    new = data
    for item in overrides:
        new = _override(new, item)
    before, after = _flat(data), _flat(to_dict(from_dict(Config, new).validate()))
    notes = []
    for k in sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)):
        item = next(i for i in reversed(overrides) if k == i.split("=", 1)[0] or k.startswith(i.split("=", 1)[0] + ".")
                    or i.split("=", 1)[0].startswith(k + "."))
        if k.startswith("optim."):
            notes.append(f"{item} is ignored when resuming: the run continues with the optimiser settings of {source}")
        elif k not in RESUME_FREE:
            raise ConfigError(f"{item}: --resume continues the run of {source}, where {k}={before.get(k)!r}; "
                              f"only {', '.join(RESUME_FREE)} may change (start a new --work-dir to change it)")
    for item in overrides:
        if item.split("=", 1)[0] in RESUME_FREE:
            data = _override(data, item)
    return from_dict(Config, data).validate(), notes

