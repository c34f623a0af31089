"""No training step of the single-process engine reads a device value on the host (issue 10).

A host-device synchronisation in every step (e.g. ``.item()`` on a CUDA tensor to check the stop flag
or the loss) stalls the GPU queue once per step. The whole engine step runs here (a DNC head with a
sub-centroid memory, clustered every 3 steps, as in ``dnc_tiny``), with logging, evaluation and
checkpoints kept out of the watched steps. On the CPU the proxy counts the Python calls that would
synchronise on a GPU (``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``,
``nonzero``); where CUDA exists the same run also goes under ``torch.cuda.set_sync_debug_mode("error")``,
which catches every synchronisation, those made in C++ included.
"""
from __future__ import annotations

import pytest
import torch

import dnc.engine
from dnc.cli import main
from dnc_tiny import CONFIG, TINY, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

ITERS = 12
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


class _Counter:
    def __init__(self):
        self.calls: list = []


class _WatchedLoader:
    """The training loader, recording what synchronised while each step ran (from the moment the loop
    took a batch to the moment it asked for the next one: loading and collating are not watched)."""

    def __init__(self, loader, counter: _Counter, steps: list, cuda: bool):
        self.loader, self.counter, self.steps, self.cuda = loader, counter, steps, cuda
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            watched = len(self.steps) < ITERS - 1  # the last step logs, evaluates and saves: not watched
            start = len(self.counter.calls)
            if self.cuda and watched:
                torch.cuda.set_sync_debug_mode("error")
            try:
                yield batch
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
            self.steps.append(self.counter.calls[start:] if watched else None)


def _run(tmp_path, monkeypatch, device: str, *overrides: str) -> list:
    counter, steps = _Counter(), []
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counter.calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    make_loader = dnc.engine.make_loader

    def watched(dataset, batch_size, shuffle, *args, **kwargs):
        loader = make_loader(dataset, batch_size, shuffle, *args, **kwargs)
        return _WatchedLoader(loader, counter, steps, device == "cuda") if shuffle else loader

    monkeypatch.setattr(dnc.engine, "make_loader", watched)
    rc = main(["train", CONFIG, "--work-dir", str(tmp_path / "run"), *TINY, f"train.iters={ITERS}",
               "train.log_interval=100", f"train.device={device}", *overrides])
    monkeypatch.undo()
    assert rc == 0
    return steps


@pytest.mark.parametrize("overrides", [(), ("optim.grad_clip=1.0", "train.amp=bf16")], ids=["plain", "clip-bf16"])
def test_no_training_step_synchronises_on_the_cpu_proxy(tmp_path, monkeypatch, overrides):
    steps = _run(tmp_path, monkeypatch, "cpu", *overrides)
    assert len(steps) >= ITERS - 1
    syncing = {i + 1: calls for i, calls in enumerate(steps) if calls}
    assert not syncing, f"host reads of tensor values inside training steps (step: calls): {syncing}"


def test_the_proxy_sees_a_per_step_sync(tmp_path, monkeypatch):
    """The proxy is not blind: a loss read with ``.item()`` in every step (the bug) is caught."""
    from dnc.models.classifier import Classifier
    forward = Classifier.forward

    def reading(self, images, targets=None):
        out = forward(self, images, targets)
        if targets is not None and self.training:
            out[1]["ce"].item()
        return out

    monkeypatch.setattr(Classifier, "forward", reading)
    steps = _run(tmp_path, monkeypatch, "cpu")
    assert all(calls == ["item"] for calls in steps[: ITERS - 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_training_step_synchronises_on_a_gpu(tmp_path, monkeypatch):
    steps = _run(tmp_path, monkeypatch, "cuda")  # a synchronisation raises inside the step: rc 1
    assert len(steps) >= ITERS - 1 and not any(steps[: ITERS - 1])
