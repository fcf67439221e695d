"""Embeddings of an image folder, similar-image search and near-duplicate pairs.

An image's embedding is its frozen encoder's feature vector, L2-normalised,

    e(x) = f(x) / ||f(x)||_2,

so the inner product of two embeddings is their cosine similarity. :func:`embed_folder` writes a folder's
embeddings, their file names and a FAISS inner-product index into one directory:

    embeddings.npy   float32 (N, D), one unit row per readable image, in the order of names.json
    names.json       the N file names, relative to the image folder (JSON holds any name, newlines too)
    index.faiss      the index over the rows (faiss.write_index): exact (flat), or IVF above a size
    meta.json        checkpoint and a digest of its encoder's weights, decoding (image size, crop ratio,
                     normalisation), count, index type and, for IVF, its recall@k against exact search; the
                     skipped files (relative as the names); a digest of the folder's listing (names, sizes,
                     times), by which :func:`read_store` warns that the folder changed since; each of the
                     three other files' :func:`fingerprint`, by which it refuses files of another write

:func:`nearest` finds the rows most similar to query embeddings; :func:`duplicate_pairs` lists the pairs
of rows whose cosine similarity reaches a threshold.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import __version__
from .augment import Normalize
from .checkpoint import OtherKindError, encoder_digest
from .config import AugmentConfig, ConfigError, DataConfig
from .data import (DataError, ImageArray, decode_eval, find_source, listing_digest, load_configured,
                   naming_the_key, names_base)
from .evaluate import build_index, extract_features, recall_against_exact
from .files import json_text, remove_dead_temp_files, temp_path, write_text_atomic
from .rundir import mark_output, run_lock
from .linear_eval import encoder_to_score
from .monitor import Monitor
from .runtime import full_float32, quiet_log, resolve_device, setup_logging, show_progress_bars

log = logging.getLogger("simxent")

EMBEDDINGS, NAMES, INDEX, META = "embeddings.npy", "names.json", "index.faiss", "meta.json"
FINGERPRINT_BYTES = 1 << 16
IVF_ABOVE = 100_000  # rows; exact search stays fast below (docs/benchmarks.md, "Embeddings and search")
NPROBE = 16
RECALL_K = 10
RECALL_QUERIES = 1000
# Images larger than the view: shorter side to size / ratio, centre crop. 1: the whole centre square, so that
# a copy at another size is decoded alike (evaluation's 0.875 crops only the images larger than the view: a
# 2x copy of an image would be compared zoomed in).
CROP_RATIO = 1.0


@torch.no_grad()
def embed(encoder: nn.Module, images, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
          batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """L2-normalised embeddings (N, D), float32 on the CPU, of uint8 images (N, H, W, 3) (a tensor or a
    numpy array, such as :class:`simxent.data.ImageArray`'s ``images``):

        e_i = f(x_i) / ||f(x_i)||_2,   x_i = (image_i / 255 - mean) / std   per channel,

    with the encoder in eval mode on its own device. ``mean`` and ``std`` default to the training
    default (ImageNet's); a checkpoint's own are ``augment.mean`` and ``augment.std``. Computed in float32,
    not TF32 on a GPU (:func:`simxent.runtime.full_float32`): a near-duplicate threshold such as 0.999 needs
    more digits than bf16's or TF32's three."""
    images = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"embed wants uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("embed wants at least one image, got none (N = 0)")
    defaults = AugmentConfig()
    normalize = Normalize(mean or defaults.mean, std or defaults.std)
    device = next(encoder.parameters()).device
    with full_float32():
        features = extract_features(encoder, images, normalize, device, batch_size, None, desc="embedding",
                                    progress=progress)
    return F.normalize(features, dim=1)


@dataclass
class Encoding:
    """What turns an image file into an embedding: an encoder (eval mode), the evaluation transform it is
    fed (``image_size``, ``crop_ratio``: :func:`simxent.data.decode_eval`) and its input normalisation."""

    encoder: nn.Module
    backbone: str
    cifar_stem: bool
    image_size: int
    crop_ratio: float
    mean: list[float]
    std: list[float]

    def embed_files(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Embeddings (len(paths), D) of image files, each decoded as :func:`load_folder` decodes a folder
        for evaluation; a file that cannot be read is a DataError naming it."""
        images = np.stack([decode_image(p, self.image_size, self.crop_ratio) for p in paths])
        return embed(self.encoder, images, self.mean, self.std).numpy()


def load_encoding(checkpoint: str | Path, image_size: Optional[int] = None, crop_ratio: float = CROP_RATIO,
                  backbone_name: Optional[str] = None, cifar_stem: bool = False) -> Encoding:
    """The encoder of a simxent checkpoint with its normalisation and its ``data.image_size`` (unless
    ``image_size`` replaces it), or of a plain state dict of architecture ``backbone_name`` with ImageNet
    normalisation (see :func:`simxent.linear_eval.encoder_to_score`)."""
    if not 0 < crop_ratio <= 1:
        raise ConfigError(f"--crop-ratio: {crop_ratio} is out of range ((0, 1])")
    encoder, cfg = encoder_to_score(checkpoint, backbone_name, cifar_stem, image_size)
    return Encoding(encoder, cfg.model.backbone, cfg.model.cifar_stem, cfg.data.image_size, crop_ratio,
                    list(cfg.augment.mean), list(cfg.augment.std))


def decode_image(path: str | Path, image_size: int, crop_ratio: float) -> np.ndarray:
    """One file through the evaluation transform (:func:`simxent.data.decode_eval`), (size, size, 3) uint8."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would be read for ever
        raise DataError(f"cannot read image {path}: not a regular file")
    try:
        return decode_eval(path, image_size, crop_ratio)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise DataError(f"cannot read image {path}: {e}") from None


def recall_query_rows(n: int, count: int = RECALL_QUERIES) -> np.ndarray:
    """The rows that measure an IVF index's recall: ``count`` evenly spaced rows (all when n <= count)."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


def build_search_index(vectors: np.ndarray, ivf_above: int = IVF_ABOVE, nprobe: int = NPROBE,
                       k: int = RECALL_K) -> tuple[faiss.Index, dict]:
    """An exact inner-product index (``flat``) up to ``ivf_above`` rows; above, an inverted-file index
    (``ivf``, :func:`simxent.evaluate.build_index`), whose recall@k against exact search is measured with
    the rows of :func:`recall_query_rows` as queries, each query's own row left out of both lists. Returns
    the index and its description for meta.json."""
    if len(vectors) <= ivf_above:
        return build_index(vectors, "flat"), {"type": "flat"}
    index = build_index(vectors, "ivf", nprobe)
    rows = recall_query_rows(len(vectors))
    recall = recall_against_exact(index, vectors, rows, k)
    log.info("IVF index over %d rows (%d lists, nprobe %d): recall@%d %.4f against exact search",
             len(vectors), index.nlist, index.nprobe, k, recall)
    return index, {"type": "ivf", "nlist": index.nlist, "nprobe": index.nprobe,
                   "recall": {"k": min(k, len(vectors) - 1), "queries": len(rows), "value": recall}}


@dataclass
class EmbeddingStore:
    """A folder written by :func:`embed_folder`, read back."""

    vectors: np.ndarray
    names: list[str]
    index: faiss.Index
    meta: dict


def warn_if_replacing(out: Path, images: str) -> None:
    """Warn when ``out`` holds the store of another image folder, which the new one replaces."""
    before = read_meta(out).get("images")  # none there (or none that reads): nothing is lost
    if before and before != images:
        log.warning("--out %s held the embeddings of %s: they are replaced by those of %s", out, before, images)


def fingerprint(f) -> list:
    """What tells one write of a store's file from another, read from the open binary file ``f`` and left at
    its start: its size and the SHA-1 of its first and last 64 KiB (vectors of other weights or images differ
    there; reading all of a large store twice would slow every search). Copies of the file share it."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(FINGERPRINT_BYTES)
    f.seek(max(0, size - FINGERPRINT_BYTES))
    digest = hashlib.sha1(head + f.read(FINGERPRINT_BYTES)).hexdigest()
    f.seek(0)
    return [size, digest]


def write_store(out: Path, store: EmbeddingStore) -> None:
    """The four files of ``store`` in ``out``. The three data files are written under temporary names first,
    so a failure (a full disk, Ctrl-C) leaves the earlier store whole, then renamed in; meta.json, written
    last, records each one's :func:`fingerprint`, by which :func:`read_store` tells a store being rewritten, or
    one a kill left half renamed, from a whole one."""
    mark_output(out)
    writers = {EMBEDDINGS: lambda path: np.save(path, store.vectors),
               NAMES: lambda path: path.write_text(json_text(store.names), encoding="utf-8"),
               INDEX: lambda path: faiss.write_index(store.index, str(path))}
    temps = {name: temp_path(out / name, suffix=".npy" if name == EMBEDDINGS else "") for name in writers}
    try:
        files = {}
        for name, write in writers.items():
            write(temps[name])
            with open(temps[name], "rb") as f:
                os.fsync(f.fileno())
                files[name] = fingerprint(f)
        if "files" not in read_meta(out):  # an older store's meta.json would pass for the new files
            (out / META).unlink(missing_ok=True)
        for name, temp in temps.items():
            os.replace(temp, out / name)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    write_text_atomic(out / META, json_text({**store.meta, "files": files}, indent=2))


def read_part(folder: Path, name: str, load: Callable):
    """``load`` of the open file ``folder/name`` and the :func:`fingerprint` of what was read; a file that
    does not load is a DataError naming it."""
    try:
        with open(folder / name, "rb") as f:
            got = fingerprint(f)
            return load(f), got
    except FileNotFoundError:
        raise DataError(f"--index: {folder / name} not found; make the folder with simxent-embed") from None
    except (OSError, ValueError, RuntimeError, EOFError) as e:  # RuntimeError: faiss's
        raise DataError(f"--index: {folder / name} cannot be read ({str(e).strip()[:200]}); run simxent-embed "
                        f"again") from None


def read_meta(out: Path) -> dict:
    """meta.json of the store in ``out``; {} when there is none that reads."""
    try:
        meta = json.loads((out / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_index(f) -> faiss.Index:
    """The FAISS index in the open binary file ``f``, read through it (one copy in memory, not three)."""
    if hasattr(faiss, "PyCallbackIOReader"):
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))
    return faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))


def read_parts(folder: Path) -> Optional[tuple]:
    """meta.json, then the vectors, names and index it records; None when one of them is not the file that
    meta.json records (a store from before the records is taken as it is)."""
    meta, _ = read_part(folder, META, json.load)  # bytes: json reads them as UTF-8
    vectors, got_vectors = read_part(folder, EMBEDDINGS, np.load)
    names, got_names = read_part(folder, NAMES, json.load)
    index, got_index = read_part(folder, INDEX, read_index)
    recorded = meta.get("files") if isinstance(meta, dict) else None
    if recorded and recorded != {EMBEDDINGS: got_vectors, NAMES: got_names, INDEX: got_index}:
        return None
    return meta, vectors, names, index


def read_store(folder: str | Path) -> EmbeddingStore:
    """Read a folder written by :func:`embed_folder`; a missing, unreadable or inconsistent file is a
    DataError naming it. A store that simxent-embed is rewriting is read again a second later."""
    folder = Path(folder)
    if folder.is_file():
        raise DataError(f"--index: {folder} is a file; give the folder simxent-embed wrote, {folder.parent}")
    parts = read_parts(folder) or (time.sleep(1) or read_parts(folder))
    if parts is None:
        raise DataError(f"--index: {folder}'s files are not those its {META} records: simxent-embed is writing "
                        f"there, or an embedding stopped while renaming its files; search again once it is done, "
                        f"or run simxent-embed again")
    meta, vectors, names, index = parts
    try:
        if meta["index"]["type"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = meta["index"]["nprobe"]
        count = meta["count"]
    except (KeyError, TypeError) as e:
        raise DataError(f"--index: {folder / META} lacks {e}; run simxent-embed again") from None
    if not len(names) == len(vectors) == index.ntotal == count or vectors.shape[1] != index.d:
        raise DataError(f"--index: {folder} is inconsistent: {len(vectors)} embeddings of {vectors.shape[1]} "
                        f"dimensions, {len(names)} names, {index.ntotal} indexed of {index.d} dimensions, count "
                        f"{count} in {META}; run simxent-embed again")
    warn_if_changed(folder, meta, names)
    return EmbeddingStore(vectors, names, index, meta)


def warn_if_changed(folder: Path, meta: dict, names: list[str]) -> None:
    """Warn when the embedded images changed after embedding (meta.json's ``listing``, the digest of
    :func:`simxent.data.listing_digest`): the index neither finds images added since nor forgets removed
    ones. It walks the folder and stats its files once."""
    if "listing" not in meta:  # a store from before the digest
        return
    try:
        with quiet_log():  # what discovery says of the folder was said when it was embedded
            images = find_source(meta["images"])
    except (DataError, OSError) as e:
        log.warning("--index %s: the embedded images cannot be listed (%s): the index holds them as they were",
                    folder, e)
        return
    if listing_digest(images) == meta["listing"]:
        return
    base = names_base(meta["images"])
    now = {os.path.relpath(f, base) for f in [*images.files, *images.irregular]}
    then = set(names) | set(meta["skipped"])
    what = f"the images listed in {meta['images']}" if Path(meta["images"]).is_file() else meta["images"]
    log.warning("--index %s: %s changed after it was embedded (%d image file(s) added, %d removed, others maybe "
                "rewritten): the index holds the images as they were; run simxent-embed again", folder,
                what, len(now - then), len(then - now))


def cosine(s: float) -> float:
    """A float32 inner product of unit vectors as a cosine: in [-1, 1] (an image against itself can score
    1.0000001)."""
    return min(1.0, max(-1.0, s))


def nearest(store: EmbeddingStore, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
    """For each query embedding, its ``k`` most similar rows as (name, cosine similarity), most similar
    first."""
    sims, idx = store.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(store.names)))
    return [[(store.names[j], cosine(s)) for j, s in zip(row_idx, row_sims) if j >= 0]
            for row_idx, row_sims in zip(idx.tolist(), sims.tolist())]


# How far below its true value a float32 dot product of two unit vectors may land (a few ulp of 1, summed
# over up to thousands of dimensions).
COS_ROUNDING = 1e-5


def duplicate_pairs(index: faiss.Index, vectors: np.ndarray, threshold: float, batch: int = 1024,
                    progress: bool = False) -> list[tuple[int, int, float]]:
    """Every pair of rows (i, j), i < j, with cos(e_i, e_j) = e_i . e_j >= ``threshold`` - ``COS_ROUNDING``,
    each once, most similar first: a FAISS range search of every row. Exact on a flat index; an IVF index
    finds a pair when either row's probed lists hold the other. The allowance is float32's: two copies of
    one image can score 0.99999994, and ``threshold`` 1 must still list them."""
    threshold = threshold - COS_ROUNDING
    # Range search keeps similarities strictly above the radius: step just below the threshold, filter after.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    found = {}
    for start in tqdm(range(0, len(vectors), batch), desc="duplicates", unit="batch",
                      disable=not show_progress_bars(progress), leave=False):
        lims, sims, idx = index.range_search(np.ascontiguousarray(vectors[start:start + batch]), radius)
        rows = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (idx != rows) & (sims >= threshold)
        for i, j, s in zip(rows[keep].tolist(), idx[keep].tolist(), sims[keep].tolist()):
            found[min(i, j), max(i, j)] = cosine(s)
    return sorted(((i, j, s) for (i, j), s in found.items()), key=lambda p: (-p[2], p[0], p[1]))


UNRELATED_SAMPLE = 2000  # rows whose pairs stand for the folder's unrelated images (2 million pairs)


def unrelated_similarity(vectors: np.ndarray, sample: int = UNRELATED_SAMPLE, seed: int = 0) -> Optional[dict]:
    """What two unrelated images of the folder score: over the pairs of up to ``sample`` rows drawn at random,
    less the pairs of mutual nearest neighbours (a copy and its original are), the median cosine and the
    99.9th percentile, which 1 pair in 1,000 exceeds. It depends on the encoder: one trained briefly maps
    every image near every other (median 0.6 or more), and a near-duplicate threshold below the percentile
    then lists mostly unrelated pairs. None with fewer than 3 rows (no pair is left)."""
    if len(vectors) < 3:
        return None
    drawn = np.random.default_rng(seed).choice(len(vectors), min(sample, len(vectors)), replace=False)
    v = vectors[np.sort(drawn)].astype(np.float64)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    keep = np.triu(np.ones(sims.shape, dtype=bool), 1)
    rows, nearest = np.arange(len(v)), sims.argmax(axis=1)
    mutual = nearest[nearest] == rows
    keep[rows[mutual], nearest[mutual]] = False  # each such pair once in either order: both entries cleared
    keep[nearest[mutual], rows[mutual]] = False
    sims = sims[keep]
    return {"pairs": len(sims), "median": float(np.median(sims)), "p99.9": float(np.quantile(sims, 0.999))}


@dataclass
class EmbedOptions:
    """Settings of :func:`embed_folder` beyond its folders; each names its command-line option."""

    image_size: Optional[int] = None  # --image-size; None: the checkpoint's data.image_size (32 with --backbone)
    crop_ratio: float = CROP_RATIO
    backbone: Optional[str] = None  # --backbone: a plain state dict of this architecture
    cifar_stem: bool = False
    device: str = "auto"
    workers: int = 2
    cache: bool = True
    cache_dir: Optional[str] = None
    batch_size: int = 256
    ivf_above: int = IVF_ABOVE
    nprobe: int = NPROBE
    projector: int = 0  # rows shown in TensorBoard's projector (DIR2/projector); 0: none
    progress: bool = True

    def check(self) -> None:
        rules = (("--workers", self.workers, self.workers >= 0, ">= 0"),
                 ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                 ("--ivf-above", self.ivf_above, self.ivf_above >= 1, ">= 1"),
                 ("--nprobe", self.nprobe, self.nprobe >= 1, ">= 1"),
                 ("--projector", self.projector, self.projector >= 0, ">= 0"))
        for option, value, ok, rule in rules:
            if not ok:
                raise ConfigError(f"{option} must be {rule}, got {value}")


def embed_folder(checkpoint: str | Path, images_dir: str | Path, out: str | Path,
                 opts: Optional[EmbedOptions] = None) -> dict:
    """Embed every readable image below ``images_dir`` (or listed in it, a text file of image paths: see
    :func:`simxent.data.read_image_list`) with the encoder of ``checkpoint`` and write the
    embeddings, names, index and meta.json into ``out`` (see the module's docstring). Unreadable files
    are skipped, named in the log and listed in meta.json. Returns meta.json's content."""
    setup_logging()
    opts = opts or EmbedOptions()
    opts.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    folder = Path(images_dir).resolve()
    if not folder.is_file() and out.resolve().is_relative_to(folder):
        raise ConfigError(f"--out {out} is inside --images {images_dir}: the next embedding of that folder would "
                          f"take its files (the projector's sprite) for images; choose a folder outside it")
    device = resolve_device(opts.device, option="--device")
    enc = load_encoding(checkpoint, opts.image_size, opts.crop_ratio, opts.backbone, opts.cifar_stem)
    # As meta.json names it, so that the listing read back at search is the same; a list file's own folder, not
    # its link target's, is where its relative lines lead (as training and linear evaluation read it).
    given = Path(os.path.abspath(images_dir))
    images_dir = given if given.is_file() else given.resolve()
    decoding = DataConfig(image_size=enc.image_size, cache=opts.cache, cache_dir=opts.cache_dir or "",
                          workers=opts.workers)
    with naming_the_key("--images"):
        images = find_source(images_dir)
    mark_output(out)
    with run_lock(out, "--out"):  # two embeddings into one folder would interleave their four files
        remove_dead_temp_files(out)  # of an embedding killed while writing its files
        listing = listing_digest(images)  # before decoding: a file changed meanwhile shows at search
        with naming_the_key("--images"):
            data = load_configured(images, decoding, opts.progress, crop_ratio=enc.crop_ratio)
        encoder = enc.encoder.to(device).to(memory_format=torch.channels_last)
        vectors = embed(encoder, data.images, enc.mean, enc.std, opts.batch_size, opts.progress).numpy()
        index, described = build_search_index(vectors, opts.ivf_above, opts.nprobe)
        base = names_base(images_dir)
        meta = {"simxent_version": __version__, "checkpoint": str(Path(checkpoint).resolve()),
                "encoder_digest": encoder_digest(enc.encoder), "backbone": enc.backbone, "cifar_stem": enc.cifar_stem,
                "plain_state_dict": bool(opts.backbone), "images": str(images_dir),
                "image_size": enc.image_size, "crop_ratio": enc.crop_ratio, "mean": enc.mean, "std": enc.std,
                "count": len(vectors), "dim": int(vectors.shape[1]), "index": described,
                "skipped": [os.path.relpath(f, base) for f in data.skipped], "listing": listing}
        names = [os.path.relpath(f, base) for f in data.files]
        warn_if_replacing(out, meta["images"])
        earlier = bool(read_meta(out))
        write_store(out, EmbeddingStore(vectors, names, index, meta))
        if earlier:  # a store's folder: its projector shows the earlier embedding's rows and thumbnails
            shutil.rmtree(out / "projector", ignore_errors=True)
        if opts.projector:
            write_projector(out / "projector", vectors, names, data, opts.projector)
    return meta


def write_projector(folder: Path, vectors: np.ndarray, names: list[str], data: ImageArray, count: int) -> None:
    """``count`` evenly spaced rows in TensorBoard's projector (``tensorboard --logdir folder``), each
    labelled by its file name and drawn as its image (at most 32 px, so the sprite stays small)."""
    rows = recall_query_rows(len(vectors), count)
    thumbs = data.images[torch.from_numpy(rows)].permute(0, 3, 1, 2).float().div(255)
    if thumbs.shape[-1] > 32:
        thumbs = F.interpolate(thumbs, size=(32, 32), mode="bilinear", antialias=True)
    # The projector's metadata is one line per point: tabs and line breaks in a name become spaces.
    labels = [names[i].translate({9: " ", 10: " ", 13: " "}) for i in rows.tolist()]
    monitor = Monitor(folder)
    monitor.embedding(torch.from_numpy(vectors[rows]), labels, thumbs, 0, tag="embeddings")
    monitor.close()


def check_same_encoder(enc: Encoding, meta: dict, checkpoint: Optional[str | Path]) -> None:
    """Queries mean something only in the embedding space of the index: another architecture is refused, and
    so are other weights (meta.json's digest), such as those of a run that trained on into the checkpoint
    file after it was embedded. An index from before the digest warns about another checkpoint file."""
    ours, theirs = (enc.backbone, enc.cifar_stem), (meta["backbone"], meta["cifar_stem"])
    if ours != theirs:
        raise ConfigError(f"--checkpoint: its encoder is {ours[0]} (CIFAR stem: {ours[1]}), the index was embedded "
                          f"with {theirs[0]} (CIFAR stem: {theirs[1]}); give the checkpoint the folder was embedded "
                          f"with ({meta['checkpoint']})")
    if "encoder_digest" in meta:
        if encoder_digest(enc.encoder) != meta["encoder_digest"]:
            raise ConfigError(f"{checkpoint or meta['checkpoint']}: its encoder's weights are not those the index was "
                              f"embedded with (meta.json's encoder_digest; a run trained on into the file since?): "
                              f"run simxent-embed again with it, or give --checkpoint the embedded weights")
        return
    if checkpoint is not None and Path(checkpoint).resolve() != Path(meta["checkpoint"]).resolve():
        log.warning("--checkpoint %s is not the checkpoint the index was embedded with (%s): similarities are "
                    "meaningful only if its encoder is the same", checkpoint, meta["checkpoint"])


def search_files(store: EmbeddingStore, paths: Sequence[str | Path], k: int = 10,
                 checkpoint: Optional[str | Path] = None) -> list[dict]:
    """The ``k`` nearest rows of each image file, decoded and embedded as the store's folder was: with its
    image size, crop ratio and normalisation from meta.json, and the encoder of ``checkpoint`` (default:
    meta.json's; a plain state dict of meta.json's architecture if the folder was embedded from one)."""
    if not (isinstance(k, int) and k >= 1):
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    meta = store.meta
    plain = meta["plain_state_dict"]
    if checkpoint is None and not Path(meta["checkpoint"]).is_file():
        raise ConfigError(f"the checkpoint the index was embedded with, {meta['checkpoint']} (meta.json), is "
                          f"gone: give it with --checkpoint")
    try:
        enc = load_encoding(checkpoint or meta["checkpoint"], meta["image_size"], meta["crop_ratio"],
                            meta["backbone"] if plain else None, meta["cifar_stem"] and plain)
    except OtherKindError:  # its message's advice is linear-eval's (--backbone), which search has no use for
        if checkpoint is None:
            raise
        kind = "a plain state dict" if plain else "a simxent checkpoint"
        raise ConfigError(f"--checkpoint: {checkpoint} is not {kind}, and the index was embedded from {kind} "
                          f"({meta['checkpoint']}): give the checkpoint the folder was embedded with") from None
    check_same_encoder(enc, meta, checkpoint)
    enc.mean, enc.std = meta["mean"], meta["std"]
    queries = enc.embed_files(paths)
    if queries.shape[1] != meta["dim"]:
        raise ConfigError(f"--checkpoint: its encoder gives {queries.shape[1]} features, the index holds "
                          f"{meta['dim']}: give the checkpoint the folder was embedded with")
    return [{"query": str(p), "neighbours": [{"name": n, "similarity": s} for n, s in found]}
            for p, found in zip(paths, nearest(store, queries, k))]
