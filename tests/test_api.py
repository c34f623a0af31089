"""``dnc.create_model`` and ``dnc.replace_head``: the classifier of ``dnc train`` in timm's shape, trained
in a plain loop and under DistributedDataParallel (two CPU processes)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

import dnc
from dnc.models.classifier import Classifier
from dnc_tiny import one_thread, run_torchrun, subprocess_env

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

STEPS = 12


def batches(n: int = STEPS, size: int = 24):
    """Three classes told apart by their mean colour, fixed batches of ``size`` 32x32 images."""
    g = torch.Generator().manual_seed(1)
    colours = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1.5]])
    for _ in range(n):
        y = torch.arange(size) % 3
        yield colours[y][:, :, None, None] + torch.randn(size, 3, 32, 32, generator=g), y


def _train(model: torch.nn.Module) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for x, y in batches():
        logits, parts = model(x, y)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fell(losses: list) -> bool:
    return sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_create_model_is_the_cli_model_with_timms_interface():
    torch.manual_seed(0)
    model = dnc.create_model("test_resnet", num_classes=3, num_subcentroids=2, momentum=0.5)
    cfg_model = dnc.build_model("custom/imagefolder_dnc.yaml", overrides=[
        "model.backbone=test_resnet", "model.pretrained=null", "data.num_classes=3"])
    assert type(model) is type(cfg_model) is Classifier
    assert model.num_classes == 3 and model.pretrained_cfg["architecture"] == "test_resnet"
    x = next(batches())[0][:4]
    model.eval()
    feats = model.forward_features(x)
    assert feats.dim() == 4  # before pooling, as timm's
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (4, model.num_features)
    assert model.get_classifier() is model.head and model.head.centroids.k == 2
    model.reset_classifier(5)  # the same kind of head, same options
    assert model(x).shape == (4, 5) and model.head.centroids.k == 2
    model.reset_classifier(4, head="linear")
    assert isinstance(model.head, dnc.LinearHead) and model(x).shape == (4, 4)


def test_create_model_trains_in_a_plain_loop():
    torch.manual_seed(0)
    model = dnc.create_model("test_resnet", num_classes=3, num_subcentroids=2, momentum=0.5)
    before = model.head.centroids.centroids.clone()
    losses = _train(model)
    assert _fell(losses), losses
    assert not torch.equal(before, model.head.centroids.centroids)  # the sub-centroids moved


def test_replace_head_turns_a_timm_classifier_into_a_dnc_one():
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", num_classes=3)
    model = dnc.replace_head(net, num_subcentroids=2, momentum=0.5)
    assert model.backbone is net and net.num_classes == 0  # reused, its own classifier removed
    assert isinstance(model.head, dnc.DNCHead) and model.num_classes == 3
    assert model.num_features == net.head_hidden_size
    assert _fell(_train(model))
    with pytest.raises(ValueError, match="num_classes"):
        dnc.replace_head(timm.create_model("test_efficientnet", num_classes=0))


def test_create_model_under_ddp_trains_identically_on_two_processes(tmp_path):
    env = subprocess_env()
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env["PYTHONPATH"]
    run_torchrun(Path(__file__).with_name("api_ddp_runner.py"), tmp_path, timeout=240, env=env)
    a, b = (torch.load(tmp_path / f"api_rank{r}.pt", weights_only=True) for r in (0, 1))
    own = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics: each process its own
    differ = [k for k, v in a["model"].items() if not k.endswith(own) and not torch.equal(v, b["model"][k])]
    assert not differ, differ  # the weights and the sub-centroids agree across processes
    assert int(a["model"]["head.centroids.step_count"]) == STEPS
    assert _fell(a["losses"]) and _fell(b["losses"]), (a["losses"], b["losses"])
