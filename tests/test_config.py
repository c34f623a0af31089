"""The shipped configs: every file loads, and each DNC/linear pair differs only in the head."""
from pathlib import Path

import pytest

from dnc.config import PACKAGE_CONFIGS, ConfigError, load_config, to_dict

CONFIGS = sorted(p for p in PACKAGE_CONFIGS.rglob("*.yaml") if not p.name.startswith("_base_") and "_base_" not in p.parts)
PAIRS = [(p, p.with_name(p.name.replace("_dnc.yaml", "_linear.yaml"))) for p in CONFIGS if p.name.endswith("_dnc.yaml")]


def test_the_grid_is_complete():
    names = {p.relative_to(PACKAGE_CONFIGS).as_posix() for p in CONFIGS}
    for expected in ["resnet/resnet18_8xb16_cifar10_dnc.yaml", "resnet/resnet101_8xb16_cifar100_linear.yaml",
                     "resnet/resnet50_8xb32_in1k_dnc.yaml", "mobilenet_v2/mobilenet-v2_8xb32_in1k_linear.yaml",
                     "swin/swin-base_16xb64_in1k_dnc.yaml",
                     "segmentation/ade20k/upernet_swin-tiny_8x2_512x512_160k_ade20k_dnc.yaml",
                     "segmentation/cityscapes/deeplabv3_r101-d8_4x2_512x1024_80k_cityscapes_linear.yaml",
                     "segmentation/camvid/fcn_r18-d8_1x16_176x176_2k_camvid_dnc.yaml"]:
        assert expected in names
    assert all(linear.is_file() for _, linear in PAIRS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(PACKAGE_CONFIGS).as_posix())
def test_every_config_loads(path):
    cfg = load_config(str(path))
    n = cfg.data.num_classes  # None: the class folders' (an image folder)
    assert cfg.task in ("classification", "segmentation") and (n > 1 if n is not None else cfg.data.dataset == "imagefolder")


@pytest.mark.parametrize("dnc,linear", PAIRS, ids=lambda p: p.name)
def test_dnc_and_linear_share_the_recipe(dnc, linear):
    a, b = to_dict(load_config(str(dnc))), to_dict(load_config(str(linear)))
    assert (a["model"].pop("head"), b["model"].pop("head")) == ("dnc", "linear")
    a["model"].pop("dnc"), b["model"].pop("dnc")  # unused by the linear head
    assert a == b


def test_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 3}\ndata: {batch_size: 8, crop_size: [4, 4]}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ndata: {batch_size: 16}\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ("optim.lr=0.5", "data.crop_size=[2,3]", "model.dnc.momentum=0.9"))
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.data.crop_size) == (3, 16, [2, 3])
    assert (cfg.optim.lr, cfg.model.dnc.momentum) == (0.5, 0.9)
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "loop.yaml"))


def test_package_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo/digits_dnc.yaml").model.head == "dnc"
    assert Path("configs").exists() is False


# ----------------------------------------------------------------------------------- values (issue 11, item 8)
def test_exponent_floats_parse_as_floats_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML's default) reads ``1e-3`` as a string; configs follow YAML 1.2."""
    base = PACKAGE_CONFIGS / "demo" / "digits_dnc.yaml"
    (tmp_path / "c.yaml").write_text(f"_base_: {base}\noptim: {{lr: 1e-3, eps: 5E-9}}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ("optim.weight_decay=2e-5", "model.dnc.temperature=+1e-1"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay, cfg.model.dnc.temperature) == (1e-3, 5e-9, 2e-5, 0.1)
    assert load_config("demo/digits_dnc.yaml", ("model.backbone=1e3x",)).model.backbone == "1e3x"  # still a string
    with pytest.raises(ConfigError, match="'train.iters' expects int, got 1000.0"):
        load_config("demo/digits_dnc.yaml", ("train.iters=1e3", "train.epochs=0"))


@pytest.mark.parametrize("override, key", [
    ("train.log_interval=0", "train.log_interval"),
    ("train.eval_interval=0", "train.eval_interval"),
    ("model.dnc.momentum=1.0", "model.dnc.momentum"),
    ("model.dnc.momentum=-0.1", "model.dnc.momentum"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("model.dnc.temperature=0", "model.dnc.temperature"),
    ("model.dnc.temperature=-0.1", "model.dnc.temperature"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,0.99,0.999]", "optim.betas"),
])
def test_invalid_values_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("demo/digits_dnc.yaml", (override,))
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, expected", [
    (["model.backbone_kwargs.widht=3"], "dnc: error: model.backbone_kwargs: backbone 'tiny_cnn' does not take 'widht'"),
    (["model.backbone=resnet18", "model.backbone_kwargs.depth=3"],
     "dnc: error: model.backbone_kwargs: backbone 'resnet18' does not take 'depth'"),
    (["optim.lr=1e-3", "train.log_interval=0"], "dnc: error: train.log_interval must be >= 1, got 0"),
])
def test_bad_model_values_are_one_line_from_the_cli(tmp_path, capsys, argv, expected):
    from dnc.cli import main
    assert main(["train", "demo/digits_dnc.yaml", "--work-dir", str(tmp_path / "w"), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err


def test_an_empty_pretrained_file_is_one_line(tmp_path, capsys):
    from dnc.cli import main
    (tmp_path / "empty.pt").write_bytes(b"")
    pretrained = f"model.pretrained={tmp_path / 'empty.pt'}"
    assert main(["train", "demo/digits_dnc.yaml", "--work-dir", str(tmp_path / "w"), pretrained]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dnc: error: model.pretrained: {tmp_path / 'empty.pt'} is empty (0 bytes; an interrupted download?)"]
