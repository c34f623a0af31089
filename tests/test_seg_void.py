"""Segmentation (issue 11, item 6): a batch whose masks are all void (255) contributes zero loss instead of
stopping the run with a non-finite loss."""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image

from dnc.cli import main
from dnc.models.segmenter import Segmenter
from test_segmentation import make_camvid


def test_an_all_void_batch_has_zero_loss_and_no_gradient():
    torch.manual_seed(0)
    model = Segmenter("resnet18d", 4, "fcn", "dnc", decoder_channels=16, aux_weight=0.4,
                      head_kwargs=dict(num_subcentroids=2)).train()
    images, void = torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255)
    _, losses = model(images, void)
    assert all(torch.isfinite(v) and v == 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    partly = void.clone()
    partly[:, :8] = 1  # with labelled pixels, the loss is their mean cross-entropy, as before
    logits = model.decoder(model.encoder(images))
    up = torch.nn.functional.interpolate(model.head(logits).float(), size=(32, 32), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(up, partly, ignore_index=255)
    torch.testing.assert_close(model._ce(model.head(logits), partly), expected)


def test_training_goes_on_through_an_all_void_image(tmp_path):
    """Before the fix: "non-finite loss at iteration N" as soon as a batch held only void pixels."""
    make_camvid(tmp_path / "camvid", n=2)
    mask = tmp_path / "camvid" / "train" / "labels" / "1.png"
    Image.fromarray(np.full(np.array(Image.open(mask)).shape, 11, np.uint8)).save(mask)  # 11: void in CamVid
    work = tmp_path / "work"
    overrides = [f"data.root={tmp_path / 'camvid'}", "data.crop_size=[32,32]", "data.batch_size=1", "data.num_workers=0",
                 "model.decoder_channels=16", "train.iters=4", "train.eval_interval=4", "train.amp=none",
                 "model.backbone=resnet18d", "train.log_interval=1", "model.dnc.init=random"]
    assert main(["train", "configs/segmentation/camvid/fcn_r18-d8_1x16_176x176_2k_camvid_dnc.yaml", "--work-dir",
                 str(work), *overrides]) == 0
    ce = [json.loads(line)["ce"] for line in (work / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(ce) == 4 and 0.0 in ce and all(math.isfinite(v) for v in ce)  # one step at zero
