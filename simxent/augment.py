"""SimCLR's random views, made on whole batches on the training device.

Every sample draws its own crop, flip, jitter factors, grayscale, blur and solarize parameters (the jitter's
order is drawn per batch unless ``augment.jitter_order=image``: see :class:`ColorJitter`); calling the
pipeline twice on one batch gives two views (``views(images, n)`` makes n; multi-crop's small views come
from a second pipeline at the small size). Every op follows torchvision's per-image definition
(tested against it) but works on the whole batch at once: crop, antialiased resize and flip are two batched
matrix products, colour jitter is plain tensor arithmetic instead of an HSV round trip, blur is kornia's
separable Gaussian with a sigma per sample. Nothing reads a random draw back to the host, so on a GPU the
pipeline never stalls the stream (the first version's index-selected subsets and kornia's host-side sigma
check in its blur did, and made augmentation the slowest part of a GPU step: docs/benchmarks.md).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import kornia
import torch
from torch import nn

from .config import AugmentConfig, view_size

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision rounds it
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range


def blur_probability(cfg: AugmentConfig, size: int) -> float:
    """SimCLR blurs ImageNet-sized images but not CIFAR: on by default from 64 px."""
    if cfg.blur_p is not None:
        return cfg.blur_p
    return 0.5 if size >= 64 else 0.0


def small_view_size(cfg: AugmentConfig, image_size: int, progress: float = 1.0) -> int:
    """Multi-crop's small views: ``augment.small_size``, or half the view size at ``progress`` (at least 8 px)."""
    return cfg.small_size if cfg.small_size is not None else max(8, view_size(cfg, image_size, progress) // 2)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = GRAY_WEIGHTS  # Python scalars: no host-to-device copy per call
    return (r * x[:, 0:1]).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)  # three passes over a plane, not five


def computes_subsets(device: torch.device) -> bool:
    """Whether random ops compute only their chosen samples (CPU) or all, keeping the chosen by mask."""
    return device.type == "cpu"


def apply_to_some(x: torch.Tensor, p: float, fn: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]):
    """``fn`` on the samples of ``x`` drawn with probability ``p`` each; the others unchanged.

    ``fn(samples, index)`` gets the chosen samples and their indices (None: all of them), to pick its
    per-sample parameters. On a CPU only the chosen samples are computed. On a GPU all are and a mask
    keeps the chosen: a data-dependent subset would need its size on the host, a sync per op.
    """
    chosen = torch.rand(x.shape[0], device=x.device) < p
    if computes_subsets(x.device):
        index = chosen.nonzero().squeeze(1)
        x[index] = fn(x[index], index)
        return x
    return torch.where(chosen.view(-1, 1, 1, 1), fn(x, None), x)


def _pick(values: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    return values if index is None else values[index]


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    """x * f, clipped: torchvision's blend with black."""
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x, factor):
    """Blend with the image's mean luma m: m + f (x - m), clipped. m is the luma of the channel means (luma
    is linear), so no luma image is made."""
    # Channel means first: a reduction over contiguous rows, cheap where one over channels is not.
    mean = grayscale(x.mean(dim=(2, 3), keepdim=True))  # (B, 1, 1, 1)
    return torch.lerp(mean, x, _per_sample(factor)).clamp_(0, 1)


def adjust_saturation(x, factor):
    """Blend with the luma image: gray + f (x - gray), clipped."""
    return torch.lerp(grayscale(x), x, _per_sample(factor)).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate the HSV hue by ``shift`` turns, keeping value V and chroma C, without an HSV round trip.

    Hue in sextants from the max channel i (cyclic): H = 2 i + (x[i+1] - x[i+2]) / C, C = V - min. A channel
    of hue phase p (R, G, B: p = 1, 2/3, 1/3) comes out as

        V - 2C + 6C * clip(|frac(p + H / 6 + shift) - 1/2|, 1/6, 1/3),

    which is torchvision's HSV -> RGB written as one periodic trapezoid. Only float arithmetic: the max
    channel's indicators are signs (exact, as V is one of the channels), since on a CPU a comparison, a
    boolean mask, ``where`` or ``remainder`` costs 5 to 20 times an arithmetic pass (measured at 96 px).
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    not_red = (maxc - r).sign_()  # 0 where red is the max (ties go to red, then green, as in torchvision)
    blue = (maxc - g).sign_().mul_(not_red)  # 1 where blue is the max
    # Numerator x[i+1] - x[i+2] of the max channel, then H / 6 + shift = sextant offset 2i / 6 + that / 6C + shift.
    numerator = (g - b).lerp_((b - r).lerp_(r - g, blue), not_red)
    turns = not_red.add_(blue).div_(3).add_(shift.view(-1, 1, 1, 1))
    turns.addcdiv_(numerator, chroma.clamp_min_(1e-12), value=1 / 6)
    # Phases 1, 2/3, 1/3, each + 1 (frac needs x >= 0), made on the device: a host tensor would be a copy per call.
    phase = torch.arange(6.0, 3.0, -1.0, device=x.device).div_(3).view(1, 3, 1, 1)
    ramp = (turns + phase).frac_().sub_(0.5).abs_().clamp_(1 / 6, 1 / 3)
    return torch.addcmul(maxc.sub_(chroma, alpha=2), ramp, chroma, value=6)


class ColorJitter(nn.Module):
    """torchvision's ColorJitter per sample: brightness, contrast and saturation factors uniform in
    [max(0, 1 - a), 1 + a], hue shift uniform in [-h, h], applied in a random order, each sample jittered
    with probability p. Ops that are off (factors (1, 1), hue (0, 0)) are skipped.

    The factors are drawn per sample. ``order="batch"`` draws the order once per call: each view then has
    torchvision's distribution, and the two views of an image (two calls) draw their orders independently,
    as there; only images of one batch share an order. ``order="image"`` draws a permutation per sample, so
    that images are jittered independently, exactly as torchvision's (see :meth:`in_orders`; on a GPU four
    times the colour work).

    ``compile=True`` compiles each op on its own (the random order stays eager: compiling the whole jitter
    would recompile for every order), which fuses its dozen elementwise passes into one or two kernels."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0,
                 compile: bool = False, order: str = "batch"):
        super().__init__()
        self.ranges = [(max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast),
                       (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue)]
        self.ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        if compile:
            self.ops = [torch.compile(op) for op in self.ops]
        self.active = [i for i, r in enumerate(self.ranges) if r != ((0.0, 0.0) if i == 3 else (1.0, 1.0))]
        if order not in ("batch", "image"):
            raise ValueError(f"order: {order!r} is not batch or image")
        self.p, self.per_image = p, order == "image"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = [torch.empty(x.shape[0], device=x.device).uniform_(lo, hi) for lo, hi in self.ranges]
        if self.per_image:
            orders = torch.rand(x.shape[0], 4, device=x.device).argsort(1)  # a uniform permutation per row

            def jitter(samples, index):
                return self.in_orders(samples, [_pick(f, index) for f in factors], _pick(orders, index))
        else:
            order = [i for i in torch.randperm(4).tolist() if i in self.active]

            def jitter(samples, index):
                for i in order:
                    samples = self.ops[i](samples, _pick(factors[i], index))
                return samples

        return apply_to_some(x, self.p, jitter)

    def in_orders(self, x: torch.Tensor, factors: list[torch.Tensor], orders: torch.Tensor,
                  subsets: Optional[bool] = None) -> torch.Tensor:
        """Sample b through op ``orders[b, 0]``, then ``orders[b, 1]``, ... (0 brightness, 1 contrast,
        2 saturation, 3 hue; op j with factor ``factors[j][b]``; ops that are off leave it as it is).

        Slot by slot, each op j goes to the samples whose slot holds j: on a CPU (``subsets``, default
        :func:`computes_subsets`) as 16 subset calls, the pixel work of one shared order; otherwise
        every op runs on every sample and a mask keeps each sample's own (four times the work, no
        data-dependent shapes, so no host sync). ``x`` may be changed in place."""
        subsets = computes_subsets(x.device) if subsets is None else subsets
        for slot in orders.unbind(1):
            x = self.slot_by_subsets(x, factors, slot) if subsets else self.slot_by_mask(x, factors, slot)
        return x

    def slot_by_subsets(self, x, factors, slot):
        """One slot of :meth:`in_orders`: each op on its own samples only, in place."""
        for j in self.active:
            index = (slot == j).nonzero().squeeze(1)
            if index.numel():  # an empty subset would make a compiled op recompile for size 0
                x[index] = self.ops[j](x[index], factors[j][index])
        return x

    def slot_by_mask(self, x, factors, slot):
        """One slot of :meth:`in_orders`: every op on every sample, each sample keeping its slot's op."""
        out = x
        for j in self.active:
            out = torch.where((slot == j).view(-1, 1, 1, 1), self.ops[j](x, factors[j]), out)
        return out


class RandomGrayscale(nn.Module):
    """Replace a sample by its luma (in all three channels) with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_to_some(x, self.p, lambda s, _: grayscale(s).expand(-1, 3, -1, -1))


class RandomGaussianBlur(nn.Module):
    """Gaussian blur with probability p, sigma uniform in ``sigma`` per sample, reflected borders (as
    torchvision's GaussianBlur); kornia's separable filter takes one sigma per sample."""

    def __init__(self, kernel: int, sigma: tuple[float, float], p: float):
        super().__init__()
        self.kernel, self.sigma, self.p = kernel, sigma, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(x.shape[0], 1, device=x.device).uniform_(*self.sigma)

        def blur(samples, index):
            # kornia's gaussian_blur2d checks sigma > 0 on the host (a GPU sync); its parts do not.
            kernel = kornia.filters.get_gaussian_kernel1d(self.kernel, _pick(sigma, index))
            return kornia.filters.filter2d_separable(samples, kernel, kernel, "reflect")

        return apply_to_some(x, self.p, blur)


class RandomSolarize(nn.Module):
    """With probability p, invert the pixels at or above ``threshold`` (x -> 1 - x), as torchvision does."""

    def __init__(self, p: float, threshold: float = 0.5):
        super().__init__()
        self.p, self.threshold = p, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_to_some(x, self.p, lambda s, _: torch.where(s >= self.threshold, 1 - s, s))


def crop_boxes(n: int, height: int | torch.Tensor, width: int | torch.Tensor, scale: tuple[float, float],
               ratio: tuple[float, float], device=None, tries: int = 10,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` random crops ``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params``:

        area ~ U(scale) * H * W,  log(aspect) ~ U(log ratio),  w = round(sqrt(area * aspect)),
        h = round(sqrt(area / aspect)),  the first of ``tries`` draws that fits, position uniform;

    and where none fits, the central crop of the largest allowed aspect ratio. All ``n`` at once.
    ``height`` and ``width`` are one image size for all, or (n,) tensors: each sample's own image (the
    true extent of an image stored top-left in a larger padded array). ``generator``: the random source
    (default the global one)."""
    per_sample = isinstance(height, torch.Tensor)
    if per_sample:
        height, width = (v.to(device=device, dtype=torch.float32).view(n, 1) for v in (height, width))
    area = height * width * torch.empty(n, tries, device=device).uniform_(*scale, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(n, tries, device=device).uniform_(*log_ratio, generator=generator).exp_()
    w = (area * aspect).sqrt_().round_()
    h = (area / aspect).sqrt_().round_()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first True (0 when none fits)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    if per_sample:
        height, width = height.squeeze(1), width.squeeze(1)
        fh, fw = _central_fallback_tensor(height, width, ratio)
    else:
        fh, fw = _central_fallback(height, width, ratio)
        fh, fw = torch.full_like(h, fh), torch.full_like(w, fw)
    any_fits = fits.any(dim=1)
    w, h = torch.where(any_fits, w, fw), torch.where(any_fits, h, fh)
    top = torch.where(any_fits, (torch.rand(n, device=device, generator=generator) * (height - h + 1)).floor_(),
                      ((height - fh) / 2).floor())
    left = torch.where(any_fits, (torch.rand(n, device=device, generator=generator) * (width - w + 1)).floor_(),
                       ((width - fw) / 2).floor())
    return torch.stack([top, left, h, w], dim=1)


def _central_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop ``(h, w)``: the whole image, its aspect ratio clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return round(width / ratio[0]), width
    if in_ratio > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def _central_fallback_tensor(height: torch.Tensor, width: torch.Tensor, ratio: tuple[float, float]):
    """:func:`_central_fallback` per sample, in float64 so that rounding matches Python's."""
    h64, w64 = height.double(), width.double()
    in_ratio = w64 / h64
    fh = torch.where(in_ratio < ratio[0], (w64 / ratio[0]).round(), h64)
    fw = torch.where(in_ratio > ratio[1], (h64 * ratio[1]).round(), w64)
    return fh.to(height.dtype), fw.to(width.dtype)


def resize_weights(start: torch.Tensor, extent: torch.Tensor, full: int, size: int,
                   flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, size, full) weights that take each sample's span [start, start + extent) of an axis of ``full``
    pixels to ``size`` pixels as ``F.interpolate(mode="bilinear", antialias=True)`` does (torchvision's
    default): with s = extent / size, output pixel j weighs the span's pixel k by the triangle
    max(0, 1 - |k + 1/2 - s (j + 1/2)| / max(s, 1)), the weights normalised to sum to 1. Shrinking widens
    the triangle to s pixels each side (the antialiasing); enlarging it is plain bilinear, edges clamped.
    Samples where the boolean ``flip`` is set take their output pixels in reverse order."""
    scale = (extent / size).unsqueeze(1)  # (n, 1)
    centre = scale * (torch.arange(size, dtype=start.dtype, device=start.device) + 0.5)  # (n, size)
    if flip is not None:
        centre = torch.where(flip.unsqueeze(1), centre.flip(1), centre)
    k = torch.arange(full, dtype=start.dtype, device=start.device) - start.unsqueeze(1)  # (n, full), in the span
    inside = ((k >= 0) & (k < extent.unsqueeze(1))).unsqueeze(1)
    w = (1 - (k.unsqueeze(1) + 0.5 - centre.unsqueeze(2)).abs_() / scale.clamp(min=1).unsqueeze(2)).clamp_(min=0)
    w = w.mul_(inside)
    return w.div_(w.sum(2, keepdim=True))


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop each sample to its box ``(top, left, h, w)`` and resize it to ``size`` x ``size`` (bilinear,
    antialiased), as two batched matrix products: rows R_b (size, H) and columns C_b (size, W) from
    :func:`resize_weights`, view_b = R_b x_b C_b^T per channel. Equal to torchvision's ``resized_crop``
    (``antialias=True``, its default) up to float rounding. Samples where the boolean ``flip`` is set get
    their columns in reverse order: a horizontal flip at no extra pass."""
    _, _, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    rows = resize_weights(top, h, height, size).unsqueeze(1)  # (n, 1, size, H): the same for every channel
    columns = resize_weights(left, w, width, size, flip).transpose(1, 2).unsqueeze(1)  # (n, 1, W, size)
    return rows @ x @ columns


class RandomResizedCropFlip(nn.Module):
    """torchvision's RandomResizedCrop (bilinear, antialiased) then RandomHorizontalFlip(flip_p), on a
    whole batch, a crop and a coin per sample, in :func:`resized_crops`: a separate flip would cost one more
    pass over the views (two on a GPU, where every sample is flipped and a mask keeps the chosen).

    ``sizes`` (B, 2), when given, holds each image's true (height, width) inside a larger padded batch
    (images stored top-left): crops are drawn over that extent only, so padding is never read."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO,
                 flip_p: float = 0.5):
        super().__init__()
        self.size, self.scale, self.ratio, self.flip_p = size, tuple(scale), tuple(ratio), flip_p

    def forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        height, width = (x.shape[2], x.shape[3]) if sizes is None else sizes.unbind(1)
        boxes = crop_boxes(n, height, width, self.scale, self.ratio, x.device)
        flip = torch.rand(n, device=x.device) < self.flip_p if self.flip_p > 0 else None
        return resized_crops(x, boxes, self.size, flip)


class RandomFlip(nn.Module):
    """Horizontal flip with probability p per sample: for crops already taken (and resized) elsewhere."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_to_some(x, self.p, lambda s, _: s.flip(3))


def blur_sigma(size: int) -> tuple[float, float]:
    """SimCLR's sigma range, (0.1, 2.0) px at 224 px, scaled to a ``size`` px view: the same blur relative
    to the image at every size."""
    return 0.1 * size / 224, 2.0 * size / 224


def blur_kernel(size: int) -> int:
    """An odd kernel of about 10 % of the side (SimCLR's), and at least 3 sigma each side of the centre so
    that the widest blur is not truncated."""
    radius = max(size // 20, math.ceil(3 * blur_sigma(size)[1]))
    return 2 * radius + 1


class ViewAugment(nn.Module):
    """uint8 or [0, 1] float NCHW batch -> one normalised random view per image (float32 NCHW).
    ``compile``: compile the colour ops (the bulk of the elementwise work, ColorJitter)."""

    def __init__(self, cfg: AugmentConfig, size: int, compile: bool = False):
        super().__init__()
        s = cfg.jitter_strength
        self.crop = RandomResizedCropFlip(size, scale=cfg.crop_scale, flip_p=cfg.flip_p)
        self.flip = RandomFlip(cfg.flip_p)
        ops = [
            ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=cfg.jitter_p, compile=compile,
                        order=cfg.jitter_order),
            RandomGrayscale(p=cfg.grayscale_p),
        ]
        blur_p = blur_probability(cfg, size)
        if blur_p > 0:
            ops.append(RandomGaussianBlur(blur_kernel(size), sigma=blur_sigma(size), p=blur_p))
        if cfg.solarize_p > 0:
            ops.append(RandomSolarize(p=cfg.solarize_p))
        self.ops = nn.Sequential(*[op for op in ops if op.p > 0])  # the colour ops, after the crop
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):  # see views
            return self._view(self.crop(to_float(images), sizes))

    def _view(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The colour ops and normalisation of cropped views ``x``, which they may change in place."""
        return self.normalize(self.ops(x).clamp_(0, 1), out=out)

    @torch.no_grad()
    def pair(self, images: torch.Tensor, channels_last: bool = False, sizes: Optional[torch.Tensor] = None,
             cropped: bool = False) -> torch.Tensor:
        """Both views, ``[forward(images); forward(images)]``: ``views(images, 2, ...)``."""
        return self.views(images, 2, channels_last, sizes, cropped)

    @torch.no_grad()
    def views(self, images: torch.Tensor, n_views: int, channels_last: bool = False,
              sizes: Optional[torch.Tensor] = None, cropped: bool = False) -> torch.Tensor:
        """``n_views`` views, ``[forward(images); ...]`` (the same random draws in the same order), as one
        (n_views B, 3, S, S) tensor, in channels_last memory if asked. The images are converted to float
        once and each view is normalised straight into its slice: no second conversion, and no
        concatenation or layout pass. ``sizes``: each image's true (h, w) in a padded batch (see
        RandomResizedCropFlip).

        ``cropped=True``: ``images`` (n_views B, 3, S, S) are the views' crops already taken and resized
        (first B: view 1, ...): each slice is only flipped, then coloured as above.

        Always in float32: under a caller's autocast the crop's matrix products would run in bf16 or fp16,
        rounding pixels by several uint8 levels and mixing dtypes in the colour ops."""
        with torch.autocast(images.device.type, enabled=False):
            return self._views(images, n_views, channels_last, sizes, cropped)

    def _views(self, images: torch.Tensor, n_views: int, channels_last: bool, sizes: Optional[torch.Tensor],
               cropped: bool) -> torch.Tensor:
        x = to_float(images)
        if cropped and x is images:
            x = x.clone()  # the flip and colour ops work in place on the crops: never on the caller's tensor
        n = x.shape[0] // n_views if cropped else x.shape[0]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(n_views * n, 3, self.size, self.size, device=x.device, memory_format=fmt)
        for i, view in enumerate(out.split(n)):
            # The crop makes a new tensor, so the colour ops may work in place and ``x`` serves the other views.
            crops = self.flip(x[i * n : (i + 1) * n]) if cropped else self.crop(x, sizes)
            self._view(crops, out=view)
        return out


class Normalize(nn.Module):
    """(x - mean) / std per channel, as x * (1 / std) - mean / std: one pass instead of two. Used for views
    and for evaluation images alike."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / std)
        self.register_buffer("shift", -mean / std)

    def forward(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale, out=out)


# How far float pixels may stray outside [0, 1]: bicubic resampling overshoots by up to about 0.3 at sharp
# edges, while 0-255 pixels, or normalised ones (about -2 to 2.6), go far beyond.
FLOAT_MARGIN = 0.5


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB images, uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already.
    Anything else is refused: one grey channel crashed deep in the colour ops, or, with them off, was
    broadcast to three channels normalised with the red, green and blue statistics; float pixels in
    [0, 255], or already normalised, were clamped to [0, 1] by the colour ops into near-white or black
    views. The range check costs one pass (a device sync on a GPU) on float input only: simxent's own data
    is uint8. Resampled images may overshoot [0, 1], hence the margin (FLOAT_MARGIN)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a batch of RGB images of shape (B, 3, H, W), got {tuple(images.shape)}; "
                         f"repeat a grey channel first: images.expand(-1, 3, -1, -1)")
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    low, high = images.aminmax() if images.numel() else (torch.zeros(()), torch.zeros(()))
    if low.isnan() or high.isnan():
        raise ValueError("float images hold NaN pixels")
    if not (low >= -FLOAT_MARGIN and high <= 1 + FLOAT_MARGIN):
        raise ValueError(f"float images must hold pixels in [0, 1], got values from {low.item():.4g} to "
                         f"{high.item():.4g}: divide 0-255 pixels by 255 (or pass uint8), and leave normalisation "
                         f"to simxent")
    return images.float()
