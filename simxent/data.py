"""Image folders: discovery, robust decoding, the decoded-image cache, streaming, and batch iteration.

A folder is read once into uint8 arrays of shape (N, H, W, 3) at the training resolution (shorter side
resized, centre crop). Random augmentation happens later, batched on the training device
(:mod:`simxent.augment`), so decoding is the only per-image work and it is done once per folder.
Folders too large to keep decoded stream instead (:class:`ImageStream`): the same decoding, in DataLoader
workers, every epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import DataConfig

log = logging.getLogger("simxent")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(ValueError):
    """A missing, empty or unreadable image folder or file."""


@contextmanager
def naming_the_key(key: str):
    """Errors about a folder also say which setting gave it: ``data.train: image folder not found: PATH``."""
    try:
        yield
    except DataError as e:
        raise DataError(f"{key}: {e}") from e


@dataclass
class ImageList:
    """The files of a folder and, when it has class sub-folders, their labels (-1 when unlabelled)."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and all(y >= 0 for y in self.labels)


def find_images(root: str | Path) -> ImageList:
    """All images below ``root`` at any depth; suffixes match case-insensitively.

    The first-level sub-folder of a file names its class; files directly under ``root`` are unlabelled.
    Symbolic links are followed, each real directory once, so a link loop cannot recurse forever.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                files.append(Path(dirpath) / name)
    if not files:
        raise DataError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    top = [f.relative_to(root).parts for f in files]
    classes = sorted({p[0] for p in top if len(p) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p[0]] if len(p) > 1 else -1 for p in top]
    return ImageList(root, files, labels, classes)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grey, palette, CMYK, 16-bit; transparency composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def decode(path: str | Path, size: int) -> np.ndarray:
    """Decode one file to a (size, size, 3) uint8 array: EXIF rotation, RGB, shorter side to ``size``,
    centre crop. Raises OSError, ValueError or PIL's errors on an unreadable file."""
    with warnings.catch_warnings():
        # A decompression bomb must fail, not warn; other PIL warnings are noise here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)


class DecodedFiles(Dataset):
    """Dataset over files that yields ``(index, HWC uint8 array or None)``; None marks a bad file."""

    def __init__(self, files: list[Path], size: int, on_bad_image: str = "skip"):
        self.files, self.size, self.on_bad_image = files, size, on_bad_image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, decode(self.files[i], self.size)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            if self.on_bad_image == "error":
                raise DataError(f"cannot read image {self.files[i]}: {e}") from e
            return i, None


def _collate(items):
    return items


@dataclass
class ImageArray:
    """A decoded folder: ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int64, bad files removed."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, generator: torch.Generator, start: int = 0, rank: int = 0, world: int = 1):
        """``(step, uint8 NCHW batch)`` for one epoch; see :func:`batch_indices`."""
        for step, idx in batch_indices(len(self), batch_size, generator, start, rank, world, self.images.device):
            yield step, self.images[idx].permute(0, 3, 1, 2)


def shared_files(a: ImageArray, b: ImageArray) -> torch.Tensor:
    """Boolean mask over ``a``'s images: the file is also one of ``b``'s. Files are told apart by device and
    inode, so the same file reached by another spelling, a symlink or a hard link counts as shared."""
    def identity(path):
        try:
            st = os.stat(path)
        except OSError:  # gone since it was decoded: its path is all there is to compare
            return os.path.abspath(path)
        return st.st_dev, st.st_ino

    theirs = {identity(f) for f in b.files}
    return torch.tensor([identity(f) in theirs for f in a.files], dtype=torch.bool)


class _BatchDecoder(Dataset):
    """Decodes a list of indices into one (B, H, W, 3) uint8 batch. A bad file is replaced by the next
    readable one in the folder, so every batch keeps its size (processes must agree on it); the bad files
    come back with the batch to be named."""

    def __init__(self, files: list[str], size: int, on_bad_image: str):
        self.files, self.size, self.on_bad_image = files, size, on_bad_image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, indices: list[int]):
        out = np.empty((len(indices), self.size, self.size, 3), dtype=np.uint8)
        bad = []
        for j, i in enumerate(indices):
            for k in range(i, i + len(self.files)):
                path = self.files[k % len(self.files)]
                try:
                    out[j] = decode(path, self.size)
                    break
                except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                    if self.on_bad_image == "error":
                        raise DataError(f"cannot read image {path}: {e}") from e
                    bad.append(path)
            else:
                raise DataError(f"no readable images among the {len(self.files)} files of the folder")
        return torch.from_numpy(out), bad


@dataclass
class ImageStream:
    """A folder decoded batch by batch in ``workers`` DataLoader processes, every epoch: for folders whose
    decoded array would not fit the disk or memory (ImageNet at 224 px is ~190 GB). Yields exactly the
    batches an :class:`ImageArray` of the same folder yields, except that a bad file, found only when read,
    is replaced by the next readable one and added to ``skipped``."""

    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    size: int
    workers: int = 2
    on_bad_image: str = "skip"
    pin_memory: bool = False  # page-locked batches, for asynchronous copies to a GPU
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, generator: torch.Generator, start: int = 0, rank: int = 0, world: int = 1):
        """``(step, uint8 NCHW batch)`` for one epoch; see :func:`batch_indices`."""
        steps = [(step, idx.tolist()) for step, idx in batch_indices(len(self), batch_size, generator, start, rank, world)]
        loader = DataLoader(_BatchDecoder(self.files, self.size, self.on_bad_image), batch_size=None,
                            sampler=[idx for _, idx in steps], num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.workers else None,
                            generator=torch.Generator())  # its own seed source: the global RNG drives augmentation
        for (step, _), (images, bad) in zip(steps, loader):
            for path in bad:
                if path not in self.skipped:
                    log.warning("skipped unreadable image %s (replaced by the next readable one)", path)
                    self.skipped.append(path)
            yield step, images.permute(0, 3, 1, 2)


def open_stream(root: str | Path, size: int, workers: int = 2, on_bad_image: str = "skip") -> ImageStream:
    """An :class:`ImageStream` over every image below ``root``; nothing is decoded yet."""
    found = find_images(root)
    return ImageStream([str(f) for f in found.files], torch.tensor(found.labels, dtype=torch.int64),
                       found.classes, size, workers, on_bad_image)


def _cache_key(images: ImageList, size: int) -> str:
    h = hashlib.sha1(f"simxent-v1 {size}\n".encode())
    for f in images.files:
        try:
            st = f.stat()
            nbytes, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a dangling link or a vanished file: decoding will name it
            nbytes = mtime = -1
        h.update(f"{f.relative_to(images.root)}\t{nbytes}\t{mtime}\n".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIMXENT_CACHE", Path.home() / ".cache" / "simxent"))


def load_folder(
    root: str | Path,
    size: int,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    on_bad_image: str = "skip",
    progress: bool = True,
) -> ImageArray:
    """Decode every image of ``root`` at ``size`` px, or reuse the cached array of an unchanged folder.

    With ``cache``, images are decoded straight into a memory-mapped file under ``cache_dir`` (disk, not
    RAM, bounds the folder's size: N * size^2 * 3 bytes); without it, into memory.

    The cache is keyed by each file's relative path, byte size and modification time, so any change to
    the folder decodes it anew. Bad files are skipped with a warning naming each (``on_bad_image=skip``)
    or stop the run naming the first (``error``).
    """
    found = find_images(root)
    key = _cache_key(found, size) if cache else ""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if cache and array_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        good, bad = np.asarray(meta["good"], dtype=np.int64), meta["bad"]
        images = np.load(array_path, mmap_mode="r")[: len(good)]
    else:
        if cache:
            _check_disk(cache_dir, len(found.files) * size * size * 3, found.root)
        images, good, bad = _decode_all(found, size, workers, on_bad_image, progress,
                                        into=array_path if cache else None)
        if cache:
            _write_meta(good, bad, found, meta_path)
    skipped = [str(found.files[i]) for i in bad]
    _report_skipped(skipped, found.root)
    if len(good) == 0:
        raise DataError(f"no readable images in {found.root} ({len(skipped)} files could not be read)")
    labels = torch.as_tensor(np.asarray(found.labels, dtype=np.int64)[good])
    return ImageArray(
        images=_as_tensor(images),
        labels=labels,
        classes=found.classes,
        files=[str(found.files[i]) for i in good],
        skipped=skipped,
    )


def load_configured(root: str | Path, data: DataConfig, progress: bool = True, **changes) -> ImageArray:
    """:func:`load_folder` of ``root`` with the size, cache and decoding options of a ``data`` config section;
    ``changes`` replace some of them (``cache``, ``workers``)."""
    opts = dict(cache=data.cache, cache_dir=data.cache_dir or None, workers=data.workers,
                on_bad_image=data.on_bad_image, progress=progress)
    return load_folder(root, data.image_size, **{**opts, **changes})


def _check_disk(cache_dir: Path, needed: int, root: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise DataError(f"decoding {root} needs {needed / 1e9:.1f} GB in the cache {cache_dir}, which has "
                        f"{free / 1e9:.1f} GB free: set data.cache_dir to a larger disk, lower data.image_size, "
                        f"or stream the folder with data.stream=true")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # A read-only memmap is shared between runs; torch warns on non-writable arrays, we never write.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _decode_all(found: ImageList, size: int, workers: int, on_bad_image: str, progress: bool,
                into: Path | None = None):
    """Decode in file order, packing the readable images at the front of the array.

    With ``into``, the array is a memory-mapped file written in place and renamed to ``into`` when
    complete, so a folder larger than memory decodes to disk and never needs to fit in RAM.
    """
    n = len(found.files)
    shape = (n, size, size, 3)
    if into is None:
        out = np.empty(shape, dtype=np.uint8)
    else:
        into.parent.mkdir(parents=True, exist_ok=True)
        tmp = into.with_suffix(f".tmp{os.getpid()}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    good = []
    loader = DataLoader(DecodedFiles(found.files, size, on_bad_image), batch_size=64, num_workers=workers,
                        collate_fn=_collate)
    for batch in tqdm(loader, desc=f"decoding {found.root}", unit="batch", disable=not progress, leave=False):
        for i, img in batch:
            if img is not None:
                out[len(good)] = img
                good.append(i)
    if into is not None:
        out.flush()
        os.replace(tmp, into)
    bad = sorted(set(range(n)) - set(good))
    return out[: len(good)], np.asarray(good, dtype=np.int64), bad


def _write_meta(good: np.ndarray, bad: list[int], found: ImageList, meta_path: Path) -> None:
    """Written after the array, through a temporary file and an atomic rename: a cache entry without its
    metadata is never used."""
    tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"root": str(found.root), "good": good.tolist(), "bad": bad}))
    os.replace(tmp, meta_path)


def _report_skipped(skipped: list[str], root: Path) -> None:
    if skipped:
        names = "\n  ".join(skipped[:20]) + ("\n  ..." if len(skipped) > 20 else "")
        log.warning("skipped %d unreadable image(s) in %s:\n  %s", len(skipped), root, names)


def batch_indices(n: int, batch_size: int, generator: torch.Generator, start: int = 0, rank: int = 0,
                  world: int = 1, device: torch.device | str = "cpu"):
    """Yield ``(step, sorted indices)`` of this process's share of each global batch of one epoch: a fresh
    random order each call, last partial batch dropped.

    ``batch_size`` is the global batch: every process draws the same order and takes its own contiguous
    ``batch_size / world`` slice of each batch, so the global batches do not depend on the number of
    processes. ``start`` skips the first batches of the epoch, so a resumed run sees the same images.
    The order moves to ``device`` once per epoch, not once per batch (each copy would wait for the GPU).
    """
    order = torch.randperm(n, generator=generator).to(device)
    local = batch_size // world
    for step in range(start, n // batch_size):
        idx = order[step * batch_size + rank * local : step * batch_size + (rank + 1) * local]
        yield step, idx.sort().values  # sorted reads are kinder to a memory-mapped file


def iterate_batches(data: ImageArray | ImageStream, batch_size: int, generator: torch.Generator, start: int = 0,
                    rank: int = 0, world: int = 1):
    """Yield ``(step, uint8 NCHW batch)`` for one epoch of a decoded or a streamed folder."""
    return data.batches(batch_size, generator, start, rank, world)
