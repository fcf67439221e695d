"""Crops over the whole image (cache and stream), the evaluation transform, and the view-scaled blur,
each against torchvision's definition on the original image."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from simxent.augment import CROP_RATIO, RandomGaussianBlur, ViewAugment, blur_kernel, blur_sigma, crop_boxes
from simxent.config import AugmentConfig
from simxent.data import (decode, decode_eval, decode_side, decode_views, iterate_batches, load_folder, open_stream,
                          view_boxes)
from tests.conftest import write_image

SCALE = (0.08, 1.0)
Q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])


def smooth_image(path, width, height, seed=0, quality=None, cell=8):
    """A smooth random RGB image (noise at one value per ``cell`` px, enlarged bicubically): resampling
    differs little on it."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // cell), max(2, width // cell), 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **({"quality": quality} if quality else {}))
    return path


def relative(boxes, height, width):
    """Box statistics relative to the image: area fraction, aspect w/h in original pixels, top and left
    as fractions. ``height``/``width`` are the extent the boxes were drawn over; ``aspect_scale`` undoes a
    non-uniform rounding of a stored image's sides."""
    top, left, h, w = boxes.double().unbind(1)
    return {"area": h * w / (height * width), "top": top / height, "left": left / width,
            "log_aspect": (w / width).log() - (h / height).log()}


def torchvision_boxes(n, height, width):
    img = torch.empty(1, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(img, list(SCALE), list(CROP_RATIO)) for _ in range(n)])


def assert_same_quantiles(ours, theirs, tol):
    for name in ours:
        a, b = ours[name].float().quantile(Q), theirs[name].float().quantile(Q)
        assert (a - b).abs().max() <= tol[name], (name, a, b)


@pytest.mark.parametrize("height, width", [(400, 600), (600, 300)])  # 3:2 and 1:2
def test_stream_boxes_follow_torchvision_over_the_original_image(height, width):
    """The streaming workers draw both views' boxes over the original image, as RandomResizedCrop does."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    ours = torch.cat([view_boxes(height, width, SCALE, generator) for _ in range(3000)])
    theirs = torchvision_boxes(6000, height, width)
    # Relative to the original: the original's own aspect ratio is in log_aspect (w / h in pixels).
    ours, theirs = relative(ours, height, width), relative(theirs, height, width)
    assert_same_quantiles(ours, theirs, {"area": 0.02, "top": 0.02, "left": 0.02, "log_aspect": 0.03})


@pytest.mark.parametrize("height, width", [(400, 600), (600, 300)])
def test_cached_boxes_follow_torchvision_over_the_original_image(height, width):
    """The cache stores a 600 x 400 photograph at 144 x 96 (96 px views); boxes drawn over each image's true
    extent in a mixed padded batch have, relative to the original, RandomResizedCrop's law there."""
    side = decode_side(96)
    stored = [round(v * side / max(height, width)) for v in (height, width)]
    other = [side, side // 3]  # a second, different image in the same batch
    n = 12_000
    sizes = torch.tensor([stored, other] * (n // 2))
    torch.manual_seed(2)
    boxes = crop_boxes(n, sizes[:, 0], sizes[:, 1], SCALE, CROP_RATIO)
    assert ((boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]) & (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1])).all()
    assert (boxes >= 0).all()
    ours = relative(boxes[0::2], *stored)
    ours["log_aspect"] += np.log((stored[1] / stored[0]) / (width / height))  # undo the sides' rounding
    theirs = relative(torchvision_boxes(6000, height, width), height, width)
    # The stored image has ~100 px sides: box sides round to whole pixels there, about 1 % of a side.
    assert_same_quantiles(ours, theirs, {"area": 0.025, "top": 0.02, "left": 0.02, "log_aspect": 0.05})


def test_per_sample_sizes_draw_as_one_size_does():
    """Tensor sizes all equal to one size give the very boxes of that size (same draws, same fallback)."""
    for scale in (SCALE, (0.9, 1.0)):  # the second mostly falls back to the central crop on a 10 x 40 image
        torch.manual_seed(4)
        one = crop_boxes(500, 10, 40, scale, CROP_RATIO)
        torch.manual_seed(4)
        many = crop_boxes(500, torch.full((500,), 10), torch.full((500,), 40), scale, CROP_RATIO)
        assert torch.equal(one, many)


@pytest.mark.parametrize("width, height", [(60, 40), (30, 60)])
def test_streamed_crop_pixels_equal_torchvisions_resized_crop(tmp_path, width, height):
    """A worker's crop equals torchvision's resized_crop (bilinear, PIL) of the original image."""
    path = smooth_image(tmp_path / "a.png", width, height)
    original = Image.open(path).convert("RGB")
    generator = torch.Generator().manual_seed(3)
    for _ in range(10):
        views, boxes = decode_views(path, 16, SCALE, generator)
        for view, box in zip(views, boxes.tolist()):
            expected = np.asarray(TF.resized_crop(original, *box, [16, 16], T.InterpolationMode.BILINEAR))
            assert np.array_equal(view, expected), box


def test_streamed_crop_of_a_large_jpeg_decoded_at_reduced_scale(tmp_path):
    """A 600 x 400 JPEG: the worker decodes at 1/2 to 1/8 scale when every box keeps the view's pixels; the
    crop still matches torchvision's resized crop of the full-resolution image closely (a mean difference
    under 3 of 255; a box off by a few pixels gives several times that)."""
    path = smooth_image(tmp_path / "big.jpg", 600, 400, quality=95, cell=24)
    original = Image.open(path).convert("RGB")
    generator = torch.Generator().manual_seed(5)
    for _ in range(10):
        views, boxes = decode_views(path, 32, SCALE, generator)
        for view, box in zip(views, boxes.tolist()):
            expected = np.asarray(TF.resized_crop(original, *box, [32, 32], T.InterpolationMode.BILINEAR))
            assert np.abs(view.astype(int) - expected.astype(int)).mean() < 3.0, box


@pytest.mark.parametrize("decode_size, atol", [(64, 1e-5), (None, 0.06)])
def test_cached_crop_pixels_equal_torchvisions_resized_crop_of_the_original(tmp_path, decode_size, atol):
    """Views of a padded batch of a 3:2 and a 1:2 image are torchvision's resized crops of the originals:
    exactly when stored at full size (decode_size above the originals), closely when stored reduced (2.5
    times smaller: a mean difference under 0.06 on these smooth images)."""
    paths = [smooth_image(tmp_path / "f" / "a.png", 60, 40, 1), smooth_image(tmp_path / "f" / "b.png", 30, 60, 2)]
    data = load_folder(tmp_path / "f", 16, workers=0, progress=False, decode_size=decode_size)
    assert data.sizes.tolist() == ([[40, 60], [60, 30]] if decode_size else [[16, 24], [24, 12]])
    originals = [TF.to_tensor(Image.open(p).convert("RGB")) for p in paths]
    aug = ViewAugment(AugmentConfig(flip_p=0), 16)
    x = data.images.permute(0, 3, 1, 2)
    for seed in range(5):
        torch.manual_seed(seed)
        boxes = crop_boxes(2, data.sizes[:, 0], data.sizes[:, 1], SCALE, CROP_RATIO)
        torch.manual_seed(seed)
        views = aug.crop(x.float() / 255, data.sizes)
        for view, box, size, original in zip(views, boxes, data.sizes, originals):
            factor = torch.tensor(original.shape[1:]) / size  # stored -> original pixels
            top, left = (box[:2] * factor).tolist()
            h, w = (box[2:] * factor).tolist()
            expected = TF.resized_crop(original, round(top), round(left), round(h), round(w), [16, 16],
                                       antialias=True)
            if decode_size:
                torch.testing.assert_close(view, expected, rtol=0, atol=atol)
            else:
                assert (view - expected).abs().mean() < atol


def test_square_images_no_larger_than_the_view_keep_the_square_layout(tmp_path):
    """A CIFAR-like folder (every image square and at most the view) is stored as decode() squares, no sizes."""
    for i in range(4):
        smooth_image(tmp_path / "f" / f"{i}.png", 12, 12, i)
    data = load_folder(tmp_path / "f", 16, workers=0, progress=False)
    assert data.sizes is None and data.images.shape == (4, 16, 16, 3)
    assert all(np.array_equal(img.numpy(), decode(tmp_path / "f" / f"{i}.png", 16)) for i, img in enumerate(data.images))


def test_small_images_that_are_not_square_keep_their_sides_for_the_crops(tmp_path):
    """16 x 10 images at a 16 px view: decode()'s centre square would cut off their 3 px side strips, which
    torchvision's crops can reach. They are stored whole, at their own size, and crops are drawn over it."""
    for i in range(3):
        pixels = np.zeros((10, 16, 3), np.uint8)
        pixels[:, :3] = pixels[:, -3:] = 255
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    data = load_folder(tmp_path, 16, workers=0, progress=False)
    assert data.sizes.tolist() == [[10, 16]] * 3
    assert all(np.array_equal(img[:10, :16].numpy(), pixels) for img in data.images)
    # Streamed, they come as crops drawn over the whole image, not as centre squares.
    (_, batch), = iterate_batches(open_stream(tmp_path, 16, workers=0), 3, torch.Generator().manual_seed(0))
    assert batch.cropped and batch.images.shape == (6, 3, 16, 16)


def large_folder(root, n=8, seed=0):
    for i in range(n):
        w, h = (60, 40) if i % 2 else (30, 60)
        smooth_image(root / f"c{i % 2}" / f"{i}.jpg", w, h, seed + i, quality=90)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_of_large_images_hands_over_both_views_crops_reproducibly(tmp_path, workers):
    """Each streamed batch holds both views' crops; the crops depend on the epoch's generator and the step
    only (not the workers, not where the epoch was resumed), and each process draws its own."""
    root = large_folder(tmp_path / "f")
    stream = open_stream(root, 16, workers=workers)
    full = list(iterate_batches(stream, 4, torch.Generator().manual_seed(7)))
    assert [s for s, _ in full] == [0, 1]
    assert all(b.cropped and b.images.shape == (8, 3, 16, 16) and len(b) == 4 for _, b in full)
    again = list(iterate_batches(open_stream(root, 16, workers=0), 4, torch.Generator().manual_seed(7), start=1))
    assert torch.equal(again[0][1].images, full[1][1].images)
    other_epoch = list(iterate_batches(stream, 4, torch.Generator().manual_seed(8)))
    assert not torch.equal(other_epoch[0][1].images, full[0][1].images)
    views = ViewAugment(AugmentConfig(), 16).pair(full[0][1].images, cropped=True)
    assert views.shape == (8, 3, 16, 16) and torch.isfinite(views).all()


@pytest.mark.parametrize("width, height, suffix", [(50, 30, "png"), (20, 44, "png"), (16, 12, "png"),
                                                   (223, 150, "jpg"), (150, 230, "jpg")])
def test_eval_transform_is_torchvisions_resize_then_centre_crop(tmp_path, width, height, suffix):
    """Larger than the view: shorter side to round(16 / 0.875) = 18, centre 16 x 16, as torchvision's
    Resize + CenterCrop (bilinear, antialiased, on PIL). Not larger: decoded as before. A JPEG many times the
    view is decoded whole, as torchvision's loader does (not at PIL's reduced draft scale)."""
    path = smooth_image(tmp_path / f"a.{suffix}", width, height, quality=90 if suffix == "jpg" else None)
    ours = decode_eval(path, 16, 0.875)
    if max(width, height) <= 16:
        assert np.array_equal(ours, decode(path, 16))
        return
    theirs = v2.Compose([v2.Resize(18, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(16)])
    assert np.array_equal(ours, np.asarray(theirs(Image.open(path).convert("RGB"))))


def test_eval_folders_use_the_eval_transform(tmp_path):
    root = large_folder(tmp_path / "f", 4)
    data = load_folder(root, 16, workers=0, progress=False, crop_ratio=0.875)
    assert data.sizes is None and data.images.shape == (4, 16, 16, 3)
    assert np.array_equal(data.images[0].numpy(), decode_eval(data.files[0], 16, 0.875))


def test_an_evaluation_leaves_training_its_whole_small_non_square_images(tmp_path):
    """Images no larger than the view but not square: training keeps each whole (padded), evaluation
    centre-crops them. Each has its own cache entry, so an evaluation between two training loads of the
    folder (a sweep's first run scored, then its second trained) does not hand the second its crops."""
    root = tmp_path / "f"
    for i in range(3):
        write_image(root / f"{i}.png", size=(16, 10), seed=i)
    first = load_folder(root, 16, workers=0, progress=False)
    evaluated = load_folder(root, 16, workers=0, progress=False, crop_ratio=0.875)
    again = load_folder(root, 16, workers=0, progress=False)
    assert first.sizes is not None and torch.equal(first.sizes, again.sizes)
    assert torch.equal(first.images, again.images)
    assert np.array_equal(evaluated.images[0].numpy(), decode_eval(evaluated.files[0], 16, 0.875))


def test_an_entry_of_the_previous_cache_version_is_not_read(tmp_path):
    """v4 entries may hold what v5 decodes otherwise (a dark 16-bit PGM read as 8-bit, a turned TIFF's sides
    swapped twice): an entry under v4's key is left alone and the folder decoded again."""
    import hashlib

    from simxent.data import Layout, _listing, find_source

    root = tmp_path / "f"
    for i in range(3):
        write_image(root / f"{i}.png", size=(16, 16), seed=i)
    fresh = load_folder(root, 16, workers=0, progress=False, cache=False)
    cache = tmp_path / "cache"
    v4 = hashlib.sha1(f"simxent-v4 {Layout('square', 16, 16).key()}\n".encode() + _listing(find_source(root)))
    stale = cache / f"{v4.hexdigest()[:20]}.npy"
    cache.mkdir()
    np.save(stale, np.zeros((3, 16, 16, 3), np.uint8))
    stale.with_suffix(".json").write_text('{"root": "", "good": [0, 1, 2], "bad": [], "reasons": {}, "sizes": null}')
    assert torch.equal(load_folder(root, 16, workers=0, progress=False, cache_dir=cache).images, fresh.images)


@pytest.mark.parametrize("size", [64, 96, 224])
def test_blur_scales_with_the_view(size):
    """SimCLR's sigma (0.1, 2.0) at 224 px, scaled to the view; an odd kernel of about 10 % of the side, at
    least 3 sigma each side; the blur equals torchvision's GaussianBlur with that kernel and sigma."""
    lo, hi = blur_sigma(size)
    assert (lo, hi) == pytest.approx((0.1 * size / 224, 2.0 * size / 224))
    kernel = blur_kernel(size)
    assert kernel % 2 == 1 and kernel >= 6 * hi + 1 and abs(kernel - 0.1 * size) <= 2
    blur = [op for op in ViewAugment(AugmentConfig(), size).ops if isinstance(op, RandomGaussianBlur)]
    assert len(blur) == 1 and blur[0].kernel == kernel and blur[0].sigma == (lo, hi) and blur[0].p == 0.5
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    torch.manual_seed(1)
    sigmas = torch.empty(2, 1).uniform_(lo, hi)
    torch.manual_seed(1)
    out = RandomGaussianBlur(kernel, (lo, hi), p=1.0)(x.clone())
    expected = torch.stack([TF.gaussian_blur(img, [kernel, kernel], [s.item()] * 2) for img, s in zip(x, sigmas)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_training_on_large_non_square_photographs(tmp_path, monkeypatch, stream):
    """A folder of 3:2 and 1:2 JPEGs larger than the view trains through the cache and the stream, with kNN
    monitoring of a separate labelled folder; from the cache, the kNN bank is the training folder decoded
    with the evaluation transform (centre crops, no padding), while a streamed run is leave-one-out in val."""
    import json

    from simxent import train as train_module
    from simxent.config import load_config
    from tests.conftest import TINY_RUN

    banks = []
    knn_monitor = train_module.knn_monitor

    def spy(model, bank, *args, **kwargs):
        banks.append(bank)
        return knn_monitor(model, bank, *args, **kwargs)
    monkeypatch.setattr(train_module, "knn_monitor", spy)
    root, val = large_folder(tmp_path / "photos", 32), large_folder(tmp_path / "val", 8, seed=100)
    cfg = load_config(None, [*TINY_RUN, f"data.train={root}", f"data.val={val}", f"data.stream={str(stream).lower()}",
                             "train.epochs=1", "eval.knn_k=5", "eval.projector=0", f"out={tmp_path / 'run'}"])
    summary = train_module.pretrain(cfg, progress=False)
    assert summary["global_step"] == 2 and np.isfinite(summary["last_loss"])
    if stream:
        assert banks == [None]
    else:
        (bank,) = banks
        assert len(bank.data) == 32 and bool(bank.rows.all()) and bank.data.sizes is None
        assert bank.data.images.shape[1:] == (16, 16, 3)
    (knn,) = json.loads((tmp_path / "run" / "summary.json").read_text())["knn_top1"]
    assert isinstance(knn["top1"], float) and 0 <= knn["top1"] <= 1
