"""SimCLR's two random views, made with kornia on whole batches on the training device.

Every sample draws its own crop, flip, jitter, grayscale, blur and solarize parameters
(``same_on_batch=False``); calling the pipeline twice on one batch gives the two views.
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from .config import AugmentConfig


def blur_probability(cfg: AugmentConfig, size: int) -> float:
    """SimCLR blurs ImageNet-sized images but not CIFAR: on by default from 64 px."""
    if cfg.blur_p is not None:
        return cfg.blur_p
    return 0.5 if size >= 64 else 0.0


class ViewAugment(nn.Module):
    """uint8 or [0, 1] float NCHW batch -> one normalised random view per image (float32 NCHW)."""

    def __init__(self, cfg: AugmentConfig, size: int):
        super().__init__()
        s = cfg.jitter_strength
        ops = [
            K.RandomResizedCrop((size, size), scale=cfg.crop_scale, resample="BILINEAR"),
            K.RandomHorizontalFlip(p=cfg.flip_p),
            K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=cfg.jitter_p),
            K.RandomGrayscale(p=cfg.grayscale_p),
        ]
        blur_p = blur_probability(cfg, size)
        if blur_p > 0:
            kernel = 2 * (size // 20) + 1  # about 10% of the image side, odd
            ops.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=blur_p))
        if cfg.solarize_p > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=cfg.solarize_p))
        self.ops = nn.Sequential(*[op for op in ops if getattr(op, "p", 1.0) > 0])
        self.normalize = Normalize(cfg.mean, cfg.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        return self.normalize(self.ops(x).clamp_(0, 1))


class Normalize(nn.Module):
    """(x - mean) / std per channel; used for views and for evaluation images alike."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()
