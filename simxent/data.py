"""Image folders: discovery, robust decoding, the decoded-image cache, streaming, and batch iteration.

A source of training images is a folder (:func:`find_images`), a text file listing image paths
(:func:`read_image_list`) or a user's Dataset of images (:func:`dataset_images`); each becomes an
:class:`ImageList`, and everything below reads an ImageList the same way.

A folder is read once into a uint8 array (N, H, W, 3) (:class:`Layout`): a folder of square images no larger
than the view as size x size squares; any other folder for training with each
image's longer side at ``decode_size``, aspect ratio kept, stored top-left and its true size recorded, so
that crops are drawn over the whole photograph; for evaluation, the ImageNet protocol (shorter side to
size / crop_ratio, centre crop). Random augmentation happens later, batched on the training device
(:mod:`simxent.augment`), so decoding is the only per-image work and it is done once per folder.
Folders too large to keep decoded stream instead (:class:`ImageStream`): decoded in DataLoader workers
every epoch, where the crops of images larger than the view (or not square) are taken from the
full-resolution image.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import stat
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .augment import CROP_RATIO, crop_boxes
from .config import DataConfig
from .runtime import show_progress_bars
from .files import (folder_problem, is_disk_full, remove_dead_temp_files, reserve, temp_path, write_text_atomic,
                    writer_lock)
from .rundir import LOCK_FILE, OUTPUT_MARK, RUN_FOLDERS

log = logging.getLogger("simxent")

IRREGULAR = "not a regular file (FIFO, device or socket): never opened"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm", ".pnm"}
if ".avif" in Image.registered_extensions():  # Pillow 11.3 and later decode AVIF
    IMAGE_SUFFIXES.add(".avif")
# Photographs in formats Pillow does not decode: left out, but counted in a warning instead of vanishing.
UNREAD_SUFFIXES = {".heic", ".heif", ".jxl", ".svg", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2",
                   ".tga", ".jp2", ".j2k", ".ico", ".qoi"}


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
    """The files of a folder and, when it has class sub-folders, their labels (-1 when unlabelled).

    ``kind``: ``folder``; ``list`` (the files a text file names, ``root`` being that file; unlabelled); or
    ``dataset`` (``files`` are :class:`DatasetItem`, unlabelled), whose decoded array is cached under
    ``cache_name`` (with the dataset's length) and kept in memory only when it has none."""

    root: Path | str
    files: list
    labels: list[int]
    classes: list[str]
    irregular: list[Path] = field(default_factory=list)  # image-named FIFOs, devices, sockets: never opened
    kind: str = "folder"
    cache_name: Optional[str] = None

    @property
    def cacheable(self) -> bool:
        return self.kind != "dataset" or bool(self.cache_name)

    @functools.cached_property
    def listing(self) -> bytes:
        """:func:`_listing`, made once per ImageList: it stats every file (or reads a dataset's items)."""
        return _listing(self)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and all(y >= 0 for y in self.labels)


def find_images(root: str | Path) -> ImageList:
    """All images below ``root`` at any depth; suffixes match case-insensitively.

    The first-level sub-folder of a file names its class; files directly under ``root`` are unlabelled.
    Symbolic links are followed, each real directory once, so a link loop cannot recurse forever; a folder
    reached again is named in a warning with the path its images were read under.
    Only regular files (after following links) are taken: reading a FIFO named ``x.jpg`` would block
    forever. The others are named in one warning and kept in ``irregular``; a dangling link stays in
    ``files``, so that decoding names it as unreadable. A sub-folder holding a simxent run (its lock file:
    ``out`` placed inside the image folder) is left out, named in a warning, and so are a run's own
    folders (figures, TensorBoard, ...) when ``root`` is itself a run's ``out``: its figures are not
    training images. Hidden files and folders below ``root`` (names beginning with ``.``: a notebook's
    ``.ipynb_checkpoints``, macOS's ``._photo.jpg`` companions) are left out, counted in a warning: they
    would be read as classes and as images.
    """
    root = Path(root)
    check_source(root)
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    files, irregular, unread, seen, runs, root_real = [], [], [], {}, [], os.path.realpath(root)
    hidden, again, tops = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            again.append((dirpath, seen[real]))
            dirnames[:] = []
            continue
        if (LOCK_FILE in filenames or OUTPUT_MARK in filenames) and real != root_real:
            runs.append(dirpath)
            dirnames[:] = []
            continue
        if LOCK_FILE in filenames:  # the image folder is itself a run's out: its outputs are not images
            dirnames[:] = [d for d in dirnames if d not in RUN_FOLDERS]
        seen[real] = dirpath
        hidden += [Path(dirpath) / d for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # The first-level folder, the class, once per folder: per file, path arithmetic dominated the walk.
        top = None if dirpath == os.fspath(root) else Path(dirpath).relative_to(root).parts[0]
        for name in sorted(filenames):
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith("."):
                hidden += [Path(dirpath) / name] if suffix in IMAGE_SUFFIXES else []
            elif suffix in IMAGE_SUFFIXES:
                path = os.path.join(dirpath, name)
                if _regular_or_missing(path):
                    files.append(Path(path))
                    tops.append(top)
                else:
                    irregular.append(Path(path))
            elif suffix in UNREAD_SUFFIXES:
                unread.append(Path(dirpath) / name)
    _report_irregular(irregular, root)
    _report_left_out(runs, unread, hidden, root)
    _report_reached_again(again, root)
    if not files:
        raise DataError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    index = {c: i for i, c in enumerate(sorted({t for t in tops if t is not None}))}
    return ImageList(root, files, [index.get(t, -1) for t in tops], list(index), irregular=irregular)


def class_difference(first: tuple[str, str | Path, list[str]], second: tuple[str, str | Path, list[str]]) -> str:
    """``only in A: [...]; only in B: [...]`` for two class listings, each (name, folder, classes), naming
    the missing classes that the other side holds as a folder without images: an empty class folder is no
    class (:func:`find_images` lists images), and a listing that omits it reads as wrong unless this says why."""
    (a, a_root, a_classes), (b, b_root, b_classes) = first, second
    only_a, only_b = sorted(set(a_classes) - set(b_classes)), sorted(set(b_classes) - set(a_classes))
    empty = [str(Path(root) / c) for root, names in ((b_root, only_a), (a_root, only_b)) for c in names
             if root and (Path(root) / c).is_dir()]  # no folder (a Python dataset): nothing to look in
    return f"only in {a}: {only_a or '-'}; only in {b}: {only_b or '-'}" + (
        f" ({', '.join(empty)}: no images)" if empty else "")


def _report_reached_again(again: list[tuple[str, str]], root: Path) -> None:
    """One warning for the folders reached a second time through links (``again``: that path, the first):
    a class is a first-level folder, so which path came first decided the images' class."""
    if again:
        log.warning("%d folder(s) in %s are reached twice through links, and their images read once, under the "
                    "first path (in sorted order; its class folder is their class): %s", len(again), root,
                    "; ".join(f"{later} is {first}" for later, first in again))


def _report_left_out(runs: list[str], unread: list[Path], hidden: list[Path], root: Path) -> None:
    """One warning for the run folders found inside ``root``, one for its images in UNREAD_SUFFIXES, one for
    its hidden files and folders."""
    if hidden:
        log.warning("left out %d hidden image file(s) and folder(s) in %s (names beginning with '.'), such as %s",
                    len(hidden), root, hidden[0])
    if runs:
        log.warning("left out %d simxent run or output folder(s) inside %s (their figures are not training "
                    "images): %s",
                    len(runs), root, ", ".join(runs))
    if unread:
        kinds = ", ".join(sorted({p.suffix.lower() for p in unread}))
        log.warning("left out %d image(s) in %s in formats simxent does not decode (%s; convert them to JPEG or "
                    "PNG), such as %s", len(unread), root, kinds, unread[0])


def _regular_or_missing(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # dangling or unreadable: decoding reports it by name
        return True


def _report_irregular(irregular: list[Path], root: Path) -> None:
    if irregular:
        log.warning("skipped %d image-named file(s) in %s that are not regular files (FIFO, device, socket): %s",
                    len(irregular), root, ", ".join(json.dumps(str(p)) for p in irregular))


def check_source(path: str | Path) -> None:
    """What can be said of an image source before it is read: it exists, and it is not a single image
    (a folder of images or a text file listing them is wanted)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image folder not found: {path}")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"{path} is an image: give a folder of images or a text file listing image paths")


def read_image_list(path: str | Path) -> ImageList:
    """The images a text file lists, one path per line, relative to the file's folder or absolute; blank
    lines and lines starting with ``#`` are skipped, spaces around a path ignored; a path listed twice is
    refused (it would count twice in every score). Unlabelled. A listed path that is missing or unreadable
    is a bad file, found and named when decoded."""
    path = Path(path)
    check_source(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a Windows editor's byte-order mark is no path
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file of image paths (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise DataError(f"cannot read the image list {path}: {e.strerror}") from None
    files, line_of = [], {}
    for number, entry in enumerate((line.strip() for line in text.splitlines()), 1):
        if entry and not entry.startswith("#"):
            file = path.parent / entry
            same = os.path.abspath(file)  # ./a.png, a.png and its absolute path are one image
            if same in line_of:
                raise DataError(f"{path}: {entry} is listed on lines {line_of[same]} and {number}; list each "
                                f"image once")
            line_of[same] = number
            files.append(file)
    if not files:
        raise DataError(f"no image paths listed in {path} (one path per line; # starts a comment)")
    return ImageList(path, files, [-1] * len(files), [], kind="list")


class DatasetItem:
    """Item ``index`` of a user's Dataset of images, standing where a file's path stands (:func:`_open_image`
    opens it); named ``NAME[index]`` in messages and lists of skipped images."""

    def __init__(self, dataset, index: int, name: str):
        self.dataset, self.index, self.name = dataset, index, name

    def __str__(self) -> str:
        return f"{self.name}[{self.index}]"

    __repr__ = __str__

    def open(self) -> Image.Image:
        return item_image(self.dataset[self.index])


def item_image(item) -> Image.Image:
    """A Dataset item as a PIL image of its own (decoding may change it; the user's object stays as it was).

    The item is a PIL image, or uint8 pixels (tensor or numpy array): CHW with 1, 3 or 4 channels (torch's
    layout, checked first), HWC, or 2-D grey. A tuple or list is read by its first element, so an
    ``(image, label)`` dataset serves as it is. The pixels are taken as given: EXIF orientation is dropped."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, Image.Image):
        im = item.copy()
        im.getexif().pop(0x0112, None)  # Orientation: the dataset's pixels are already the image it means
        return im
    if isinstance(item, np.ndarray) and not item.flags.writeable:
        item = item.copy()  # torch warns on a read-only array (np.asarray of a PIL image is one)
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return _pixels_image(torch.as_tensor(item))
    raise TypeError(f"the item is a {type(item).__name__}, not a PIL image or uint8 pixels")


def _pixels_image(x: torch.Tensor) -> Image.Image:
    if x.dtype != torch.uint8:
        raise TypeError(f"the item is a {x.dtype} tensor: give uint8 pixels (0 to 255)")
    if x.ndim == 3 and x.shape[0] in (1, 3, 4):
        x = x.permute(1, 2, 0)  # CHW -> HWC
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (3, 4))) or 0 in x.shape:
        raise TypeError(f"the item's pixels have shape {tuple(x.shape)}: give CHW or HWC with 1, 3 or 4 channels")
    return Image.fromarray(x.cpu().contiguous().numpy())


def dataset_images(dataset, cache_name: Optional[str] = None) -> ImageList:
    """A user's Dataset of images (any object with ``__len__`` and ``__getitem__``; see :func:`item_image`)
    as an unlabelled :class:`ImageList`. Items are read when decoded, in ``data.workers`` processes, and
    must be the same for the same index (a resumed run reads them again). ``cache_name`` keys the decoded
    array in the cache, with the dataset's length and the pixels of eight of its items: change it when
    other items change."""
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"a {type(dataset).__name__} is not a dataset of images (it has no length)") from None
    name = cache_name or type(dataset).__name__
    if n == 0:
        raise DataError(f"the dataset {name} is empty")
    files = [DatasetItem(dataset, i, name) for i in range(n)]
    return ImageList(f"dataset {name}", files, [-1] * n, [], kind="dataset", cache_name=cache_name)


def names_base(source: str | Path) -> Path:
    """What the images of a folder, or of a list file (whose entries are relative to its own folder), are
    named relative to: the folder, or the list's folder."""
    source = Path(source)
    return source.parent if source.is_file() else source


def find_source(source: str | Path | ImageList) -> ImageList:
    """The images of ``source``: an :class:`ImageList` as it is; a path to a file, the images it lists
    (:func:`read_image_list`); any other path, the images below that folder (:func:`find_images`)."""
    if isinstance(source, ImageList):
        return source
    if Path(source).is_file():
        return read_image_list(source)
    return find_images(source)


def _white_level(mode: str, a: np.ndarray, image_format: Optional[str] = None) -> float:
    """The value that stands for white in a 16-bit, 32-bit or float grey image: 65535 for 16-bit modes, and
    for a PGM or PNG of mode I (Pillow scales a PGM's maxval to 65535, and older Pillows open a 16-bit PNG
    as I); for float images 1 when no pixel exceeds it (the [0, 1] convention of float images), then 255
    when none exceeds that, else 65535; for other 32-bit integers 255 or 65535 the same way."""
    if mode.startswith("I;16") or (mode == "I" and image_format in ("PPM", "PNG")):
        return 65535.0
    top = float(np.nanmax(a)) if a.size else 0.0
    if mode == "F" and top <= 1.0:
        return 1.0
    return 255.0 if top <= 255.0 else 65535.0


def _to_rgb(im: Image.Image, image_format: Optional[str] = None) -> Image.Image:
    """RGB from any PIL mode: grey, palette, CMYK, 16-bit, 32-bit and float grey (scaled to 8 bits by
    :func:`_white_level`; NaN is black); an alpha channel, or a palette's transparent colour, composited onto
    white. The transparent colour of a grey or RGB PNG (tRNS) is ignored, as torchvision's loader ignores it."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a / _white_level(im.mode, a, image_format or im.format) * 255.0 + 0.5, nan=0.0)
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


@contextmanager
def _open_image(path: str | Path):
    """PIL's lazy image (header read, pixels not yet): a decompression bomb fails instead of warning. A
    :class:`DatasetItem` gives its item's image."""
    if isinstance(path, DatasetItem):
        yield path.open()
        return
    with warnings.catch_warnings():
        # A decompression bomb must fail, not warn; other PIL warnings are noise here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            _check_jpeg_length(im, path)
            yield im


# Arithmetic-coded JPEG frames (SOF9-11, SOF13-15): their scans can be shorter than the bound below.
_ARITHMETIC_SOF = tuple(bytes([0xFF, m]) for m in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _check_jpeg_length(im: Image.Image, path) -> None:
    """Refuse a JPEG too short to hold the image its header declares. libjpeg fills a scan that ends early
    with grey and only warns, so a truncated file would pass as a grey image. A Huffman-coded scan spends
    at least one bit on each 8x8 block of the first component (its DC difference), so a whole image needs
    at least ceil(W/8) * ceil(H/8) / 8 bytes."""
    if im.format != "JPEG":
        return
    w, h = im.size
    nbytes = os.path.getsize(path)
    if nbytes * 8 >= -(-w // 8) * -(-h // 8):
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    sos = head.find(b"\xff\xda")
    if sos < 0 or any(m in head[:sos] for m in _ARITHMETIC_SOF):
        return  # header longer than we read, or arithmetic coding: the bound does not apply
    raise OSError(f"truncated JPEG: {nbytes} bytes cannot hold the {w}x{h} image its header declares")


def _upright(im: Image.Image) -> Image.Image:
    return _to_rgb(ImageOps.exif_transpose(im), im.format)  # the transposed copy has no format


def image_extent(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the upright image (EXIF rotation applied), from its header alone."""
    with _open_image(path) as im:
        return image_extent_of(im)


def decode(path: str | Path, size: int) -> np.ndarray:
    """Decode one file to a (size, size, 3) uint8 array: EXIF rotation, RGB, shorter side to ``size``,
    centre crop. Raises OSError, ValueError or PIL's errors on an unreadable file."""
    with _open_image(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
        im = ImageOps.fit(_upright(im), (size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def decode_within(path: str | Path, side: int) -> np.ndarray:
    """Decode one file to (h, w, 3) uint8 with its aspect ratio: the longer side at ``side`` px, or the
    original size when smaller (never enlarged)."""
    with _open_image(path) as im:
        scale = min(1.0, side / max(im.size))
        im.draft("RGB", tuple(max(1, math.ceil(v * scale)) for v in im.size))
        im = _upright(im)
        w, h = im.size
        scale = min(1.0, side / max(w, h))
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def decode_eval(path: str | Path, size: int, crop_ratio: float) -> np.ndarray:
    """The evaluation transform, to (size, size, 3) uint8: an image larger than the view (either side above
    ``size``) has its shorter side resized to R = round(size / crop_ratio) (bilinear, antialiased; the
    longer side to int(R * long / short)) and the central size x size kept, as torchvision's
    ``Resize(R)`` then ``CenterCrop(size)`` on a PIL image; any other image is decoded as by :func:`decode`.
    A JPEG is decoded whole: PIL's reduced-scale decoding (``draft``) would move pixels by several levels and
    round the sides differently, and evaluation is the standard protocol."""
    if max(image_extent(path)) <= size:
        return decode(path, size)
    with _open_image(path) as im:
        short = round(size / crop_ratio)
        im = _upright(im)
        w, h = im.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        im = im.resize(new, Image.Resampling.BILINEAR)
        top, left = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def image_extent_of(im: Image.Image) -> tuple[int, int]:
    """:func:`image_extent` of an open image."""
    w, h = im.size
    turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap the sides
    stored = getattr(im, "tag_v2", None)  # a TIFF's tags: its stored width and length
    if turned and stored is not None and (stored.get(256), stored.get(257)) == (h, w) != (w, h):
        turned = False  # Pillow 11 and later give a turned TIFF its upright size at once
    return (w, h) if turned else (h, w)


def view_boxes(height: int, width: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """The two views' crop boxes ``(top, left, h, w)`` over a ``height`` x ``width`` image, (2, 4) int64,
    drawn as torchvision's RandomResizedCrop (:func:`simxent.augment.crop_boxes`)."""
    return crop_boxes(2, height, width, scale, CROP_RATIO, generator=generator).long()


def decode_views(path: str | Path, size: int, scale: tuple[float, float],
                 generator: torch.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """Two random crops of one file, each resized to (size, size, 3) uint8 (PIL bilinear, antialiased), and
    their boxes over the upright original image (see :func:`view_boxes`).

    The boxes are drawn over the original size, read from the header; a JPEG is then decoded at the
    largest reduction (1/2, 1/4, 1/8) that still leaves each box at least ``size`` px on its shorter side:
    several times faster for large photographs, at the price of pixels a few levels from torchvision's
    (libjpeg's scaled decode is a block average, not the antialiased resize's triangle filter)."""
    with _open_image(path) as im:
        height, width = image_extent_of(im)
        boxes = view_boxes(height, width, scale, generator)
        reduction = boxes[:, 2:].min().item() / size
        if reduction >= 2:
            im.draft("RGB", tuple(math.ceil(v / reduction) for v in im.size))
        im = _upright(im)
        sx, sy = im.size[0] / width, im.size[1] / height
        views = np.empty((2, size, size, 3), dtype=np.uint8)
        for view, (top, left, h, w) in zip(views, boxes.tolist()):
            if (sx, sy) == (1, 1):  # full size: crop, then resize, as torchvision's resized_crop
                crop = im.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
            else:  # the box in the reduced image's coordinates, fractional
                box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                crop = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
            view[:] = np.asarray(crop, dtype=np.uint8)
        return views, boxes


def bad_image_reason(e: BaseException, path: str | Path) -> str:
    """Why a file could not be decoded, in one short line: the exception's class and the first line of its
    message, without the file's name (it is given beside the reason):
    ``UnidentifiedImageError: cannot identify image file``, ``OSError: image file is truncated ...``."""
    message = str(e).splitlines()[0] if str(e) else ""
    for name in (repr(str(path)), str(path)):
        message = message.replace(name, "")
    message = " ".join(message.split()).rstrip(" :")
    if len(message) > 120:
        message = message[:117] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def bad_image_error(path, reason: str) -> DataError:
    """What stops a load on a bad file under ``data.on_bad_image=error``: one line naming it and why."""
    return DataError(f"cannot read image {path}: {reason} (data.on_bad_image=error)")


class DecodedFiles(Dataset):
    """Dataset over files that yields ``(index, HWC uint8 array or None, reason or None)``; an array of None
    marks a bad file and the reason says why (the reader decides whether that stops: an exception raised in
    a DataLoader worker reaches the main process as a page of traceback). ``decoder(path)`` makes the
    array (:func:`decode` at ``size`` when not given)."""

    def __init__(self, files: list[Path], size: int, decoder: Optional[Callable[[Path], np.ndarray]] = None):
        self.files = files
        self.decoder = decoder or partial(decode, size=size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.decoder(self.files[i]), None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            return i, None, bad_image_reason(e, self.files[i])


def _collate(items):
    return items


@dataclass
class Batch:
    """One process's share of a training batch, for :meth:`simxent.augment.ViewAugment.views`.

    ``images`` uint8 NCHW are whole images (B, 3, S, S); or, with ``sizes`` (B, 2), images of true
    (height, width) stored top-left in a padded (B, 3, D, D); or, with ``cropped``, the two views' crops
    already taken (2B, 3, S, S), view 1 first."""

    images: torch.Tensor
    sizes: Optional[torch.Tensor] = None
    cropped: bool = False

    def __len__(self) -> int:
        return len(self.images) // 2 if self.cropped else len(self.images)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        sizes = None if self.sizes is None else self.sizes.to(device, non_blocking=non_blocking)
        return Batch(self.images.to(device, non_blocking=non_blocking), sizes, self.cropped)


@dataclass
class ImageArray:
    """A decoded folder: ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int64, bad files removed and
    named in ``skipped``, with why each could not be read in ``reasons``. ``sizes`` (N, 2) int64: each
    image's true (height, width) where images are stored top-left in a larger padded array (:class:`Layout`
    ``padded``); None where every image fills it."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str]
    skipped: list[str]
    sizes: Optional[torch.Tensor] = None
    reasons: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, generator: torch.Generator, start: int = 0, rank: int = 0, world: int = 1):
        """``(step, Batch)`` for one epoch; see :func:`batch_indices`."""
        for step, idx in batch_indices(len(self), batch_size, generator, start, rank, world, self.images.device):
            sizes = None if self.sizes is None else self.sizes[idx.to(self.sizes.device)]
            yield step, Batch(self.images[idx].permute(0, 3, 1, 2), sizes)


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


def copied_images(a: ImageArray, b: ImageArray, chunk: int = 4096) -> torch.Tensor:
    """Boolean mask over ``a``'s images: its decoded pixels are those of one of ``b``'s, a copy under another
    name (``cp -r`` of a folder) that :func:`shared_files` cannot see. Compared by a 128-bit hash of each
    image's bytes, read in chunks so that a memory-mapped array is never loaded whole."""
    def digests(data: ImageArray) -> list[bytes]:
        out = []
        for start in range(0, len(data), chunk):
            rows = data.images[start:start + chunk].cpu().numpy()
            out += [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
        return out

    theirs = set(digests(b))
    return torch.tensor([d in theirs for d in digests(a)], dtype=torch.bool)


class _BatchDecoder(Dataset):
    """Decodes ``(indices, seed)`` into one batch: (B, S, S, 3) uint8 squares when every image is square and
    no larger than the view (S px each side), else (2B, S, S, 3), both views' crops of each image (view 1
    first) drawn over its full size by a generator seeded with ``seed``. A bad file is replaced by the next
    readable one in the folder, so every batch keeps its size (processes must agree on it); the bad files
    come back with the batch to be named, each with the reason it could not be read (the reader stops on
    them under ``data.on_bad_image=error``). No file readable: the batch's images are None."""

    def __init__(self, files: list[str], size: int, crop_scale: tuple[float, float]):
        self.files, self.size, self.crop_scale = files, size, crop_scale

    def __len__(self) -> int:
        return len(self.files)

    def _cropped_here(self, path: str) -> bool:
        """Larger than the view, or not square: a centre square would cut off what crops can reach."""
        try:
            height, width = image_extent(path)
            return max(height, width) > self.size or height != width
        except Exception:  # noqa: BLE001 - an unreadable file is found and named when decoded
            return False

    def __getitem__(self, item: tuple[list[int], int]):
        indices, seed = item
        cropped = any(self._cropped_here(self.files[i]) for i in indices)
        generator = torch.Generator().manual_seed(seed)
        out = np.empty((2 if cropped else 1, len(indices), self.size, self.size, 3), dtype=np.uint8)
        bad = []
        for j, i in enumerate(indices):
            for k in range(i, i + len(self.files)):
                path = self.files[k % len(self.files)]
                try:
                    if cropped:
                        out[:, j] = decode_views(path, self.size, self.crop_scale, generator)[0]
                    else:
                        out[0, j] = decode(path, self.size)
                    break
                except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                    bad.append((str(path), bad_image_reason(e, path)))
            else:  # said by the main process: raised in a worker, it would come wrapped in the worker's traceback
                return None, cropped, bad
        return torch.from_numpy(out).flatten(0, 1), cropped, bad


def crop_seed(base: int, step: int, rank: int) -> int:
    """The seed of one streamed batch's crops: a function of the epoch's ``base`` seed, the step and the
    process, so a resumed run (or any number of workers) draws the same crops."""
    return int(np.random.SeedSequence([base, step, rank]).generate_state(1)[0])



STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
_forked_by_the_main_thread = False  # set by start_workers before it forks


def leave_stop_signals_to_the_main_process(_worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: the worker leaves the run's process group, so that a
    SIGTERM or SIGINT to the group (torchrun, SLURM, docker, Ctrl-C) reaches the main process alone, which
    finishes its step, checkpoints and then ends its workers; a worker killed by it took the run down before
    its checkpoint. The worker was forked with both blocked (:func:`start_workers`): any that came meanwhile
    is dropped, and the defaults come back, so that torch can still end a worker with SIGTERM.

    Out of the group, a worker would outlive a run killed outright (SIGKILL, the out-of-memory killer),
    holding its files and a pipe's end open (``| tee`` never ended): on Linux it asks the kernel to kill
    it when the process that forked it dies. Only for workers that the main thread forked: the kernel
    counts the forking thread as the parent, and a user's short-lived thread would take its workers along."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux") and _forked_by_the_main_thread:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def start_workers(loader: DataLoader):
    """``iter(loader)``, its workers forked with SIGTERM and SIGINT blocked, so that none dies of a signal
    to the process group before its ``worker_init_fn`` ignores them (new workers start every epoch of a
    stream, just after the epoch's checkpoint); this process gets any that came meanwhile once they are
    unblocked."""
    if not loader.num_workers:
        return iter(loader)
    global _forked_by_the_main_thread  # read by the forked workers (leave_stop_signals_to_the_main_process)
    _forked_by_the_main_thread = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

@dataclass
class ImageStream:
    """A folder decoded batch by batch in ``workers`` DataLoader processes, every epoch: for folders whose
    decoded array would not fit the disk or memory (ImageNet at 224 px is ~190 GB).

    A batch of square images no larger than the view (``size``) is exactly the batch an :class:`ImageArray`
    of the same folder yields. A batch holding a larger (or non-square) image comes as both views' crops (``Batch.cropped``): each
    image's two boxes are drawn over its full size (torchvision's RandomResizedCrop, ``crop_scale``) by the
    worker, from a seed drawn from the epoch's generator, and only the boxes are resized. A bad file,
    found only when read, is replaced by the next readable one and added to ``skipped`` (why, to
    ``reasons``)."""

    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    size: int
    workers: int = 2
    on_bad_image: str = "skip"
    pin_memory: bool = False  # page-locked batches, for asynchronous copies to a GPU
    skipped: list[str] = field(default_factory=list)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    reasons: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, generator: torch.Generator, start: int = 0, rank: int = 0, world: int = 1):
        """``(step, Batch)`` for one epoch; see :func:`batch_indices`."""
        steps = [(step, idx.tolist()) for step, idx in batch_indices(len(self), batch_size, generator, start, rank, world)]
        base = int(torch.randint(2**62, (1,), generator=generator))  # after the order: the order is unchanged
        decoder = _BatchDecoder(self.files, self.size, self.crop_scale)
        loader = DataLoader(decoder, batch_size=None, sampler=[(idx, crop_seed(base, step, rank)) for step, idx in steps],
                            num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.workers else None,
                            worker_init_fn=leave_stop_signals_to_the_main_process,
                            generator=torch.Generator())  # its own seed source: the global RNG drives augmentation
        for (step, _), (images, cropped, bad) in zip(steps, start_workers(loader)):
            if bad and self.on_bad_image == "error":
                raise bad_image_error(*bad[0])
            if images is None:
                raise DataError(f"no readable images among the {len(self.files)} files streamed, such as {bad[0][0]} "
                                f"({bad[0][1]})")
            for path, reason in bad:
                if path not in self.skipped:
                    log.warning("skipped unreadable image %s (%s; replaced by the next readable one)", path, reason)
                    self.skipped.append(path)
                    self.reasons[path] = reason
            yield step, Batch(images.permute(0, 3, 1, 2), cropped=cropped)


def open_stream(root: str | Path | ImageList, size: int, workers: int = 2, on_bad_image: str = "skip",
                crop_scale: tuple[float, float] = (0.08, 1.0)) -> ImageStream:
    """An :class:`ImageStream` over every image of a source (:func:`find_source`); nothing is decoded yet."""
    found = find_source(root)
    files = found.files if found.kind == "dataset" else [str(f) for f in found.files]
    return ImageStream(files, torch.tensor(found.labels, dtype=torch.int64),
                       found.classes, size, workers, on_bad_image, crop_scale=crop_scale,
                       skipped=[str(f) for f in found.irregular],
                       reasons={str(f): IRREGULAR for f in found.irregular})


@dataclass(frozen=True)
class Layout:
    """How a folder's decoded array holds its images, (N, side, side, 3) uint8:

    - ``square``: every image at ``size`` x ``size``, shorter side resized and centre crop (:func:`decode`);
      the layout of a folder whose images are all square and no larger than the view.
    - ``padded``: for training on larger images, each image's longer side at ``side`` px or its own size if
      smaller (:func:`decode_within`), aspect ratio kept, stored top-left; the true sizes are recorded.
    - ``eval``: the evaluation transform (:func:`decode_eval` with ``crop_ratio``) at ``size`` px."""

    kind: str
    size: int
    side: int
    crop_ratio: float = 0.0

    def key(self) -> str:
        return f"{self.kind} {self.size} {self.side} {float(self.crop_ratio)!r}"

    def decoder(self) -> Callable[[Path], np.ndarray]:
        if self.kind == "padded":
            return partial(decode_within, side=self.side)
        if self.kind == "eval":
            return partial(decode_eval, size=self.size, crop_ratio=self.crop_ratio)
        return partial(decode, size=self.size)


def decode_side(size: int, decode_size: Optional[int] = None) -> int:
    """``data.decode_size``, or by default 1.5 x the view: a 3:2 photograph's shorter side then still holds
    the view's pixels."""
    return decode_size or round(1.5 * size)


def _listing(images: ImageList) -> bytes:
    """What a cache entry stands for besides its layout: a folder's resolved path, then each file's path
    (relative to the folder, absolute from a list), size, modification time and change time, a line each;
    for a dataset, its cache name, length and a digest of eight items' pixels. Made once per ImageList
    (:attr:`ImageList.listing`): it stats every file, and each layout's key, and an embedding's digest of the
    listing, reuse it.
    The change time (st_ctime) is there because the modification time can be set back (``cp -p``,
    ``rsync -t``, ``tar x``): a file replaced by another of the same size and time is new to it. The folder's
    own path is part of it: two folders of files with the same names, sizes and times (BMPs unpacked from
    one archive) are different images."""
    if images.kind == "dataset":
        return f"dataset\t{images.cache_name}\t{len(images.files)}\t{_dataset_sample(images.files)}\n".encode()
    lines = [f"folder\t{Path(images.root).resolve()}\n"] if images.kind == "folder" else []
    prefix = os.path.join(str(images.root), "")
    for f in images.files:
        try:
            st = os.stat(f)
            nbytes, mtime, ctime = st.st_size, st.st_mtime_ns, st.st_ctime_ns
        except OSError:  # a dangling link or a vanished file: decoding will name it
            nbytes = mtime = ctime = -1
        if images.kind != "folder":
            name = os.path.abspath(f)
        else:  # f.relative_to(root), by string where the walk made f from root's own string: far faster
            text = str(f)
            name = text[len(prefix):] if text.startswith(prefix) else f.relative_to(images.root)
        lines.append(f"{name}\t{nbytes}\t{mtime}\t{ctime}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")  # a name that is not UTF-8: its own bytes


def listing_digest(images: ImageList) -> str:
    """sha1 of :func:`_listing`: it changes when a file of ``images`` is added, removed, renamed, resized or
    rewritten, as the cache's key does."""
    return hashlib.sha1(images.listing).hexdigest()


def _dataset_sample(items: list) -> str:
    """sha1 of eight items' pixels, spread over the dataset: a cache name used again for other images of the
    same count then keys another entry, instead of training on the earlier images. (Items that change
    elsewhere still need a new ``cache_name``.)"""
    digest, n = hashlib.sha1(), len(items)
    for i in sorted({round(j * (n - 1) / 7) for j in range(8)}):
        try:
            with _open_image(items[i]) as im:
                digest.update(f"{im.size} {im.mode}\n".encode() + im.tobytes())
        except Exception:  # noqa: BLE001 - a bad item is named when decoded
            digest.update(b"unreadable\n")
    return digest.hexdigest()


def _cache_key(listing: bytes, layout: Layout) -> str:
    """sha1 of the layout and the folder's :func:`_listing`, shortened. The version before them changes
    with what decoding makes of a file or which layout holds it (v3: float images read by their range; v4:
    evaluation decodes JPEGs whole, and only square images are stored square; v5: 16-bit PGMs scaled from
    their maxval, turned TIFFs' sides), so no stale pixels are read."""
    return hashlib.sha1(f"{CACHE_VERSION} {layout.key()}\n".encode() + listing).hexdigest()[:20]


CACHE_VERSION = "simxent-v5"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIMXENT_CACHE") or Path.home() / ".cache" / "simxent")  # set but empty: unset


def _extents(paths: list[Path]) -> list[Optional[tuple[int, int]]]:
    """Each file's :func:`image_extent`, None for one that cannot be read (decoding names it later)."""
    out = []
    for path in paths:
        try:
            out.append(image_extent(path))
        except Exception:  # noqa: BLE001 - any failure is a bad file
            out.append(None)
    return out


def all_square_within_view(found: ImageList, size: int, workers: int) -> bool:
    """Whether every readable image of the folder is square and no larger than ``size`` (headers only): the
    folders whose ``square`` entry serves training and evaluation alike (either would cut the sides of a
    non-square image differently)."""
    loader = DataLoader(found.files, batch_size=256, num_workers=workers, collate_fn=_extents,
                        worker_init_fn=leave_stop_signals_to_the_main_process)
    return all(max(e) <= size and e[0] == e[1] for batch in start_workers(loader) for e in batch if e is not None)


def load_folder(
    root: str | Path | ImageList,
    size: int,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    on_bad_image: str = "skip",
    progress: bool = True,
    decode_size: Optional[int] = None,
    crop_ratio: Optional[float] = None,
    report: bool = True,
) -> ImageArray:
    """Decode every image of ``root`` for ``size`` px views, or reuse the cached array of an unchanged folder.
    ``root`` may also be a list file or an :class:`ImageList` (:func:`find_source`); a dataset without a
    cache name is decoded into memory.

    A folder whose images are all square and no larger than ``size`` is stored ``square`` (:class:`Layout`),
    an entry training and evaluation share; any other
    is stored ``padded`` at ``decode_side(size, decode_size)`` for training, or with the evaluation
    transform when ``crop_ratio`` is given. With ``cache``, images are decoded straight into a memory-mapped
    file under ``cache_dir`` (disk, not RAM, bounds the folder's size: N * side^2 * 3 bytes); without it,
    into memory.

    The cache is keyed by the layout, the folder's resolved path and each file's relative path, byte size,
    modification time and change time, so any change to the folder decodes it anew. Bad files are skipped with a
    warning naming each (``on_bad_image=skip``) or stop the run naming the first (``error``). A class
    folder without a readable image is kept (class indices follow the folder names), named in a warning.
    ``report=False`` leaves out both warnings (for a second decoding of images already loaded).
    """
    found = find_source(root)
    images, good, bad, sizes = _decoded_or_cached(found, size, cache, cache_dir, workers, on_bad_image, progress,
                                                  decode_size, crop_ratio)
    reasons = {**{str(f): IRREGULAR for f in found.irregular},  # named by discovery's own warning
               **{str(found.files[i]): bad[i] for i in sorted(bad)}}
    skipped = list(reasons)
    if report:
        _report_skipped({str(found.files[i]): bad[i] for i in sorted(bad)}, found.root)
    if len(good) == 0:
        common, n = collections.Counter(reasons.values()).most_common(1)[0] if reasons else ("", 0)
        why = f"; {'all' if n == len(reasons) else n} for the reason {common}" if n > 1 else ""
        raise DataError(f"no readable images in {found.root} ({len(skipped)} files could not be read{why})")
    labels = torch.as_tensor(np.asarray(found.labels, dtype=np.int64)[good])
    counts = torch.bincount(labels[labels >= 0], minlength=len(found.classes))
    empty = [c for c, n in zip(found.classes, counts.tolist()) if n == 0]
    if empty and report:  # kept, so that class indices stay those of the folder names; a probe can never predict them
        log.warning("class folder(s) of %s with no readable image: %s", found.root, ", ".join(empty))
    return ImageArray(
        images=_as_tensor(images),
        labels=labels,
        classes=found.classes,
        files=[str(found.files[i]) for i in good],
        skipped=skipped,
        sizes=None if sizes is None else torch.as_tensor(np.asarray(sizes, dtype=np.int64).reshape(-1, 2)),
        reasons=reasons,
    )


def _decoded_or_cached(found: ImageList, size: int, cache: bool, cache_dir, workers: int, on_bad_image: str,
                       progress: bool, decode_size: Optional[int], crop_ratio: Optional[float]):
    """``(images, good, bad, sizes)`` of ``found`` (see :func:`load_folder`): the cache's entry for the
    unchanged folder, else decoded (into the cache with ``cache``). A bad file the cache remembers stops the
    load under ``on_bad_image=error`` as a fresh decode would."""
    cache = cache and found.cacheable
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    square = Layout("square", size, size)
    larger = Layout("eval", size, size, crop_ratio) if crop_ratio else \
        Layout("padded", size, decode_side(size, decode_size))
    listing = found.listing if cache else b""
    hit = _read_cache(listing, (square, larger), cache_dir) if cache else None
    if hit is not None and _denied_now_readable(found, hit[2]):
        hit = None  # decoded again, into the same entry
    if hit is None:
        # A training crop samples the whole image, as torchvision's does: the square layout's centre crop
        # would cut a non-square image's sides off, so such a folder keeps each image's extent (padded).
        layout = square if all_square_within_view(found, size, workers) else larger
        array_path = cache_dir / f"{_cache_key(listing, layout)}.npy" if cache else None
        if cache:
            _check_disk(cache_dir, len(found.files) * layout.side**2 * 3, found.root)
        def write_meta(decoded, array_id):
            _write_meta(*decoded[1:], found, array_path.with_suffix(".json"), array_id)
        return _decode_all(found, layout, workers, on_bad_image, progress, into=array_path, meta=write_meta)
    images, good, bad, sizes = hit
    if bad and on_bad_image == "error":  # the cache remembers the bad files a skipping decode passed over
        first = min(bad)
        raise bad_image_error(found.files[first], bad[first])
    return images, good, bad, sizes


def _denied_now_readable(found: ImageList, bad: dict[int, str]) -> bool:
    """Whether a file the cache's entry skipped for its permissions (not a fault of the file) may now be read:
    then the folder is decoded again instead of the file staying skipped."""
    return any(r.startswith("PermissionError") and not isinstance(found.files[i], DatasetItem)
               and os.access(found.files[i], os.R_OK) for i, r in bad.items())


def _read_cache(listing: bytes, layouts: tuple[Layout, ...], cache_dir: Path):
    """``(images, good, bad, sizes)`` of the first layout the cache holds for the folder of ``listing``,
    else None; ``bad`` maps each unreadable file's index to its reason.

    The metadata names the array it describes (``array``: its file's inode and modification time). An entry
    decoded again (a denied file now readable) may hold one decode's array beside another's metadata, after
    a kill between the two renames or when two users' decodes interleave: that pair is a miss, never images
    read under another decode's labels."""
    for layout in layouts:
        key = _cache_key(listing, layout)
        array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
            array_id = _array_id(array_path)
            if meta.get("array", array_id) != array_id:  # absent: an older entry
                continue
            good = np.asarray(meta["good"], dtype=np.int64)
            bad = {i: "unreadable" for i in meta["bad"]}  # metadata written without reasons
            bad.update({int(i): r for i, r in meta.get("reasons", {}).items()})
            images = np.load(array_path, mmap_mode="r")
            if _array_id(array_path) != array_id:  # replaced as it was opened: that may be the other array
                continue
            return images[: len(good)], good, bad, meta["sizes"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, removed meanwhile, damaged
            continue
    return None


def _array_id(path: Path) -> list[int]:
    """What tells one decode's array file from another's at the same path: a rename keeps both."""
    st = os.stat(path)
    return [st.st_ino, st.st_mtime_ns]


def load_configured(root: str | Path | ImageList, data: DataConfig, progress: bool = True, **changes) -> ImageArray:
    """:func:`load_folder` of ``root`` with the size, cache and decoding options of a ``data`` config section;
    ``changes`` replace some of them (``cache``, ``workers``) or add ``crop_ratio`` (evaluation images)."""
    opts = dict(cache=data.cache, cache_dir=data.cache_dir or None, workers=data.workers,
                on_bad_image=data.on_bad_image, progress=progress, decode_size=data.decode_size)
    return load_folder(root, data.image_size, **{**opts, **changes})


def _check_disk(cache_dir: Path, needed: int, root: Path) -> None:
    """The cache folder exists, is writable and has room for ``needed`` bytes; what dead decoders left
    there is removed first (see :mod:`simxent.files`: a live decoder's file is never touched)."""
    problem = folder_problem(cache_dir)
    if problem:
        raise DataError(f"image cache: {problem} (set data.cache_dir)")
    remove_dead_temp_files(cache_dir)
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise DataError(f"decoding {root} needs {needed / 1e9:.1f} GB in the cache {cache_dir}, which has "
                        f"{free / 1e9:.1f} GB free: set data.cache_dir to a larger disk, lower data.image_size "
                        f"(or data.decode_size), or stream the folder with data.stream=true")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # A read-only memmap is shared between runs; torch warns on non-writable arrays, we never write.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _decode_all(found: ImageList, layout: Layout, workers: int, on_bad_image: str, progress: bool,
                into: Path | None = None, meta=None):
    """Decode in file order, packing the readable images at the front of the array; returns the array,
    the indices of the good files, ``{index: reason}`` of the bad ones, and (``padded`` layout) each good
    image's (h, w).

    With ``into``, the array is a memory-mapped file written in place and renamed to ``into`` when
    complete, so a folder larger than memory decodes to disk and never needs to fit in RAM; ``meta(decoded,
    array_id)`` writes its metadata just before the rename (see :func:`_read_cache`).
    """
    n = len(found.files)
    shape = (n, layout.side, layout.side, 3)
    if into is None:  # zeros: the padding of a padded layout is defined (a new file reads as zeros too)
        return _decode_into(np.zeros(shape, dtype=np.uint8), found, layout, workers, on_bad_image, progress)
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(into, ".npy")
    try:
        with writer_lock(tmp):  # from its creation: no clean-up takes it for a dead writer's, whatever its pid
            out = _reserved_memmap(tmp, shape)
            decoded = _decode_into(out, found, layout, workers, on_bad_image, progress)
            out.flush()  # nothing writes the array after this: the modification time in the metadata is final
            if meta:
                meta(decoded, _array_id(tmp))
            os.replace(tmp, into)
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted decode leaves no full-size array behind
    return decoded


def _reserved_memmap(path: Path, shape: tuple) -> np.ndarray:
    """A new ``.npy`` memory map whose every byte is allocated on disk: a sparse map would die of SIGBUS
    when the disk fills under it; this stops at once, naming the folder and the bytes needed."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    nbytes = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            reserve(f.fileno(), nbytes)
    except OSError as e:
        if is_disk_full(e):
            raise DataError(f"no space left in the image cache {path.parent}: the decoded folder needs "
                            f"{nbytes:,} bytes ({nbytes / 1e9:.2f} GB); set data.cache_dir to a larger disk "
                            f"or stream the folder with data.stream=true") from None
        raise
    return out


def _decode_into(out: np.ndarray, found: ImageList, layout: Layout, workers: int, on_bad_image: str,
                 progress: bool):
    """Fill ``out`` in file order with the readable images, packed at the front (see :func:`_decode_all`)."""
    good, sizes, bad = [], [], {}
    loader = DataLoader(DecodedFiles(found.files, layout.size, layout.decoder()), batch_size=64,
                        num_workers=workers, collate_fn=_collate, worker_init_fn=leave_stop_signals_to_the_main_process)
    bars = show_progress_bars(progress)
    for batch in tqdm(start_workers(loader), desc=f"decoding {found.root}", unit="batch", total=len(loader),
                      disable=not bars, leave=False):
        for i, img, reason in batch:
            if img is not None:
                h, w = img.shape[:2]
                out[len(good), :h, :w] = img
                good.append(i)
                sizes.append((h, w))
            elif on_bad_image == "error":
                raise bad_image_error(found.files[i], reason)
            else:
                bad[i] = reason
    return out[: len(good)], np.asarray(good, dtype=np.int64), bad, sizes if layout.kind == "padded" else None


def _write_meta(good: np.ndarray, bad: dict[int, str], sizes: Optional[list], found: ImageList,
                meta_path: Path, array_id: list[int]) -> None:
    """Written through a temporary file and an atomic rename, naming its array (``array_id``): a cache entry
    without its metadata, or beside another decode's, is never used. ``bad``: each unreadable file's index
    and reason; ``sizes``: each good image's true (h, w) in a padded layout, else None."""
    # The listing names a folder or list file wherever it is read from; a dataset by its name.
    root = str(found.root) if found.kind == "dataset" else str(Path(found.root).resolve())
    write_text_atomic(meta_path, json.dumps({"root": root, "good": good.tolist(), "bad": sorted(bad),
                                             "reasons": {str(i): r for i, r in sorted(bad.items())}, "sizes": sizes,
                                             "array": array_id}))


def _report_skipped(reasons: dict[str, str], root: Path) -> None:
    """One warning naming up to 20 skipped files, each with why it could not be read."""
    if reasons:
        lines = [f"{f} ({r})" for f, r in list(reasons.items())[:20]] + (["..."] if len(reasons) > 20 else [])
        log.warning("skipped %d unreadable image(s) in %s:\n  %s", len(reasons), root, "\n  ".join(lines))


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
    """Yield ``(step, Batch)`` for one epoch of a decoded or a streamed folder."""
    return data.batches(batch_size, generator, start, rank, world)
