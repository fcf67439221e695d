"""Encoders and the projection head.

:func:`backbone` is the one contract: it returns ``(module, feature_dim)`` where the module maps an
image batch to pooled features, so no caller ever replaces a classifier layer.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .config import ModelConfig


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """CPU-sized encoder: four 3x3 conv-BN-ReLU stages (64, 128, 256, 512; strides 1, 2, 2, 2),
    then global average pooling to a 512-d feature."""

    widths = (64, 128, 256, 512)
    strides = (1, 2, 2, 2)

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for width, stride in zip(self.widths, self.strides):
            layers.append(_conv_bn_relu(c_in, width, stride))
            c_in = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def backbone(name: str, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """An encoder from images to pooled features, and the feature size.

    ResNets come from torchvision with random weights; ``cifar_stem`` swaps the 7x7/2 convolution and
    the max-pool for one 3x3/1 convolution, which keeps 32 px images from shrinking to 1x1 too early.
    """
    if name == "convnet":
        return ConvNet(), ConvNet.widths[-1]
    if name not in ("resnet18", "resnet34", "resnet50"):
        raise ValueError(f"unknown backbone '{name}' (choose resnet18, resnet34, resnet50 or convnet)")
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class ProjectionHead(nn.Sequential):
    """MLP g(h): ``layers`` linear layers, BatchNorm + ReLU between them (SimCLR v1 uses 2)."""

    def __init__(self, dim_in: int, hidden: int = 2048, dim_out: int = 128, layers: int = 2):
        mods, d = [], dim_in
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            d = hidden
        mods.append(nn.Linear(d, dim_out))
        super().__init__(*mods)


class SimCLR(nn.Module):
    """Encoder f and projection head g; ``forward`` returns the projections z = g(f(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder, self.feature_dim = backbone(cfg.backbone, cfg.cifar_stem)
        self.head = ProjectionHead(self.feature_dim, cfg.head_hidden, cfg.head_out, cfg.head_layers)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """z = g(f(x)); for a list of batches (views at several sizes), each one's z, concatenated: one
        forward call, so that DDP sees every use of a parameter in one graph."""
        if isinstance(x, (list, tuple)):
            return torch.cat([self.head(self.encoder(v)) for v in x])
        return self.head(self.encoder(x))
