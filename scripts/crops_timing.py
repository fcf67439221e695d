"""Images/s of the data paths (cache build, cached batches + both views, streaming workers, streaming +
both views) on generated 600x400 and 300x600 JPEGs at 96 px and on CIFAR-10's test folder at 32 px.

Run it once per simxent version to compare, each from a folder without a ``simxent`` package, e.g.
``cd /tmp && PYTHONPATH=OLD_CHECKOUT python REPO/scripts/crops_timing.py before PHOTOS/train``.
"""
import sys
import time
from pathlib import Path

import torch

import simxent.data as D
from simxent.augment import ViewAugment
from simxent.config import AugmentConfig

sys.path.insert(1, str(Path(__file__).parent))
from benchmark import synthetic_folder  # noqa: E402


def pair(augment, batch):
    if isinstance(batch, torch.Tensor):  # versions before Batch yield plain image tensors
        return augment.pair(batch)
    return augment.pair(batch.images, sizes=batch.sizes, cropped=batch.cropped)


def rate(batches, augment=None, images=320, batch_size=64):
    next(batches)  # worker start-up left out
    n, t = 0, time.perf_counter()
    for _, b in batches:
        if augment is not None:
            pair(augment, b)
        n += batch_size
        if n >= images:
            break
    return n / (time.perf_counter() - t)


def main(tag, photos, cifar="../shared/data/cifar10/test"):
    torch.set_num_threads(2)
    if not Path(photos).is_dir():
        synthetic_folder(Path(photos).parent, 400, [(600, 400), (300, 600)])
    for name, root, size in [("photos", Path(photos), 96), ("cifar-test", Path(cifar), 32)]:
        t = time.perf_counter()
        data = D.load_folder(root, size, workers=2, progress=False)
        print(f"{tag} {name} cache build: {len(data) / (time.perf_counter() - t):.0f} images/s, "
              f"array {tuple(data.images.shape)}", flush=True)
        augment = ViewAugment(AugmentConfig(), size)
        cached = rate(D.iterate_batches(data, 64, torch.Generator().manual_seed(0)), augment, 1024)
        print(f"{tag} {name} cached batches + both views: {cached:.0f} images/s", flush=True)
        stream = D.open_stream(root, size, workers=2)
        alone = rate(D.iterate_batches(stream, 64, torch.Generator().manual_seed(0)))
        print(f"{tag} {name} stream workers alone: {alone:.0f} images/s", flush=True)
        both = rate(D.iterate_batches(stream, 64, torch.Generator().manual_seed(1)), augment)
        print(f"{tag} {name} stream + both views: {both:.0f} images/s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
