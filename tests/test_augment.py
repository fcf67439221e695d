"""The kornia view pipeline: shapes, ranges, per-sample randomness, and each op's effect."""
import re

import pytest
import torch

from simxent.augment import ViewAugment, blur_probability, to_float
from simxent.config import AugmentConfig

MEAN, STD = AugmentConfig().mean, AugmentConfig().std


def denormalize(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def images(n=32, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_output_shape_dtype_and_range():
    torch.manual_seed(0)
    x = images(16, 40)
    v = ViewAugment(AugmentConfig(), 32)(x)
    assert v.shape == (16, 3, 32, 32) and v.dtype == torch.float32
    pixels = denormalize(v)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_views_under_a_callers_bf16_autocast_are_the_float32_views(masked, monkeypatch):
    """A user step wrapped whole in autocast: the crop's products ran in bf16 (pixels off by several uint8
    levels) and the CPU path's in-place subset ops then failed on the mixed dtypes."""
    import simxent.augment as augment
    monkeypatch.setattr(augment, "computes_subsets", lambda device: not masked)
    aug, x = ViewAugment(AugmentConfig(blur_p=0.5), 24), images(16, 40)
    torch.manual_seed(0)
    expected = aug.views(x, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        views = aug.views(x, 2)
        torch.manual_seed(0)
        one = aug(x)
    torch.testing.assert_close(views, expected, rtol=0, atol=0)
    torch.testing.assert_close(one, expected[:16], rtol=0, atol=0)


def test_two_calls_give_different_views():
    torch.manual_seed(0)
    aug = ViewAugment(AugmentConfig(), 32)
    x = images(8)
    v1, v2 = aug(x), aug(x)
    assert (v1 - v2).abs().flatten(1).amax(1).min() > 0.05


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_views_are_n_calls_in_one_tensor(channels_last, n_views):
    """What training uses: the views from the same draws as n calls, written into one batch."""
    aug, x = ViewAugment(AugmentConfig(blur_p=0.5), 48), images(8, 56)
    torch.manual_seed(3)
    expected = torch.cat([aug(x) for _ in range(n_views)])
    torch.manual_seed(3)
    views = aug.pair(x, channels_last) if n_views == 2 else aug.views(x, n_views, channels_last)
    torch.testing.assert_close(views, expected, rtol=0, atol=0)
    assert views.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_parameters_differ_per_sample():
    """One image repeated across the batch: every sample must come out differently."""
    torch.manual_seed(0)
    x = images(1).repeat(16, 1, 1, 1)
    v = ViewAugment(AugmentConfig(), 32)(x).flatten(1)
    distances = torch.cdist(v, v)
    off_diagonal = distances[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.min() > 1e-3


def test_identity_when_every_op_is_off():
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    x = images(16)
    torch.manual_seed(0)
    aug = ViewAugment(cfg, 32)
    out = aug(x)
    # On a square image a full-area crop fits only at aspect ratio 1 (any other rounds one side past 32), and
    # its grid samples the pixel centres: each view is the image itself, normalised, to the last bit.
    assert torch.equal(out, aug.normalize(to_float(x)))
    torch.testing.assert_close(denormalize(out), to_float(x), rtol=0, atol=1e-6)


def test_grayscale_always_gives_equal_channels():
    cfg = AugmentConfig(grayscale_p=1.0, jitter_p=0.0)
    torch.manual_seed(0)
    out = denormalize(ViewAugment(cfg, 32)(images(8)))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_flip_probability_is_per_sample():
    """Square full-image crops keep the geometry fixed, so each view is the image or its mirror."""
    from simxent.augment import RandomResizedCropFlip

    torch.manual_seed(0)
    x = to_float(images(200, 16))
    out = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5)(x)
    flipped = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    kept = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert torch.all(flipped ^ kept)
    assert 70 < flipped.sum() < 130  # Binomial(200, 0.5): mean 100, sd 7


def test_blur_default_depends_on_size():
    cfg = AugmentConfig()
    assert blur_probability(cfg, 32) == 0.0 and blur_probability(cfg, 64) == 0.5
    assert blur_probability(AugmentConfig(blur_p=0.3), 32) == 0.3
    assert not any("Blur" in type(op).__name__ for op in ViewAugment(cfg, 32).ops)
    assert any("Blur" in type(op).__name__ for op in ViewAugment(cfg, 64).ops)


def test_solarize_is_optional():
    assert not any("Solarize" in type(op).__name__ for op in ViewAugment(AugmentConfig(), 32).ops)
    assert any("Solarize" in type(op).__name__ for op in ViewAugment(AugmentConfig(solarize_p=0.2), 32).ops)


def test_jitter_changes_colour_statistics():
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), flip_p=0, jitter_p=1.0, grayscale_p=0, blur_p=0)
    torch.manual_seed(0)
    aug = ViewAugment(cfg, 16)
    aug.crop.forward = lambda x, sizes=None: x  # no crop: the colours alone
    x = images(64, 16)
    out = denormalize(aug(x))
    change = (out.mean(dim=(2, 3)) - to_float(x).mean(dim=(2, 3))).abs().mean()
    assert change > 0.02


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_accepts_uint8_and_float(dtype):
    x = images(4)
    x = x if dtype == torch.uint8 else x.float() / 255
    torch.manual_seed(0)
    assert ViewAugment(AugmentConfig(), 32)(x).shape == (4, 3, 32, 32)


@pytest.mark.parametrize("jitter", [0.8, 0.0], ids=["colour", "no-colour"])
def test_a_grey_or_channels_last_batch_is_refused_naming_its_shape(jitter):
    """One grey channel crashed inside the grayscale op, or with the colour ops off came out as three
    channels normalised with the red, green and blue statistics; (B, H, W, 3) is the cache's layout."""
    aug = ViewAugment(AugmentConfig(jitter_p=jitter, grayscale_p=jitter / 4), 16)
    for x in (images(2)[:, :1], images(2).permute(0, 2, 3, 1)):
        with pytest.raises(ValueError, match=rf"shape \(B, 3, H, W\), got {re.escape(str(tuple(x.shape)))}"):
            aug.views(x, 2)


def test_float_pixels_outside_zero_to_one_are_refused_with_their_range():
    """Float 0-255 pixels were clamped to white by the colour ops, and normalised ones to black where
    negative; [0, 1] (with a resampling overshoot) is taken as it is, and gives the uint8 batch's views."""
    aug = ViewAugment(AugmentConfig(), 16)
    x = images(2)
    for bad, shown in ((x.float(), "from 0 to 255"), ((x.float() / 255 - 0.5) / 0.25, "from -2 to 2.")):
        with pytest.raises(ValueError, match=f"pixels in \\[0, 1\\], got values {shown}"):
            aug.views(bad, 2)
    torch.manual_seed(0)
    expected = aug.views(x, 2)
    torch.manual_seed(0)
    torch.testing.assert_close(aug.views(x.float() / 255, 2), expected)
    block = torch.zeros(1, 3, 8, 8)
    block[..., 3:5, 3:5] = 1  # a white square on black, enlarged: bicubic overshoots at its edges
    enlarged = torch.nn.functional.interpolate(block, scale_factor=2, mode="bicubic")
    assert enlarged.min() < -0.1 and enlarged.max() > 1.2
    aug(enlarged)
    with pytest.raises(ValueError, match="float images hold NaN pixels"):
        aug(torch.full((1, 3, 16, 16), torch.nan))


# --- the fused colour ops against torchvision's per-image definitions ---------------------------------

import itertools  # noqa: E402

import torchvision.transforms.v2.functional as TF  # noqa: E402

from simxent.augment import (ColorJitter, adjust_brightness, adjust_contrast, adjust_hue,  # noqa: E402
                             adjust_saturation)


def tricky_images(n=24, size=12):
    """Random colours plus greys, saturated primaries and channel ties, where hue formulas break first."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5
    x[1, 0], x[1, 1], x[1, 2] = 1.0, 1.0, 0.2  # r == g == max
    x[2, :, :4] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    x[3] = x[3].round()
    x[4, 0], x[4, 1], x[4, 2] = 0.1, 0.9, 0.9  # g == b == max
    x[5] = (x[5] * 4).round() / 4  # five levels: ties between channels everywhere
    x[6, 1] = x[6, 0] - 1e-6  # near ties: the max channel decided by the last bits
    x[7, 2] = x[7, 1] + 1e-6
    return x


@pytest.mark.parametrize("ours,theirs,lo,hi", [
    (adjust_brightness, TF.adjust_brightness, 0.0, 1.8),
    (adjust_contrast, TF.adjust_contrast, 0.0, 1.8),
    (adjust_saturation, TF.adjust_saturation, 0.0, 1.8),
    (adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_equal_torchvision_per_image(ours, theirs, lo, hi):
    x = tricky_images()
    factors = torch.linspace(lo, hi, len(x))
    expected = torch.stack([theirs(img, f.item()) for img, f in zip(x, factors)])
    torch.testing.assert_close(ours(x.clone(), factors), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["batch", "image"])
def test_jitter_factors_are_per_sample_and_in_range(order):
    """Brightness alone: each sample is scaled by its own factor, uniform in [1 - 0.8, 1 + 0.8]."""
    torch.manual_seed(0)
    x = torch.full((2000, 3, 2, 2), 0.25)
    out = ColorJitter(0.8, 0.0, 0.0, 0.0, p=1.0, order=order)(x.clone())
    factors = out[:, 0, 0, 0] / 0.25
    assert factors.min() >= 0.2 - 1e-6 and factors.max() <= 1.8 + 1e-6
    assert abs(factors.mean().item() - 1.0) < 0.03 and abs(factors.std().item() - 1.6 / 12**0.5) < 0.03
    jittered = (ColorJitter(0.8, 0.0, 0.0, 0.0, p=0.8, order=order)(x.clone()) != 0.25).flatten(1).any(1).float().mean()
    assert abs(jittered.item() - 0.8) < 0.03


def test_jitter_order_is_uniform_over_the_24_permutations_and_drawn_per_call():
    """torchvision draws the order of the four ops per image; here one order per call, which must be uniform
    over all 24 orders and fresh at each call (the two views of a batch are two calls)."""
    torch.manual_seed(0)
    jitter = ColorJitter(0.8, 0.8, 0.8, 0.2, p=1.0)
    calls = []

    def recording(i):
        def op(samples, factor):
            calls[-1].append(i)
            return samples
        return op

    jitter.ops = [recording(i) for i in range(4)]
    x = torch.rand(4, 3, 2, 2)
    for _ in range(2400):
        calls.append([])
        jitter(x.clone())
    orders = [tuple(c) for c in calls]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    counts = torch.tensor([orders.count(o) for o in set(orders)], dtype=torch.float64)
    assert len(counts) == 24
    chi2 = ((counts - 100) ** 2 / 100).sum().item()
    assert chi2 < 49.7  # chi-square, 23 degrees of freedom, p = 0.001
    assert sum(a == b for a, b in zip(orders, orders[1:])) < 2399 / 24 * 1.5  # consecutive calls independent


def order_codes(jitter: ColorJitter) -> ColorJitter:
    """``jitter`` with each op j replaced by x -> 10 x + j + 1 (float64, exact): a sample that starts at 0
    ends holding the ops it went through, in order, as decimal digits (brightness, contrast, hue: 124)."""
    jitter.ops = [lambda s, f, j=j: s * 10 + (j + 1) for j in range(4)]
    return jitter


def codes_of(orders: torch.Tensor) -> torch.Tensor:
    """The digits :func:`order_codes` writes for the given per-sample orders."""
    return sum((orders[:, k] + 1) * 10 ** (orders.shape[1] - 1 - k) for k in range(orders.shape[1])).double()


@pytest.mark.parametrize("hue,n_orders", [(0.2, 24), (0.0, 6)])
def test_per_image_jitter_orders_are_uniform_and_independent(hue, n_orders):
    """``order="image"``: within one call, every sample draws its own order, uniform over the permutations of
    the ops that are on (hue (0, 0) is off and skipped), as torchvision's per-image ColorJitter; with p < 1
    the others are untouched."""
    torch.manual_seed(0)
    n = 200 * n_orders
    out = order_codes(ColorJitter(0.8, 0.8, 0.8, hue, p=1.0, order="image"))(torch.zeros(n, 1, 1, 1, dtype=torch.float64))
    on = [0, 1, 2, 3] if hue else [0, 1, 2]
    perms = torch.tensor(list(itertools.permutations(on)))
    codes = out.flatten().tolist()
    assert set(codes) <= set(codes_of(perms).tolist())
    counts = torch.tensor([codes.count(c) for c in codes_of(perms).tolist()], dtype=torch.float64)
    chi2 = ((counts - 200) ** 2 / 200).sum().item()
    assert chi2 < {24: 49.7, 6: 20.5}[n_orders]  # chi-square, n_orders - 1 degrees of freedom, p = 0.001
    some = order_codes(ColorJitter(0.8, 0.8, 0.8, hue, p=0.5, order="image"))(torch.zeros(2000, 1, 1, 1).double())
    assert abs((some != 0).double().mean().item() - 0.5) < 0.05 and set(some[some != 0].tolist()) <= set(codes)


@pytest.mark.parametrize("subsets", [True, False])
def test_per_image_orders_are_applied_slot_by_slot(subsets):
    """Both ways of :meth:`ColorJitter.in_orders` (CPU subsets, GPU masks, here both on the CPU) put each
    sample through its own order's ops."""
    jitter = order_codes(ColorJitter(0.8, 0.8, 0.8, 0.2, order="image"))
    orders = torch.rand(100, 4).argsort(1)
    factors = [torch.ones(100)] * 4
    out = jitter.in_orders(torch.zeros(100, 1, 1, 1, dtype=torch.float64), factors, orders, subsets=subsets)
    assert torch.equal(out.flatten(), codes_of(orders))


def test_per_image_jitter_equals_torchvision_in_each_samples_order():
    """Each of the 24 orders, twice, with per-sample factors: sample b equals torchvision's functional ops
    applied in its order with its factors; the CPU's subsets and the GPU's masks give the same pixels."""
    x = tricky_images(n=48)
    orders = torch.tensor(list(itertools.permutations(range(4))) * 2)
    g = torch.Generator().manual_seed(1)
    factors = [torch.empty(48).uniform_(0.2, 1.8, generator=g) for _ in range(3)]
    factors.append(torch.empty(48).uniform_(-0.2, 0.2, generator=g))
    theirs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for b, img in enumerate(x):
        for j in orders[b].tolist():
            img = theirs[j](img, factors[j][b].item())
        expected.append(img)
    jitter = ColorJitter(0.8, 0.8, 0.8, 0.2, order="image")
    by_subsets = jitter.in_orders(x.clone(), factors, orders, subsets=True)
    by_mask = jitter.in_orders(x.clone(), factors, orders, subsets=False)
    torch.testing.assert_close(by_subsets, torch.stack(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(by_mask, by_subsets, rtol=0, atol=0)


def test_hue_shift_is_drawn_per_call_and_keeps_value():
    torch.manual_seed(0)
    jitter = ColorJitter(0.0, 0.0, 0.0, 0.2, p=1.0)
    x = tricky_images()
    a, b = jitter(x.clone()), jitter(x.clone())
    assert not torch.equal(a, b)
    torch.testing.assert_close(a.amax(1), x.amax(1))  # a hue rotation keeps each pixel's max (HSV value)


def test_compiled_jitter_gives_the_eager_views():
    """``compile=True`` (train.compile) fuses each colour op; it must change the speed, not the views: same
    seed, same factors and order, same pixels, also when p < 1 makes the CPU's subsets vary in size."""
    x = tricky_images(n=32)
    for seed, p in ((3, 1.0), (3, 0.5), (4, 0.5)):
        torch.manual_seed(seed)
        eager = ColorJitter(0.8, 0.8, 0.8, 0.2, p=p)(x.clone())
        torch.manual_seed(seed)
        fused = ColorJitter(0.8, 0.8, 0.8, 0.2, p=p, compile=True)(x.clone())
        torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
        assert not torch.equal(eager, x)


# --- the batched crop against torchvision's RandomResizedCrop -------------------------------------------------

from torchvision import transforms as T  # noqa: E402

from simxent.augment import crop_boxes, resized_crops  # noqa: E402


def test_crop_boxes_follow_torchvision_distribution():
    """Per-sample crops (top, left, h, w) drawn all at once have torchvision's distribution: compare the
    quantiles of 20,000 draws of each (a wrong area, ratio or position law moves them by far more)."""
    torch.manual_seed(0)
    ours = crop_boxes(20_000, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3)).float()
    img = torch.empty(3, 30, 40)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(20_000)],
                          dtype=torch.float32)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for column, name in enumerate(("top", "left", "h", "w")):
        a, b = ours[:, column].quantile(q), theirs[:, column].quantile(q)
        assert (a - b).abs().max() <= 1.0, (name, a, b)
    assert (ours[:, 0] + ours[:, 2] <= 30).all() and (ours[:, 1] + ours[:, 3] <= 40).all() and (ours >= 0).all()


def test_crop_boxes_fall_back_to_torchvisions_central_crop():
    """A wide image where no allowed crop fits: the central crop of the largest allowed aspect ratio."""
    img = torch.empty(3, 10, 40)
    expected = T.RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3])
    assert crop_boxes(5, 10, 40, (0.9, 1.0), (3 / 4, 4 / 3)).tolist() == [list(expected)] * 5


def test_resized_crops_equal_torchvision_resized_crop():
    """The batch's two matrix products equal torchvision's per-image crop + resize (bilinear, antialiased,
    its default), shrinking and enlarging, borders too."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 30, 40, generator=g)
    boxes = torch.tensor([[0, 0, 30, 40], [3, 5, 10, 20], [10, 2, 20, 7], [0, 0, 5, 5], [29, 39, 1, 1], [4, 4, 26, 30]])
    expected = torch.stack([TF.resized_crop(img, *box, [16, 16], antialias=True)
                            for img, box in zip(x, boxes.tolist())])
    torch.testing.assert_close(resized_crops(x, boxes, 16), expected, rtol=0, atol=1e-5)
    flip = torch.tensor([True, False, True, True, False, True])
    mirrored = torch.where(flip.view(-1, 1, 1, 1), TF.horizontal_flip(expected), expected)
    torch.testing.assert_close(resized_crops(x, boxes, 16, flip), mirrored, rtol=0, atol=1e-5)


def test_gpu_style_masked_path_equals_the_cpu_subset_path(monkeypatch):
    """On a GPU every sample is computed and a mask keeps the chosen; on a CPU only the chosen are. With the
    same random draws both give the same views."""
    import simxent.augment as A

    x = images(64, 24)
    aug = ViewAugment(AugmentConfig(blur_p=0.5, solarize_p=0.3), 16)
    torch.manual_seed(3)
    subset = aug(x)
    monkeypatch.setattr(A, "computes_subsets", lambda device: False)
    torch.manual_seed(3)
    torch.testing.assert_close(aug(x), subset, rtol=0, atol=1e-5)


def test_blur_equals_torchvision_gaussian_blur_with_each_samples_sigma():
    from simxent.augment import RandomGaussianBlur

    x = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    sigmas = torch.empty(6, 1).uniform_(0.1, 2.0)  # the module's first draw, reproduced
    torch.manual_seed(5)
    out = RandomGaussianBlur(7, (0.1, 2.0), p=1.0)(x.clone())
    expected = torch.stack([TF.gaussian_blur(img, [7, 7], [s.item(), s.item()]) for img, s in zip(x, sigmas)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
