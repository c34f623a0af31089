"""Deep Nearest Centroids inside PyTorch Lightning: a timm model with a DNC head (``dnc.create_model``) on the digits.

    pip install lightning
    python examples/lightning_dnc.py [--steps 300] [--devices 1]

The model is called with the labels in ``training_step`` (that is what moves the sub-centroids; it
returns the logits and the losses, cross-entropy included) and without them everywhere else. With several devices the DDP strategy must not broadcast buffers:
every process keeps its own share of the head's sub-centroid memory, which process 0's would replace
at each step (the sub-centroids themselves are updated identically on all processes).
"""
from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import dnc


class DNCClassifier(L.LightningModule):
    def __init__(self, backbone: str = "resnet18", num_classes: int = 10, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        # any timm name (resnet50.a1_in1k, hf-hub:ORG/NAME); pretrained=True for its weights
        self.model = dnc.create_model(backbone, num_classes=num_classes, backbone_kwargs={"in_chans": 1},
                                      num_subcentroids=4, momentum=0.9)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # logits

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits, losses = self.model(images, labels)  # with labels: the sub-centroids move
        loss = sum(losses.values())  # losses["ce"]: the cross-entropy on the logits
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_acc", (self(images).argmax(1) == labels).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)


def digits_loaders(batch_size: int = 64, size: int = 32):
    """scikit-learn's 8x8 digits (shipped, no download) at ``size`` pixels: 1,497 training, 300 validation."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, val = order[300:], order[:300]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size, shuffle=True, generator=g),
            DataLoader(TensorDataset(x[val], y[val]), 256))


def train(steps: int = 300, devices: int = 1, backbone: str = "resnet18", size: int = 32, **trainer_kwargs):
    """Train for ``steps`` steps on the CPU, images at ``size`` pixels; returns ``(model, trainer)``."""
    L.seed_everything(0, verbose=False)
    model = DNCClassifier(backbone)
    strategy = DDPStrategy(broadcast_buffers=False) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                        val_check_interval=min(steps, 100), check_val_every_n_epoch=None, **trainer_kwargs)
    train_loader, val_loader = digits_loaders(size=size)
    trainer.fit(model, train_loader, val_loader)
    return model, trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    _, trainer = train(args.steps, args.devices)
    print(f"validation accuracy {100 * trainer.callback_metrics['val_acc'].item():.1f}%")
