"""SimCLR's two random views, made on whole batches on the training device.

Every sample draws its own crop, flip, jitter, grayscale, blur and solarize parameters; calling the
pipeline twice on one batch gives the two views. Crops, blur and solarize are kornia's. Colour jitter, flip
and grayscale are written here with plain tensor ops: they follow torchvision's per-image definitions
exactly (tested against them) and cost a fraction of kornia's generic versions, whose HSV round trip made
colour jitter the slowest step of the whole pipeline (docs/benchmarks.md).
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from .config import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision rounds it


def blur_probability(cfg: AugmentConfig, size: int) -> float:
    """SimCLR blurs ImageNet-sized images but not CIFAR: on by default from 64 px."""
    if cfg.blur_p is not None:
        return cfg.blur_p
    return 0.5 if size >= 64 else 0.0


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _chosen(x: torch.Tensor, p: float) -> torch.Tensor:
    """Indices of the samples of ``x`` that an op with probability ``p`` applies to, drawn per sample."""
    return (torch.rand(x.shape[0], device=x.device) < p).nonzero().squeeze(1)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    """x * f, clipped: torchvision's blend with black."""
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x, factor):
    """Blend with the image's mean luma: f * x + (1 - f) * mean, clipped."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x, factor):
    """Blend with the luma image: f * x + (1 - f) * gray, clipped."""
    f = _per_sample(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate the HSV hue by ``shift`` turns, keeping value and saturation, without a full HSV round trip:

        H = 2 i + (x[i+1] - x[i+2]) / C  for the max channel i (channels cyclic),  C = max - min,
        channel_n = max - C * clip(min(k, 4 - k), 0, 1),  k = (n + H + 6 * shift) mod 6,  n = 5, 3, 1 (R, G, B)
    """
    maxc, argmax = x.max(dim=1, keepdim=True)  # ties go to the first channel, as in torchvision
    chroma = maxc - x.min(dim=1, keepdim=True).values
    differences = x.roll(-1, dims=1) - x.roll(-2, dims=1)  # g - b, b - r, r - g
    hue = differences.gather(1, argmax).div_(chroma.clamp_min(1e-12)).add_(2 * argmax)
    hue.add_(6 * shift.view(-1, 1, 1, 1) + 6)  # + 6 keeps it positive before the mod
    k = (hue + x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)).remainder_(6)
    return maxc - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


class ColorJitter(nn.Module):
    """torchvision's ColorJitter per sample: brightness, contrast and saturation factors uniform in
    [max(0, 1 - a), 1 + a], hue shift uniform in [-h, h], applied in a random order, each sample jittered
    with probability p."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0):
        super().__init__()
        self.ranges = [(max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast),
                       (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue)]
        self.ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Jitters the chosen samples of ``x`` in place (the view pipeline owns its batch)."""
        chosen = _chosen(x, self.p)
        out = x[chosen]
        for i in torch.randperm(4).tolist():
            lo, hi = self.ranges[i]
            if (lo, hi) != ((0.0, 0.0) if i == 3 else (1.0, 1.0)):
                out = self.ops[i](out, torch.empty(len(chosen), device=x.device).uniform_(lo, hi))
        x[chosen] = out
        return x


class RandomGrayscale(nn.Module):
    """Replace a sample by its luma (in all three channels) with probability p, in place."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = _chosen(x, self.p)
        x[chosen] = grayscale(x[chosen]).expand(-1, 3, -1, -1)
        return x


class RandomHorizontalFlip(nn.Module):
    """Mirror each sample with probability p, in place."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = _chosen(x, self.p)
        x[chosen] = x[chosen].flip(-1)
        return x


class ViewAugment(nn.Module):
    """uint8 or [0, 1] float NCHW batch -> one normalised random view per image (float32 NCHW)."""

    def __init__(self, cfg: AugmentConfig, size: int):
        super().__init__()
        s = cfg.jitter_strength
        ops = [
            K.RandomResizedCrop((size, size), scale=cfg.crop_scale, resample="BILINEAR"),
            RandomHorizontalFlip(p=cfg.flip_p),
            ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=cfg.jitter_p),
            RandomGrayscale(p=cfg.grayscale_p),
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
        x = to_float(images).clone()  # the ops below work in place
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
