"""The optimiser (SGD or AdamW, optionally without weight decay on norms and biases) and the learning-rate
schedule (constant, step, exp, cosine, poly; linear warm-up), as a factor of the base rate per iteration."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

__all__ = ["build_optimizer", "lr_factor", "fit_warmup", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD or AdamW; optionally no weight decay on norms, biases and parameters named in ``no_decay_keys``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (cfg.no_decay_norm_bias and p.ndim <= 1) or any(k in name for k in cfg.no_decay_keys)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(cfg, it: int, total: int, iters_per_epoch: int) -> float:
    """Learning-rate multiplier at iteration ``it`` (milestones and exp decay count epochs)."""
    epoch = it // max(iters_per_epoch, 1)
    if cfg.name == "constant":
        f = 1.0
    elif cfg.name == "step":
        f = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    elif cfg.name == "exp":
        f = cfg.gamma ** epoch
    elif cfg.name == "cosine":
        t = min(max(it - cfg.warmup_iters, 0) / max(total - cfg.warmup_iters, 1), 1.0)
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    else:  # poly
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - min(it / max(total, 1), 1.0)) ** cfg.power
    if it < cfg.warmup_iters:
        f *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / cfg.warmup_iters
    return f


def fit_warmup(cfg, total: int) -> tuple:
    """``(sched config, note)``: a warm-up longer than the whole run (which would never reach the learning
    rate) shortened to the run, with the note saying so; else ``(cfg, None)``."""
    if cfg.warmup_iters <= total:
        return cfg, None
    note = f"sched.warmup_iters={cfg.warmup_iters} is longer than the run ({total} iterations): shortened to {total}"
    return dataclasses.replace(cfg, warmup_iters=total), note


def build_scheduler(optimizer, cfg, total: int, iters_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, total, iters_per_epoch))
