"""A trained model's head and embeddings: the one embedding pass of the package.

* :func:`head_of`: the head of a classifier or segmenter (inside DDP too): the module with the
  sub-centroids of a DNC model;
* :func:`embed_batches` / :func:`embed`: the unit embeddings (and labels) of every sample of a loader,
  in fp32 and evaluation mode (BatchNorm statistics untouched; the model's mode is restored after).
  Used by the k-means++ initialisation, ``dnc extend`` and ``dnc explain``.
"""
from __future__ import annotations

from contextlib import closing
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .engine import unwrap

__all__ = ["head_of", "embed_batches", "embed"]


def head_of(model: nn.Module) -> nn.Module:
    """The output layer of ``model`` (a DNC head holds ``centroids``)."""
    net = unwrap(model)
    return net.head_module() if hasattr(net, "head_module") else net.head


def embed_batches(model: nn.Module, loader, device: torch.device) -> Iterator[tuple]:
    """``(z (B, D) fp32, labels (B,), rest)`` for each non-empty batch ``(images, targets, *rest)`` of
    ``loader``: ``model.embeddings(images, targets)`` on ``device``, in evaluation mode, without autocast
    (a segmenter gives pixel embeddings and their labels). The model's mode is restored at the end."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        for images, targets, *rest in loader:
            if not len(targets):
                continue
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                z, y = net.embeddings(images.to(device), targets.to(device))
            yield z.float(), y, rest
    finally:
        net.train(was_training)


def embed(model: nn.Module, loader, device: torch.device, limit: Optional[int] = None,
          progress: Optional[Callable[[int], None]] = None) -> tuple:
    """``(z (N, D) fp32, labels (N,))`` of the samples of ``loader`` (:func:`embed_batches`), the first
    ``limit`` only when given (the loader stops at the batch that reaches it); ``progress(n)`` is called
    every 10 batches with the number of samples embedded so far."""
    zs, ys, n = [], [], 0
    with closing(embed_batches(model, loader, device)) as batches:
        for step, (z, y, _) in enumerate(batches, 1):
            zs.append(z)
            ys.append(y)
            n += len(y)
            if limit is not None and n >= limit:
                break
            if progress is not None and step % 10 == 0:
                progress(n)
    if not zs:
        raise ValueError("no readable sample to embed")
    return torch.cat(zs)[:limit], torch.cat(ys)[:limit]
