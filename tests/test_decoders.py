"""timm encoders, MMSeg-style decoders and test-time inference (whole / slide / multi-scale / flip)."""
import pytest
import timm
import torch
from torch import nn

from dnc.models.decoders import FCNDecoder, UPerDecoder, build_decoder
from dnc.models.encoders import build_encoder
from dnc.models.seg_inference import seg_inference

# A Swin-T layout shrunk to a few thousand parameters: same code paths, fast on CPU.
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_encoder("resnet18d", output_stride=8).eval()


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return build_encoder("swin_tiny_patch4_window7_224", output_stride=32, **TINY_SWIN).eval()


# ------------------------------------------------------------------------------------ encoders
def test_resnet_encoder_output_stride_8(resnet):
    assert resnet.channels == [64, 128, 256, 512] and resnet.reductions == [4, 8, 8, 8]
    feats = resnet(torch.randn(1, 3, 64, 80))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 20), (1, 128, 8, 10), (1, 256, 8, 10), (1, 512, 8, 10)]
    assert build_encoder("resnet18d", output_stride=32).reductions == [4, 8, 16, 32]


def test_swin_encoder_nchw_any_size(swin):
    assert swin.channels == [16, 32, 64, 128] and swin.reductions == [4, 8, 16, 32]
    for h, w in [(64, 96), (70, 101)]:  # the second is not a multiple of the patch size
        feats = swin(torch.randn(2, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [
            (2, c, -(-h // r), -(-w // r)) for c, r in zip(swin.channels, swin.reductions)]
    # as in MMSeg, every stage keeps full windows and shifts every other block, whatever img_size
    last_stage = [m for n, m in swin.named_modules() if n.startswith("model.layers_3.blocks.")
                  and hasattr(m, "shift_size")]
    assert [(tuple(m.window_size), tuple(m.shift_size)) for m in last_stage] == [((7, 7), (0, 0)), ((7, 7), (3, 3))]
    with pytest.raises(ValueError, match="output_stride must be 32"):
        build_encoder("swin_tiny_patch4_window7_224", output_stride=8, **TINY_SWIN)


@pytest.mark.parametrize("name,kwargs", [("resnet18d", {}), ("swin_tiny_patch4_window7_224", TINY_SWIN)])
def test_pretrained_from_local_file_loads_identical_weights(tmp_path, name, kwargs):
    torch.manual_seed(1)
    source = timm.create_model(name, num_classes=10, **kwargs)  # a full classifier checkpoint
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    enc = build_encoder(name, output_stride=32, pretrained=path, **kwargs)
    src = source.state_dict()
    loaded = enc.model.state_dict()
    assert loaded, "no weights"
    compared = 0
    for key, value in loaded.items():
        k = key if key in src else key.replace("layers_", "layers.")  # timm flattens Swin stages
        if k in src and value.dtype.is_floating_point:
            assert torch.equal(value, src[k]), key
            compared += 1
    assert compared > 0.9 * len([v for v in loaded.values() if v.dtype.is_floating_point])
    fresh = build_encoder(name, output_stride=32, **kwargs)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loaded.values())
                   if a.dtype.is_floating_point)


def test_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pth: weights file not found"):
        build_encoder("resnet18d", pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet34").state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pth: cannot load into timm model 'resnet18d'"):
        build_encoder("resnet18d", pretrained=wrong)
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="hf download timm/resnet18d"):  # timm's weights, not in the cache
        build_encoder("resnet18d", pretrained=True)
    with pytest.raises(ValueError, match="not a timm model"):
        build_encoder("no_such_net")


# ------------------------------------------------------------------------------------ decoders
@pytest.mark.parametrize("name,kwargs,reduction", [
    ("fcn", {}, 8), ("deeplabv3", dict(dilations=(1, 2, 3)), 8), ("upernet", {}, 4)])
def test_decoder_shapes_over_resnet(resnet, name, kwargs, reduction):
    dec = build_decoder(name, resnet.channels, channels=32, **kwargs).eval()
    with torch.no_grad():
        out = dec(resnet(torch.randn(2, 3, 64, 80)))
    assert dec.out_channels == 32 and out.shape == (2, 32, 64 // reduction, 80 // reduction)


def test_upernet_over_swin(swin):
    dec = UPerDecoder(swin.channels, channels=24, pool_scales=(1, 2, 3, 6)).eval()
    with torch.no_grad():
        out = dec(swin(torch.randn(1, 3, 64, 96)))
    assert out.shape == (1, 24, 16, 24)


def test_auxiliary_fcn_head_reads_stage_3(resnet):
    aux = FCNDecoder(in_channels=resnet.channels[-2], channels=16, num_convs=1, concat_input=False, in_index=-2)
    feats = [torch.randn(2, c, 8, 8) for c in resnet.channels]
    assert aux(feats).shape == (2, 16, 8, 8)
    assert aux.convs[0][0].in_channels == 256 and aux.conv_cat is None
    # the list form picks the same input width
    assert FCNDecoder(resnet.channels, 16, in_index=-2).convs[0][0].in_channels == 256


def test_gradients_reach_encoder_and_decoders():
    torch.manual_seed(0)
    enc = build_encoder("resnet18d", output_stride=8)
    decs = nn.ModuleList([build_decoder("fcn", enc.channels, 16), build_decoder("upernet", enc.channels, 16),
                          build_decoder("deeplabv3", enc.channels, 16, dilations=(1, 2))])
    cls = nn.Conv2d(16, 3, 1)
    feats = enc(torch.randn(2, 3, 32, 32))
    loss = 0
    for d in decs:
        logits = cls(d(feats))
        loss = loss + nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, *logits.shape[2:])))
    loss.backward()
    # every parameter takes part (no DDP find_unused_parameters needed); timm zero-initialises the
    # last BN of each residual block, so some encoder gradients are exactly 0 at the first step
    assert all(p.grad is not None for p in enc.parameters())
    assert enc.model.conv1[0].weight.grad.abs().sum() > 0
    for d in decs:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


def test_build_decoder_unknown_name():
    with pytest.raises(ValueError, match="decoder 'psp' is unknown"):
        build_decoder("psp", [8, 16, 32, 64])


# ----------------------------------------------------------------------------------- inference
def _pointwise_model(num_classes=4, down=1):
    """A 1x1 conv (optionally followed by stride-``down`` average pooling): each output depends
    only on its own pixel(s), so sliding-window and whole-image inference must agree."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, num_classes, 1)
    return conv if down == 1 else nn.Sequential(conv, nn.AvgPool2d(down))


def test_slide_equals_whole_for_pointwise_model():
    model = _pointwise_model()
    image = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        whole = seg_inference(model, image, 4, (37, 53))
        for crop, stride in [((16, 20), (10, 12)), (64, 48), ((37, 53), None)]:  # incl. crops larger than the image
            slide = seg_inference(model, image, 4, (37, 53), mode="slide", crop_size=crop, stride=stride)
            assert torch.allclose(slide, whole, atol=1e-5)
    assert torch.allclose(whole.sum(1), torch.ones(2, 37, 53))


def test_slide_averages_overlaps_and_upsamples_low_resolution_logits():
    model = _pointwise_model(down=4)
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        whole = seg_inference(model, image, 4, (32, 48))
        slide = seg_inference(model, image, 4, (32, 48), mode="slide", crop_size=16, stride=8)
        calls = []
        seg_inference(lambda x: calls.append(x.shape) or model(x), image, 4, (32, 48), mode="slide",
                      crop_size=16, stride=8)
    assert len(calls) == 3 * 5 and all(s[-2:] == (16, 16) for s in calls)
    assert slide.shape == whole.shape == (1, 4, 32, 48)
    # pooled blocks are aligned with the windows, so only border interpolation differs
    assert (slide.argmax(1) == whole.argmax(1)).float().mean() > 0.9


def test_flip_and_multiscale():
    model = _pointwise_model()
    image = torch.randn(1, 3, 20, 30)
    with torch.no_grad():
        plain = seg_inference(model, image, 4, (20, 30))
        flipped = seg_inference(model, image, 4, (20, 30), flip=True)
        # a pointwise model is flip-equivariant: flip averaging changes nothing
        assert torch.allclose(flipped, plain, atol=1e-6)

        # a model that is not flip-equivariant: flip averaging is the mean of both views
        asym = nn.Conv2d(3, 4, (1, 3), padding=(0, 1))
        one = seg_inference(asym, image, 4, (20, 30))
        mirror = seg_inference(asym, image.flip(-1), 4, (20, 30)).flip(-1)
        assert torch.allclose(seg_inference(asym, image, 4, (20, 30), flip=True), (one + mirror) / 2, atol=1e-6)

        multi = seg_inference(model, image, 4, (40, 60), scales=(0.5, 1.0, 1.5))
        assert multi.shape == (1, 4, 40, 60) and torch.allclose(multi.sum(1), torch.ones(1, 40, 60))
        half = seg_inference(model, nn.functional.interpolate(image, size=(10, 15), mode="bilinear"), 4, (40, 60))
        full = seg_inference(model, image, 4, (40, 60))
        big = seg_inference(model, nn.functional.interpolate(image, size=(30, 45), mode="bilinear"), 4, (40, 60))
        assert torch.allclose(multi, (half + full + big) / 3, atol=1e-6)


def test_inference_errors():
    model = _pointwise_model()
    image = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="crop_size"):
        seg_inference(model, image, 4, (8, 8), mode="slide")
    with pytest.raises(ValueError, match="mode"):
        seg_inference(model, image, 4, (8, 8), mode="tiles")
    with pytest.raises(ValueError, match=r"expected \(1, 5, h, w\)"):
        seg_inference(model, image, 5, (8, 8))


def test_full_segmenter_pipeline_with_slide(resnet):
    dec = build_decoder("fcn", resnet.channels, channels=16).eval()
    cls = nn.Conv2d(16, 5, 1)

    def forward(x):
        return cls(dec(resnet(x)))

    with torch.no_grad():
        probs = seg_inference(forward, torch.randn(1, 3, 50, 70), 5, (100, 140), mode="slide",
                              crop_size=32, scales=(0.75, 1.0), flip=True)
    assert probs.shape == (1, 5, 100, 140) and torch.allclose(probs.sum(1), torch.ones(1, 100, 140), atol=1e-5)
