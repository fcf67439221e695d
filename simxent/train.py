"""The pretraining loop: V views, encoder + head, NT-Xent, one optimiser step; checkpoints, logs, kNN.

One code path serves one process and many (torchrun): in a single process the distributed helpers are
the identity. Under torchrun, ``train.batch_size`` is the global batch, each process holds its slice,
NT-Xent sees every process's embeddings as negatives, and only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import dist, figures
from .augment import ViewAugment, blur_probability, small_view_size
from .checkpoint import (CheckpointWriter, Position, changed_settings, check_resumable, last_in_folder,
                         load_checkpoint, newest_valid_checkpoint, restore_training, rng_state, saved_progress,
                         start_branch, training_state)
from .config import AugmentConfig, Config, ConfigError, check_config, format_config, save_config, to_dict, view_size
from .data import (Batch, DataError, ImageArray, ImageStream, batch_indices, check_source, class_difference,
                   dataset_images, default_cache_dir, find_source, iterate_batches, load_configured, names_base,
                   naming_the_key, decode_eval, open_stream, shared_files)
from .evaluate import (batchnorm_statistics, extract_features, knn_scores, reestimate_batchnorm,
                       set_batchnorm_statistics, topk_accuracy)
from .files import write_text_atomic
from .loss import Temperature, contrastive_stats, multi_view_nt_xent, pairwise_nt_xent, similarity_samples
from .models import SimCLR, feature_size
from .monitor import Monitor
from .rundir import (claim, claim_clears, has_checkpoints, holds_run, recorded_run_id, recorded_torchrun_job,
                     run_lock, writable_folder)
from .runtime import (SlowStepWatch, autocast, close_log_file, configure_device, held_warnings, resolve_device,
                      resolve_dtype, seed_everything, set_threads, setup_logging, show_progress_bars)
from .schedule import TimeBudget, build_optimizer, peak_lr, set_lr, warmup_steps

log = logging.getLogger("simxent")


class TrainingError(RuntimeError):
    """The run cannot go on (for example, the loss stayed non-finite)."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends on (seed, epoch) only, so a resumed run replays it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# Settings whose change on resume changes what the run learns (a warning: an override not repeated on
# resume comes back as its default); others (epochs, time, logging, workers) are said at INFO.
CHANGES_TRAINING = ("augment.", "loss.", "optim.", "data.train", "train.batch_size", "train.precision",
                    "train.seed", "train.budget_schedule", "train.bn_recalibration")


def checkpoint_path(cfg: Config) -> Path:
    return Path(cfg.out) / "checkpoints" / "last.pt"


def step_loss(model: nn.Module, views: torch.Tensor | list[torch.Tensor], temperature: torch.Tensor, device, dtype,
              n_views: int = 2, labels: Optional[torch.Tensor] = None, decoupled: bool = False,
              multi_view: str = "joint", n_full: Optional[int] = None):
    """NT-Xent of this process's ``n_views`` views per image against the views of every process.

    ``views`` is one view-major batch ``[v1; v2; ...]``, or a list of them at several resolutions (the
    full-size views, then multi-crop's small ones): the model projects each and concatenates.
    ``labels`` (one per image) make every view of a class a positive (supervised contrastive);
    ``decoupled`` leaves the positives out of the denominators (``loss.decoupled``); ``multi_view`` pairs
    or full_pairs takes the mean of two-view NT-Xent over pairs of views instead (``loss.multi_view``; the
    first ``n_full`` views are the full-size ones, default all).
    Returns the local loss (its mean over processes is the global loss) and the first two views'
    projections, for monitoring.
    """
    with autocast(device, dtype):
        z = model(views)
    n = z.shape[0] // n_views
    gather = dist.gather_with_grad if dist.world_size() > 1 else None  # None: all views local (symmetric form)
    if multi_view == "joint":
        loss = multi_view_nt_xent(z, n_views, temperature, labels=labels, gather=gather, rank=dist.rank(),
                                  decoupled=decoupled)
    else:
        # One gather per pair: V(V-1)/2 small collectives, next to the encoder's work, kept for the
        # plainness of each pair being nt_xent itself.
        loss = pairwise_nt_xent(z, n_views, temperature, n_full if multi_view == "full_pairs" else None,
                                gather=gather, rank=dist.rank())
    return loss, z[:n], z[n:2 * n]


def batch_labels(data: ImageArray | ImageStream, batch_size: int, generator: torch.Generator, start: int = 0,
                 rank: int = 0, world: int = 1):
    """The labels of the batches :func:`iterate_batches` yields for an equally seeded ``generator`` (both
    draw the same :func:`batch_indices`)."""
    for _, idx in batch_indices(len(data), batch_size, generator, start, rank, world):
        yield data.labels[idx]


def views_per_batch(aug: AugmentConfig) -> tuple[int, ...]:
    """How many views each batch that :class:`MultiViewAugment` returns holds: (full,) or (full, small)."""
    return (aug.views, aug.small_views) if aug.small_views else (aug.views,)


class MultiViewAugment:
    """Each batch's views: ``augment.views`` at the view size and, for multi-crop, ``augment.small_views`` at
    the small size with their own crop scale. Returns one tensor, or [full, small]. The sizes follow the
    schedule's progress (:func:`simxent.config.view_size`); ``full`` and ``small`` are the final ones."""

    def __init__(self, cfg: Config, device: torch.device):
        # Whether to blur follows the data's resolution (SimCLR blurs ImageNet, not CIFAR), not the view size.
        self.aug = dataclasses.replace(cfg.augment, blur_p=blur_probability(cfg.augment, cfg.data.image_size))
        self.image_size, self.compile, self.device = cfg.data.image_size, cfg.train.compile, device
        self.n_full, self.n_small, self.channels_last = self.aug.views, self.aug.small_views, cfg.train.channels_last
        self.n_views = self.n_full + self.n_small
        self.built: dict[tuple[str, int], ViewAugment] = {}
        self.full, self.small = self.at(1.0)

    def at(self, progress: float) -> tuple[ViewAugment, Optional[ViewAugment]]:
        """The full and small views' augmentations at ``progress``, built once per size."""
        full = self._built("full", view_size(self.aug, self.image_size, progress))
        if not self.n_small:
            return full, None
        return full, self._built("small", small_view_size(self.aug, self.image_size, progress))

    def _built(self, kind: str, size: int) -> ViewAugment:
        if (kind, size) not in self.built:
            aug = dataclasses.replace(self.aug, crop_scale=self.aug.small_crop_scale) if kind == "small" else self.aug
            self.built[kind, size] = ViewAugment(aug, size, compile=self.compile).to(self.device)
        return self.built[kind, size]

    def __call__(self, batch: Batch, progress: float = 1.0) -> torch.Tensor | list[torch.Tensor]:
        full_aug, small_aug = self.at(progress)
        full = full_aug.views(batch.images, self.n_full, self.channels_last, batch.sizes, batch.cropped)
        if small_aug is None:
            return full
        # Never a cropped (streamed) batch: config refuses small views with data.stream.
        return [full, small_aug.views(batch.images, self.n_small, self.channels_last, batch.sizes)]


def _torchrun_restart(out: Path) -> bool:
    """Whether this process is torchrun's restart of the job that claimed ``out``: then it continues that
    run whatever ``train.resume`` says. A restart of a job refused at the start (``out`` holds another run)
    is refused again, never handed the other run."""
    return dist.restarted_by_torchrun() and recorded_torchrun_job(out) == dist.torchrun_job()


def _resume_path(cfg: Config) -> Path | None:
    """The checkpoint to resume. A worker that torchrun restarted after a failure continues from the last
    checkpoint its job saved; before the job's first save, from where the job started: ``train.resume`` as
    given (a file given by path may be older than the job's own steps, which are then in the folder)."""
    resume, out, folder = cfg.train.resume, Path(cfg.out), checkpoint_path(cfg).parent
    restarted = _torchrun_restart(out)
    if restarted and resume and resume != "auto":
        return newest_valid_checkpoint(folder, recorded_run_id(out), dist.torchrun_job()) or resume_file(resume)
    if not resume and restarted:
        resume = "auto"
    if not resume:
        return None
    if resume == "auto":  # the newest checkpoint of the run the folder holds, never another run's
        return newest_valid_checkpoint(folder, recorded_run_id(out))
    return resume_file(resume)


def resume_file(resume: str) -> Path:
    """``train.resume`` given as a path: the checkpoint file, or one line saying why it is none."""
    path = Path(resume)
    if path.is_dir():
        last = last_in_folder(path) or path / "checkpoints" / "last.pt"
        raise ConfigError(f"train.resume: {path} is a folder, not a checkpoint file; train.resume=auto resumes the "
                          f"run in out, or give a file such as {last}")
    if not path.is_file():
        raise ConfigError(f"train.resume: checkpoint not found: {path}")
    return path


@dataclass
class KnnBank:
    """The labelled training images kNN monitoring searches: those of ``data`` where ``rows`` is set, the
    ones that are not also in data.val (a query's own copy would be its nearest neighbour)."""

    data: ImageArray
    rows: torch.Tensor


def knn_monitor(model: SimCLR, bank: KnnBank | None, val: ImageArray, augment: ViewAugment, cfg: Config,
                device, dtype) -> float:
    """kNN top-1 of ``val`` against the labelled training images, or leave-one-out within ``val``."""
    def features(data, desc):
        return extract_features(model.encoder, data.images, augment.normalize, device, cfg.eval.batch_size, dtype,
                                cfg.train.channels_last, desc=desc)

    query = features(val, "kNN val")
    k, t, classes = cfg.eval.knn_k, cfg.eval.knn_temperature, len(val.classes)
    if bank is None:
        scores = knn_scores(query, val.labels, query, classes, k, t, exclude_self=True)
    else:
        # Features of every image, then the kept rows: no copy of a (possibly disk-backed) image array.
        keys = features(bank.data, "kNN bank")[bank.rows]
        scores = knn_scores(keys, bank.data.labels[bank.rows], query, classes, k, t)
    return topk_accuracy(scores, val.labels, 1)


def project_embeddings(model: SimCLR, val: ImageArray, augment: ViewAugment, cfg: Config, device, dtype,
                       monitor: Monitor, step: int) -> None:
    """Up to ``eval.projector`` validation images (a fixed random subset) in TensorBoard's projector:
    their encoder features, class names and thumbnails (at most 32 px, so the sprite stays small)."""
    n = min(cfg.eval.projector, len(val))
    index = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:n].sort().values
    images = val.images[index.to(val.images.device)]
    features = extract_features(model.encoder, images, augment.normalize, device, cfg.eval.batch_size, dtype,
                                cfg.train.channels_last, desc="projector")
    thumbs = images.permute(0, 3, 1, 2).float().div(255)
    if thumbs.shape[-1] > 32:
        thumbs = torch.nn.functional.interpolate(thumbs, size=(32, 32), mode="bilinear", antialias=True)
    monitor.embedding(features, [val.classes[y] for y in val.labels[index].tolist()], thumbs, step)


class SimilarityLog:
    """Quantiles (10, 50, 90 %) of positive- and negative-pair similarity per logged step, kept in
    ``similarities.json`` beside the checkpoints so that a resumed run draws the whole history."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path, self.rows = path, []
        if resume_step is not None and path.is_file():
            self.rows = [r for r in json.loads(path.read_text()) if r["step"] <= resume_step]

    def add(self, step: int, pos: torch.Tensor, neg: torch.Tensor) -> None:
        q = torch.tensor([0.1, 0.5, 0.9], device=pos.device)
        self.rows.append({"step": step, "pos": pos.quantile(q).tolist(), "neg": neg.quantile(q).tolist()})

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps(self.rows))

    def figure(self, path: Path) -> None:
        if self.rows:
            figures.save(figures.similarity_over_time(self.rows), path)


def skipped_records(data: ImageArray | ImageStream | None) -> list[dict]:
    """``{"file", "reason"}`` of each file that could not be read, as skipped_images.txt and summary.json
    list them (none for no data: data.val unread)."""
    if data is None:
        return []
    return [{"file": f, "reason": data.reasons.get(f, "unreadable")} for f in data.skipped]


def hparams(cfg: Config) -> dict:
    """The config flattened to ``section.key: value`` for TensorBoard's HPARAMS tab, which takes numbers,
    booleans and text only: lists become their JSON text, null the text ``null``."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def final_metrics(loss: float, knn: list[dict]) -> dict:
    """What the HPARAMS tab compares runs by: the last step's loss and, with data.val, the last kNN top-1."""
    metrics = {"final/loss": loss}
    if knn:
        metrics["final/knn_top1"] = knn[-1]["top1"]
    return metrics


def log_step(monitor: Monitor, similarities: Optional[SimilarityLog], step: int, scalars: dict,
             z1: torch.Tensor, z2: torch.Tensor) -> None:
    """A logged step: ``scalars`` and the contrastive statistics of the main process's images against the
    global batch (every process calls it: the projections are gathered, so that ``top1`` picks among the
    same views as in one process, not among fewer as processes are added); with ``similarities`` (the main
    process), the distributions of positive- and negative-pair similarity too."""
    local = len(z1)
    z1, z2 = dist.gather(z1), dist.gather(z2)
    if not dist.is_main():
        return
    monitor.scalars({**scalars, **contrastive_stats(z1, z2, anchors=local)}, step, prefix="train/")
    if similarities is not None:
        pos_sim, neg_sim = similarity_samples(z1, z2)
        monitor.histogram("train/pos_sim_distribution", pos_sim, step)
        monitor.histogram("train/neg_sim_distribution", neg_sim, step)
        similarities.add(step, pos_sim, neg_sim)


def load_data(cfg: Config, progress: bool = True, dataset=None, cache_name: Optional[str] = None,
              evaluation: bool = True) -> tuple[ImageArray | ImageStream, ImageArray | None, KnnBank | None]:
    """Training images (data.train, or ``dataset``: see :func:`pretrain`), the optional labelled validation
    folder, and the kNN bank (train's images, if labelled, less any that are also in val). With
    ``evaluation`` false (the processes that never score kNN: all but the main one) neither of the last two
    is read: a bank of padded training images is a second decode of data.train, in every process's memory."""
    check_one_source(cfg, dataset)
    key = "data.train" if dataset is None else "pretrain(train=...)"
    with naming_the_key(key):  # found once: the kNN bank below decodes the same images again
        source = find_source(cfg.data.train) if dataset is None else dataset_images(dataset, cache_name)
    if cfg.loss.positives == "labels" and not (dataset is None and source.labelled and len(source.classes) > 1):
        # One class makes every other view a positive: no negatives, a constant loss, nothing learnt.
        raise ConfigError(f"loss.positives=labels: {key} needs a folder with one sub-folder per class, at least "
                          f"two, every image in one (or set loss.positives=views)")
    with naming_the_key(key):
        if cfg.data.stream:
            train = open_stream(source, view_size(cfg.augment, cfg.data.image_size), cfg.data.workers,
                                cfg.data.on_bad_image, cfg.augment.crop_scale)
        else:
            train = load_configured(source, cfg.data, progress)
    if len(train) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(train)} readable images in "
                          f"{cfg.data.train or key}")
    val = bank = None
    if not evaluation:
        return train, val, bank
    if cfg.data.val and cfg.eval.every == 0:
        log.warning("data.val=%s is not read with eval.every=0: no kNN monitoring and no projector", cfg.data.val)
    if cfg.data.val and cfg.eval.every > 0:
        with naming_the_key("data.val"):
            val = load_configured(cfg.data.val, cfg.data, progress, crop_ratio=cfg.eval.crop_ratio)
        if not val.classes or (val.labels < 0).any():
            raise ConfigError(f"data.val: {cfg.data.val} needs one sub-folder per class for kNN evaluation")
        # A streamed train folder is too large to embed for every evaluation: leave-one-out within val.
        # Sub-folders of data.train that share no name with data.val's classes are not classes (an unlabelled
        # folder kept in parts); some shared and some not is a mistake worth stopping for.
        labelled = train.classes and (train.labels >= 0).all() and not cfg.data.stream
        if labelled and not set(train.classes) & set(val.classes):
            log.warning("data.train's sub-folders share no name with the classes of data.val, so they are not "
                        "classes: kNN is leave-one-out within data.val")
        elif labelled:
            if train.classes != val.classes:
                raise ConfigError(f"data.val: classes of {cfg.data.val} differ from those of {cfg.data.train}: "
                                  + class_difference(("data.train", cfg.data.train, train.classes),
                                                     ("data.val", cfg.data.val, val.classes)))
            bank_images = train
            if train.sizes is not None:  # padded for training crops: the bank needs the evaluation transform
                with naming_the_key("data.train"):
                    bank_images = load_configured(source, cfg.data, progress, crop_ratio=cfg.eval.crop_ratio,
                                                  report=False)  # train's load named its skipped images
            rows = ~shared_files(bank_images, val)
            if not rows.all():
                log.warning("data.val shares %d images with data.train: %s", int((~rows).sum()),
                            "kNN is leave-one-out within data.val" if not rows.any()
                            else "they are left out of the kNN bank")
            bank = KnnBank(bank_images, rows) if rows.any() else None
        if bank is None and len(val) < 2:  # found now, not at the first epoch's end
            raise ConfigError(f"data.val: kNN within {cfg.data.val} (leave-one-out) needs at least 2 readable images")
    return train, val, bank


def warn_dropped_images(n: int, batch: int, share: float = 0.1) -> None:
    """Each epoch takes ``n // batch`` full batches of a fresh random order and leaves out the other
    ``n mod batch`` images; warn once when that is more than ``share`` of the folder."""
    dropped = n % batch
    if dropped > share * n:
        log.warning("train.batch_size=%d: each epoch runs %d step(s) over %d of the %d images and leaves out a "
                    "random %d (%.0f%%); a train.batch_size that divides %d, or a smaller one, uses more of them",
                    batch, n // batch, n - dropped, n, dropped, 100 * dropped / n, n)


class PlainProgress:
    """Progress where no bar is drawn (stderr is not a terminal, or bars are off): an INFO line with epoch,
    step, loss and images/s at the first logged step, then at a logged step (every ``train.log_every``)
    once ``every_s`` seconds have passed since the previous line, and at the run's last step."""

    every_s = 30.0

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int):
        self.enabled, self.epochs, self.steps_per_epoch, self.last = enabled, epochs, steps_per_epoch, None

    def update(self, pos: Position, loss: float, images_per_s: float, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (self.last is not None and not final and now - self.last < self.every_s):
            return
        self.last = now
        log.info("epoch %d/%d step %d/%d (global step %d): loss %.4f, %.0f images/s", pos.epoch + 1, self.epochs,
                 pos.step + 1, self.steps_per_epoch, pos.global_step, loss, images_per_s)


def place_on_gpu(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The decoded uint8 images on the GPU when they take under a quarter of its free memory (no copy per
    step at all), else in pinned host memory for asynchronous copies."""
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() < free // 4:
        return images.to(device)
    return images.pin_memory()


def on_device(train: ImageArray | ImageStream, device: torch.device) -> ImageArray | ImageStream:
    """``train`` as the loop reads it fastest on ``device``: a new object, ``train`` is left as it is. On a
    GPU a decoded array goes there (or into pinned memory) and a stream pins its batches."""
    if device.type != "cuda":
        return train
    if isinstance(train, ImageStream):
        return dataclasses.replace(train, pin_memory=True)
    images = place_on_gpu(train.images, device)
    sizes = train.sizes.to(images.device) if train.sizes is not None else None  # indexed by the batch order
    return dataclasses.replace(train, images=images, sizes=sizes)


def check_one_source(cfg: Config, dataset) -> None:
    """Exactly one of data.train and pretrain's ``dataset`` is given."""
    if dataset is not None and cfg.data.train:
        raise ConfigError(f"data.train: {cfg.data.train} is set and a dataset is given as pretrain(train=...): "
                          f"give one of them")
    if dataset is None and not cfg.data.train:
        raise ConfigError("data.train: no image folder given (set data.train=PATH)")


def _load_data_once(cfg: Config, progress: bool, dataset, cache_name: Optional[str]):
    """Rank 0 decodes (and fills the cache) first, then the first process of each other node (reading the
    cache, or filling its node's own), then the others (:func:`simxent.dist.node_first`). Without a cache
    every process decodes at once. All wait for the last on the store (:func:`simxent.dist.wait_for_all`),
    not in a collective that a decode may outlast."""
    if cfg.data.cache and (dataset is None or cache_name):
        with dist.node_first():
            data = load_data(cfg, progress and dist.is_main(), dataset, cache_name, evaluation=dist.is_main())
    else:
        data = load_data(cfg, progress and dist.is_main(), dataset, cache_name, evaluation=dist.is_main())
        dist.wait_for_all()
    check_same_images(data[0], cfg.data.train)
    return data


def check_same_images(train: ImageArray | ImageStream, source: str) -> None:
    """Every process must hold the same training images in the same order: each takes its slice of every
    global batch by index. Processes that list or decode on their own (no cache, a node's own cache, a
    stream) can differ, in a folder still being written or a file some cannot read: then one count of
    steps per epoch hangs the job, one order trains on some images twice and others never."""
    if dist.world_size() == 1:
        return
    base = names_base(source) if source else None
    names = "\n".join(os.path.relpath(f, base) if base else str(f) for f in train.files)
    every = dist.gather_objects((len(train), hashlib.sha1(names.encode("utf-8", "surrogateescape")).hexdigest()))
    if len(set(every)) > 1:
        counts = ", ".join(f"process {r}: {n}" for r, (n, _) in enumerate(every))
        raise DataError(f"the processes read different training images ({counts} images"
                        f"{'' if len({n for n, _ in every}) > 1 else ', listed in another order or other files'}): "
                        f"a folder still being written, or files that some processes cannot read; "
                        f"the job stops before a step")


class StopRequest(threading.Event):
    """Set by SIGTERM or SIGINT once the steps have begun (``steps_begun``); the loop reads it after each step."""
    steps_begun = False


@contextmanager
def stop_on_signals():
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag instead of killing the process: the loop finishes
    its step, checkpoints and returns. A second Ctrl-C interrupts at once, and so does a signal before the
    first step (while images are decoded, say): nothing is trained yet, so nothing is lost, and a decode of a
    large folder is not waited for."""
    requested = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if not requested.steps_begun:
            log.warning("%s received before the first step: stopping now; nothing was trained",
                        signal.Signals(signum).name)
            raise KeyboardInterrupt
        if requested.is_set() and signum == signal.SIGINT:
            log.warning("a second SIGINT: stopping now, once a checkpoint being written has landed; checkpoints "
                        "are written whole, so train.resume=auto continues from the last one")
            raise KeyboardInterrupt
        requested.set()
        log.warning("%s received: finishing this step, then checkpointing and stopping", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def finite_flag(tensors) -> torch.Tensor:
    """Whether every element of ``tensors`` is finite, as a device boolean: no host sync. The norm of all of
    them is finite exactly then (short of an overflow, itself a broken step), and foreach kernels compute it
    in a few launches rather than two per tensor."""
    tensors = [t for t in tensors if t is not None and t.is_floating_point()]  # integers are always finite
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors)) if tensors else torch.tensor(True)


class BufferSnapshot:
    """The model's buffers as they stood before a step, put back when the step is skipped. The forward of a
    step whose loss turns out non-finite has already moved every BatchNorm's running mean and variance, and
    a NaN there never leaves (train-mode BatchNorm uses the batch's own statistics, so training would go on
    and the next checkpoint would refuse the model). A skipped step must leave the model as it found it."""

    def __init__(self, net: nn.Module):
        # Grouped by device and dtype (float statistics, int64 counters): a fused copy per group, where a
        # mixed list would fall back to one copy per tensor.
        groups: dict = {}
        for b in net.buffers():
            groups.setdefault((b.device, b.dtype), []).append(b)
        self.live = list(groups.values())
        self.kept = [[b.clone() for b in group] for group in self.live]

    def take(self) -> None:
        for kept, live in zip(self.kept, self.live):
            torch._foreach_copy_(kept, live)

    def restore(self) -> None:
        for live, kept in zip(self.live, self.kept):
            torch._foreach_copy_(live, kept)


@dataclass
class Run:
    """What :func:`setup_run` builds and the loop works with. ``net`` is the SimCLR module (its state is
    checkpointed), ``model`` what the step calls (``net`` under DDP and/or torch.compile)."""

    cfg: Config
    device: torch.device
    dtype: Optional[torch.dtype]
    main: bool
    run_id: Optional[str]
    started: float
    train: ImageArray | ImageStream
    val: Optional[ImageArray]
    bank: Optional[KnnBank]
    net: SimCLR
    model: nn.Module
    views: MultiViewAugment
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    peak: float
    budget: TimeBudget
    monitor: Monitor
    similarities: SimilarityLog
    pos: Position
    bars: bool
    plain: PlainProgress
    slow_steps: SlowStepWatch = dataclasses.field(default_factory=SlowStepWatch)
    bad_steps: int = 0  # non-finite steps in a row
    skipped_steps: int = 0
    last_loss: float = float("nan")
    knn_top1: list = dataclasses.field(default_factory=list)
    resumed_progress: Optional[float] = None  # the progress that sized a resumed run's first views
    saved_step: int = 0  # the global step of the newest checkpoint of this run
    first_step: int = 0  # the global step this session started from
    branch_from: Optional[Path] = None  # a resumed run's checkpoint, until its first save sets later steps aside
    seconds_before: float = 0.0  # the run's earlier sessions, from its checkpoint
    writer: CheckpointWriter = dataclasses.field(default_factory=CheckpointWriter)
    buffers: BufferSnapshot = dataclasses.field(init=False)

    def __post_init__(self):
        self.saved_step = self.first_step = self.pos.global_step  # a resumed run's checkpoint, or 0
        self.buffers = BufferSnapshot(self.net)

    def seconds(self) -> float:
        """Wall time over all of the run's sessions so far."""
        return self.seconds_before + time.monotonic() - self.started

    def resume_history(self, saved: dict) -> None:
        """Take up the figures of the earlier sessions (:func:`history`) from a resumed checkpoint."""
        self.knn_top1 = list(saved.get("knn_top1", []))
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.last_loss = float(saved.get("last_loss", math.nan))
        self.seconds_before = float(saved.get("seconds", 0.0))
        before = saved.get("train_images")  # None: a checkpoint of an older version, or a fresh run
        if self.main and before is not None and before != len(self.train):
            log.warning("data.train holds %d training images now and %d when this run was checkpointed: the run "
                        "goes on over the images it finds (%d steps per epoch)", len(self.train), before,
                        self.steps_per_epoch)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def has_steps_left(self) -> bool:
        """Whether the schedule leaves steps to train: false for a run resumed after its epochs or its budget."""
        return self.pos.epoch < self.cfg.train.epochs and not self.budget.finished()

    @property
    def evaluates(self) -> bool:
        """Whether the run scores kNN on data.val: the same in every process, though only the main one reads
        data.val (the others wait for it at each score)."""
        return bool(self.cfg.data.val) and self.cfg.eval.every > 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train) // self.cfg.train.batch_size

    @property
    def schedule_step(self) -> int:
        """The batches of ``train.batch_size`` drawn so far, where the schedule stands: it advances on a
        skipped step too (as fp16's grad scaler's skips always did), so that the epochs end annealed."""
        return self.pos.epoch * self.steps_per_epoch + self.pos.step


@dataclass
class Drawn:
    """A batch on the device with its views and labels, the RNG state from before its views were drawn and
    the schedule's progress that set their sizes (what a checkpoint taken while it waits records, so that a
    resumed run draws the same views)."""

    step: int
    images: torch.Tensor
    views: torch.Tensor | list[torch.Tensor]
    labels: Optional[torch.Tensor]
    rng: dict
    progress: float

    @property
    def full(self) -> torch.Tensor:
        """The views at the view size (multi-crop's small views apart)."""
        return self.views[0] if isinstance(self.views, list) else self.views


class EpochBatches:
    """The batches of the epoch ``run.pos`` stands in, from its step on, one drawn ahead (``ahead``; None
    after the last): :func:`train_step` draws the next while the device still runs the step, so that
    launching the augmentation overlaps that work."""

    def __init__(self, run: Run):
        cfg, pos = run.cfg, run.pos
        world, rank, size = dist.world_size(), dist.rank(), cfg.train.batch_size
        self.batches = iterate_batches(run.train, size, epoch_generator(cfg.train.seed, pos.epoch), start=pos.step,
                                       rank=rank, world=world)
        self.labels = batch_labels(run.train, size, epoch_generator(cfg.train.seed, pos.epoch), start=pos.step,
                                   rank=rank, world=world) if cfg.loss.positives == "labels" else None
        self.device, self.make_views = run.device, run.views
        # The progress at the batch's own step, as its lr will be set (drawn ahead, a step before it trains),
        # from the time budget's agreed share: the same in every process, so the view sizes match across them.
        self.progress = lambda step: run.budget.progress(run.pos.epoch * run.steps_per_epoch + step)
        self.ahead: Optional[Drawn] = None
        self.draw_next(run.resumed_progress)  # a resumed run's first batch: as the checkpoint recorded it
        run.resumed_progress = None

    def draw_next(self, progress: Optional[float] = None) -> None:
        item = next(self.batches, None)
        if item is None:
            self.ahead = None
            return
        rng = rng_state(self.device)
        step, x = item
        x = x.to(self.device, non_blocking=True)
        y = next(self.labels).to(self.device, non_blocking=True) if self.labels is not None else None
        p = self.progress(step) if progress is None else progress
        self.ahead = Drawn(step, x, self.make_views(x, p), y, rng, p)


@dataclass
class StepResult:
    """A step as every process agreed on it (:func:`simxent.dist.agree`): the global ``loss``, whether the
    optimiser stepped (all losses and gradients finite), and the stop requests."""

    loss: float
    applied: bool
    time_up: bool
    signalled: bool
    lr: float
    temperature: float
    z1: torch.Tensor
    z2: torch.Tensor


def train_step(run: Run, batch: Drawn, draw_ahead: Callable[[], None], stop_requested: threading.Event
               ) -> StepResult:
    """One optimiser step on ``batch``: lr from the schedule, NT-Xent, backward, then (after ``draw_ahead``)
    one collective and one host sync carry the global loss, whether every gradient is finite (fp16's grad
    scaler checks its own), the stop requests and the share of the time budget used, so that all processes
    agree (the next step's lr included); the optimiser steps only when everything was finite."""
    cfg, pos, optimizer, scaler = run.cfg, run.pos, run.optimizer, run.scaler
    lr = set_lr(optimizer, run.budget.fraction(run.schedule_step, cfg.optim.min_lr), run.peak, cfg.loss.temperature_lr)
    run.slow_steps.start()
    run.buffers.take()
    t = run.net.temperature()
    loss, z1, z2 = step_loss(run.model, batch.views, t, run.device, run.dtype, run.views.n_views, batch.labels,
                             cfg.loss.decoupled, cfg.loss.multi_view, run.views.n_full)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # a non-finite loss gives non-finite gradients: caught below
    draw_ahead()
    time_up, used = run.budget.read_clock()
    grads = (p.grad for group in optimizer.param_groups for p in group["params"])
    finite = torch.ones((), device=run.device) if scaler.is_enabled() else finite_flag(grads)
    shared = dist.agree([loss, finite, time_up, stop_requested.is_set(), used], run.device)
    run.slow_steps.stop()
    loss_mean, finite_share, time_up_share, signal_share, used_mean = shared
    run.budget.agree(used_mean, time_up_share > 0)  # time passes whether or not the step is applied
    applied = math.isfinite(loss_mean) and finite_share == 1
    if applied:
        scaler.step(optimizer)
        scaler.update()
        pos.global_step += 1
    else:
        optimizer.zero_grad(set_to_none=True)
        run.buffers.restore()
    return StepResult(loss_mean, applied, time_up_share > 0, signal_share > 0, lr, t.item(), z1, z2)


class Throughput:
    """Images per second over the steps since the last reading."""

    def __init__(self):
        self.tick, self.seen = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.seen += images

    def read(self) -> float:
        now = time.perf_counter()
        rate, self.tick, self.seen = self.seen / (now - self.tick), now, 0
        return rate


def record_step(run: Run, batch: Drawn, result: StepResult, meter: Throughput, bar) -> None:
    """Log an applied step (every ``train.log_every`` and the last), or count a skipped one."""
    pos, cfg = run.pos, run.cfg
    if not result.applied:
        run.bad_steps, run.skipped_steps = run.bad_steps + 1, run.skipped_steps + 1
        log.warning("non-finite loss or gradient at step %d (%d in a row): step skipped", pos.global_step,
                    run.bad_steps)
        return
    run.bad_steps, run.last_loss = 0, result.loss
    meter.add(len(batch.images) * dist.world_size())
    final = (run.schedule_step == run.budget.total or result.time_up or result.signalled  # a short run logs
             or run.budget.finished())
    if pos.global_step % cfg.train.log_every == 0 or final:
        rate = meter.read()
        scalars = {"loss": result.loss, "lr": result.lr, "temperature": result.temperature, "images_per_s": rate}
        if cfg.augment.view_ratio_start is not None:
            scalars["view_size"] = batch.full.shape[-1]
        log_step(run.monitor, run.similarities if run.main else None, pos.global_step, scalars, result.z1,
                 result.z2)
        bar.set_postfix(loss=f"{result.loss:.3f}", img_s=f"{rate:.0f}")
        run.plain.update(Position(pos.epoch, batch.step, pos.global_step), result.loss, rate, final)


def stop_reason(run: Run, result: StepResult) -> Optional[str]:
    """"signal" or "max_time" (the deadline, as this process's clock or the agreed share of the budget says)
    when the run stops after this step; None to go on."""
    if not (result.time_up or result.signalled or run.budget.finished()):
        return None
    why = f"train.max_time={run.cfg.train.max_time:g}s reached"
    log.info("%s at epoch %d/%d step %d/%d: checkpointing and stopping",  # numbered as the progress lines
             "stop requested" if result.signalled else why, run.pos.epoch + 1, run.cfg.train.epochs, run.pos.step,
             run.steps_per_epoch)
    return "signal" if result.signalled else "max_time"


def train_epoch(run: Run, stop_requested: threading.Event) -> Optional[str]:
    """The rest of the epoch ``run.pos`` stands in, then a checkpoint and, when due, kNN monitoring; returns
    why the run stops early (:func:`stop_reason`), or None at the epoch's end."""
    cfg, pos = run.cfg, run.pos
    run.model.train()
    bar = tqdm(total=run.steps_per_epoch, initial=pos.step, desc=f"epoch {pos.epoch + 1}/{cfg.train.epochs}",
               unit="step", disable=not run.bars, leave=False)
    if isinstance(run.train, ImageStream) and run.train.workers:
        run.writer.join()  # its workers fork: never beside the writer's thread, whose locks they would inherit held
    meter, batches, reason = Throughput(), EpochBatches(run), None
    while batches.ahead is not None and reason is None:
        batch = batches.ahead
        result = train_step(run, batch, batches.draw_next, stop_requested)
        pos.step = batch.step + 1
        record_step(run, batch, result, meter, bar)
        if run.bad_steps >= cfg.train.max_bad_steps:
            raise diverged(run, batches.ahead)
        bar.update(1)
        if batch.step == 0:
            full, n = batch.full, len(batch.images)
            run.monitor.view_pairs("train/view_pairs", full[:n], full[n:2 * n], cfg.augment.mean, cfg.augment.std,
                                   pos.global_step)
        reason = stop_reason(run, result)
        # On applied steps only: a skipped one leaves global_step where a checkpoint may just have been taken.
        if (reason is None and result.applied and cfg.train.checkpoint_every
                and pos.global_step % cfg.train.checkpoint_every == 0):
            save(run, batches.ahead)
    bar.close()
    # A deadline met at the epoch's last step ends the epoch too (its kNN runs below); a signal there leaves
    # the epoch's end, and the kNN due then, to the resumed run.
    if reason is None or (reason == "max_time" and batches.ahead is None):
        pos.epoch, pos.step = pos.epoch + 1, 0
    if not run.has_steps_left:  # the schedule's end, not a cut or a pause
        recalibrate_batchnorm(run)
    save(run, batches.ahead)  # None at the epoch's end: nothing was drawn ahead
    # A preempted run has no time to spare for kNN. Saved again after it, so that the checkpoint carries the
    # kNN history into a resumed run's summary.
    if run.evaluates and reason != "signal" and (
            pos.epoch % cfg.eval.every == 0 or reason or pos.epoch == cfg.train.epochs):
        monitor_knn(run)
        save(run, batches.ahead)
    run.monitor.flush()
    return reason


def recalibrate_batchnorm(run: Run) -> None:
    """:func:`simxent.evaluate.reestimate_batchnorm` over ``train.bn_recalibration`` training images as
    evaluation encodes them (unaugmented, at data.image_size): training averaged the statistics, with
    momentum, over augmented views (crops, colour jitter, smaller sizes), a distribution kNN and probes never
    see. The images are a seeded draw, the same in every process, so each computes the same statistics on
    its own; a failure in any (an image gone since, out of memory) keeps training's statistics in all. The
    RNG is left as it was (an encoder with dropout draws from it), so a resumed run repeats."""
    cfg = run.cfg
    n = min(cfg.train.bn_recalibration, len(run.train))
    if n < 2:  # one image has no variance
        return
    if not isinstance(run.train, ImageArray):
        if run.main:
            log.warning("train.bn_recalibration: a streamed folder has no decoded images to re-estimate BatchNorm "
                        "statistics over; they stay as training averaged them")
        return
    started = time.monotonic()
    pick = recalibration_images(len(run.train), n, cfg.train.seed)
    encoder, before, failed, done = run.net.encoder, batchnorm_statistics(run.net.encoder), None, 0
    try:
        images = evaluation_images(run, pick)
    except (OSError, ValueError) as e:  # a file gone or changed since it was decoded
        failed = f"the training images cannot be read again ({e})"
    except torch.OutOfMemoryError as e:  # the images gathered on the GPU, where the training array may live
        failed = f"out of memory gathering {n} images ({e})"
    if failed is None:
        try:  # every process on the same images: the statistics agree without BatchNorm's collectives
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), \
                    dist.local_batchnorm(encoder):
                done = reestimate_batchnorm(encoder, images, run.views.full.normalize, run.device, run.dtype,
                                            cfg.eval.batch_size, cfg.train.channels_last)
        except torch.OutOfMemoryError as e:  # the schedule's work is done: saved, with training's statistics
            failed = f"out of memory at eval.batch_size={cfg.eval.batch_size} ({e})"
    # One outcome for all: a process that failed alone would save other statistics than the rest.
    if dist.agree([failed is not None], run.device)[0] > 0:
        set_batchnorm_statistics(encoder, before)
        log.warning("train.bn_recalibration: %s; BatchNorm statistics stay as training averaged them",
                    failed or "another process could not re-estimate them")
        return
    if done:
        log.info("BatchNorm statistics re-estimated over %d training images at %d px (%.1f s)", n,
                 cfg.data.image_size, time.monotonic() - started)


def recalibration_images(total: int, n: int, seed: int) -> torch.Tensor:
    """The indices, sorted, of the ``n`` of ``total`` training images train.bn_recalibration draws."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def evaluation_images(run: Run, pick: torch.Tensor) -> torch.Tensor:
    """Training images ``pick`` as evaluation decodes them: the array's own, unless it holds them padded for
    training crops (larger than the view, or not square), which are decoded again from their files."""
    train = run.train
    if train.sizes is None:
        return train.images[pick.to(train.images.device)]
    size, ratio = run.cfg.data.image_size, run.cfg.eval.crop_ratio
    return torch.from_numpy(np.stack([decode_eval(train.files[i], size, ratio) for i in pick.tolist()]))


def diverged(run: Run, ahead: Optional[Drawn]) -> TrainingError:
    """The error that ends a run after ``train.max_bad_steps`` non-finite steps in a row. Skipped steps leave
    the model, optimiser and buffers as the last applied step left them, so the good steps since the last
    checkpoint are saved first (positioned after the skipped batches), never a diverged model."""
    where = f"{checkpoint_path(run.cfg)} is unchanged"
    if run.pos.global_step > run.saved_step:
        save(run, ahead)
        where = f"{checkpoint_path(run.cfg)} holds the last good step ({run.pos.global_step})"
    return TrainingError(f"loss or gradients were non-finite for {run.bad_steps} steps in a row; stopping: {where} "
                         f"(lower optim.lr or use train.precision=fp32, then train.resume=auto)")


def history(run: Run) -> dict:
    """What the summary reports over all of a run's sessions, carried by its checkpoints."""
    return {"knn_top1": run.knn_top1, "skipped_steps": run.skipped_steps, "last_loss": run.last_loss,
            "seconds": run.seconds(), "train_images": len(run.train)}


def save(run: Run, ahead: Optional[Drawn]) -> None:
    """Checkpoint the run (every process takes part; the main one writes), with the RNG state from before
    the batch ``ahead`` was drawn, if one was."""
    net = run.net
    if not bool(finite_flag(list(net.parameters()) + list(net.buffers()))):
        raise TrainingError(f"the model holds non-finite values at step {run.pos.global_step}; not saving it over "
                            f"{checkpoint_path(run.cfg)}")
    progress = (run.budget.progress(run.schedule_step), run.budget.time_share(), run.budget.total)
    state = training_state(run.cfg, net, run.optimizer, run.scaler, run.pos, ahead.rng if ahead else None,
                           progress, ahead.progress if ahead else None,
                           history(run))
    if run.main:
        # The last write first, so that the files below land in order; if it failed, write() saves this
        # checkpoint before its error stops the run.
        run.writer.join()
        run.similarities.write()
        folder = checkpoint_path(run.cfg).parent
        if run.branch_from is not None:  # at the new branch's first save, not before: a failed start moves nothing
            aside = start_branch(folder, run.run_id, run.first_step, run.branch_from)
            if aside:
                log.warning("run %s continues from step %d: its step files not on that line are moved to %s",
                            run.run_id, run.first_step, aside)
            run.branch_from = None
        run.writer.write(state, folder, run.pos.global_step, run.cfg.train.keep_checkpoints, run.run_id)
    run.saved_step = run.pos.global_step


def point_name(epoch: int, epoch_step: int) -> str:
    """A point of a run as the log names it: ``epoch`` epochs done, and ``epoch_step`` steps into the next
    (0 at an epoch's end): "epoch 3", or "epoch 4 step 19" for a run stopped inside its fourth epoch."""
    return f"epoch {epoch + 1} step {epoch_step}" if epoch_step else f"epoch {epoch}"


def monitor_knn(run: Run) -> None:
    """kNN top-1 of data.val on rank 0 (the others wait), logged and kept for the summary."""
    with dist.main_process_first():
        if run.main:
            top1 = knn_monitor(run.net, run.bank, run.val, run.views.full, run.cfg, run.device, run.dtype)
            # epoch: epochs done; epoch_step: the step reached in the next (0 at an epoch's end), as logged
            run.knn_top1.append({"epoch": run.pos.epoch, "epoch_step": run.pos.step, "step": run.pos.global_step,
                                 "top1": top1})
            run.monitor.scalars({"knn_top1": top1}, run.pos.global_step, prefix="val/")
            log.info("%s: kNN top-1 %.4f", point_name(run.pos.epoch, run.pos.step), top1)


def skipped_everywhere(train: ImageArray | ImageStream, val: Optional[ImageArray] = None) -> list[dict]:
    """:func:`skipped_records` of data.train in every process (all call it: under torchrun each process
    streams its own slice of a streamed folder, and only it finds that slice's bad files), then of data.val
    (read by the main process alone), each file once."""
    mine = skipped_records(train)
    gathered = [mine] if dist.world_size() == 1 or not isinstance(train, ImageStream) else dist.gather_objects(mine)
    return merged_records(*gathered, skipped_records(val))


def merged_records(*lists: list[dict]) -> list[dict]:
    """Skipped-file records of several lists, each file once (the later list's reason)."""
    merged = {}
    for records in lists:
        merged.update({r["file"]: r for r in records})
    return list(merged.values())


def write_skipped(run: Run, records: Optional[list[dict]] = None) -> None:
    """skipped_images.txt (``records``, default this process's, data.train's and data.val's): one JSON record
    per line, so that a name holding a newline stays one entry."""
    if records is None:  # this process's: no collective
        records = merged_records(skipped_records(run.train), skipped_records(run.val))
    if run.main and records:
        write_text_atomic(run.out / "skipped_images.txt", "".join(json.dumps(r) + "\n" for r in records))


def earlier_end(run: Run) -> Optional[dict]:
    """The summary.json of an earlier session of this run that ended at the present step, when this session
    trained nothing, else None. A session killed within :func:`finish` wrote none, so the next one writes
    the run's end; one retraining a branch to the step its summary names trained steps."""
    if run.pos.global_step > run.first_step:
        return None
    try:
        ended = json.loads((run.out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    same = ended.get("run_id") == run.run_id and ended.get("global_step") == run.pos.global_step
    return ended if same else None


def finish(run: Run, reason: Optional[str]) -> dict:
    """Projector, figures, HPARAMS and skipped_images.txt; returns the summary (rank 0 writes summary.json).
    A session resumed at the step where an earlier one ended the run adds nothing to TensorBoard but the
    projector that a signal left out."""
    cfg, pos = run.cfg, run.pos
    run.writer.wait()  # the last checkpoint is on disk before the summary names it
    before = earlier_end(run) if run.main else None
    projector = before is None or before.get("stopped_by_signal")
    if run.main and projector and run.val is not None and cfg.eval.projector and reason != "signal":
        project_embeddings(run.net, run.val, run.views.full, cfg, run.device, run.dtype, run.monitor, pos.global_step)
    if run.main and before is None:
        run.similarities.figure(run.out / "figures" / "similarities.png")
        run.monitor.hparams(hparams(cfg), final_metrics(run.last_loss, run.knn_top1), pos.global_step)
    run.monitor.close()
    skipped = skipped_everywhere(run.train, run.val)
    write_skipped(run, skipped)  # a streamed folder finds its bad files as it reads them
    summary = {
        "checkpoint": str(checkpoint_path(cfg)),
        "run_id": run.run_id,
        "epoch": pos.epoch,  # where a resume starts: a signal at an epoch's last step leaves its end to do
        "epochs_trained": round(pos.epoch + pos.step / run.steps_per_epoch, 4),
        "global_step": pos.global_step,
        "world_size": dist.world_size(),
        # A resumed run whose budget was already spent trains nothing: its earlier session was stopped.
        "stopped_by_max_time": pos.epoch < cfg.train.epochs and (reason == "max_time" or (
            reason is None and run.budget.finished())),
        "schedule_progress": run.budget.progress(run.schedule_step),  # 1: annealed (the epochs or the budget done)
        "stopped_by_signal": reason == "signal",
        "skipped_steps": run.skipped_steps,
        "last_loss": run.last_loss if math.isfinite(run.last_loss) else None,  # strict JSON has no NaN
        # A session that trained nothing adds no time to the run (the checkpoint's figure predates the end).
        "seconds": run.seconds() if before is None else float(before.get("seconds", run.seconds())),
        "skipped_images": skipped,
        "knn_top1": run.knn_top1,
    }
    if run.main:
        write_text_atomic(run.out / "summary.json", json.dumps(summary, indent=2))
    return summary


def check_view_sizes(net: SimCLR, cfg: Config) -> None:
    """The encoder, built and probed for data.image_size (a ViT, say, takes one size only), must also encode
    the views' sizes, to as many features: the head takes a fixed size. A resolution schedule's sizes lie
    between its first and its last."""
    aug, image_size = cfg.augment, cfg.data.image_size
    sizes = {view_size(aug, image_size): "augment.view_ratio"}
    if aug.view_ratio_start is not None:
        sizes.setdefault(view_size(aug, image_size, 0.0), "augment.view_ratio_start")
    if aug.small_views:
        sizes.setdefault(small_view_size(aug, image_size), "augment.small_size")
        if aug.view_ratio_start is not None:
            sizes.setdefault(small_view_size(aug, image_size, 0.0), "augment.view_ratio_start")
    for size, key in sizes.items():
        d = feature_size(net.encoder, cfg.model.backbone, size, key=key) if size != image_size else net.feature_dim
        if d != net.feature_dim:
            raise ConfigError(
                f"model.backbone: {cfg.model.backbone} gives {d} features for {size} px views ({key}) but "
                f"{net.feature_dim} for {image_size} px images (data.image_size): its output size must not depend "
                f"on the image's (pool it, e.g. nn.AdaptiveAvgPool2d(1), then flatten)")


def build_model(cfg: Config, device: torch.device, world: int) -> tuple[SimCLR, nn.Module]:
    """The encoder + head on ``device`` (``net``, whose state is checkpointed) and what the step calls
    (``model``: ``net`` wrapped in DDP under several processes, compiled with ``train.compile``)."""
    net = SimCLR(cfg.model, cfg.data.image_size, Temperature(cfg.loss.temperature, cfg.loss.learn_temperature),
                 views_per_batch(cfg.augment))
    check_view_sizes(net, cfg)
    if world > 1 and cfg.train.sync_bn:
        net = dist.convert_batchnorm(net, device)
    net = net.to(device)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) if world > 1 else net
    return net, torch.compile(model) if cfg.train.compile else model


def time_budget(cfg: Config, steps_per_epoch: int, started: float) -> TimeBudget:
    """The run's schedule: warm-up and cosine over ``train.epochs`` x ``steps_per_epoch``, or, with
    ``train.max_time`` and ``train.budget_schedule``, over whichever ends first of them and the time budget."""
    warmup = warmup_steps(cfg.optim.warmup_epochs, cfg.train.epochs, steps_per_epoch)
    return TimeBudget(cfg.train.epochs * steps_per_epoch, warmup, cfg.train.max_time, started,
                      cfg.train.budget_schedule)


def _resume_state(cfg: Config, device, path: Path | None) -> dict | None:
    """The state of the checkpoint to resume (``path``, None: none), checked to fit this run."""
    if path is None:
        return None
    state = load_checkpoint(path, map_location=device)
    check_resumable(state, cfg, path)
    return state


def _claim_out(cfg: Config, held: ExitStack, device) -> tuple[Callable[[], str], bool, Path | None, dict | None]:
    """The main process locks ``out`` for the run's life (``held``), checks that this run may write there
    (see :mod:`simxent.rundir`) and returns the claim that makes it the run's (it returns the run id),
    whether that claim clears another run (``train.overwrite``), and what to resume."""
    out = writable_folder(cfg.out, "out")
    held.enter_context(run_lock(out))
    resume = _resume_path(cfg)
    state = _resume_state(cfg, device, resume)
    resumed_id = state.get("run_id") if state else None
    # Killed (or restarted by torchrun) before its first checkpoint: the folder is still its own, and the
    # run starts again from step 0. Only with no checkpoint file at all: unreadable ones stop the run.
    kept = has_checkpoints(out)
    if state is None and kept and cfg.train.resume == "auto" and not cfg.train.overwrite:
        raise ConfigError(f"train.resume=auto: no checkpoint in {out / 'checkpoints'} loads (each is named in a "
                          f"warning above); give one by path, or start again with train.overwrite=true, which "
                          f"deletes them")
    restarted = _torchrun_restart(out)
    restart = state is None and not kept and (cfg.train.resume == "auto" or restarted)
    if restart:
        resumed_id = recorded_run_id(out)
        if resumed_id and holds_run(out):
            log.warning("no checkpoint of run %s in %s: starting it again from step 0", resumed_id, out)
        elif not restarted:  # said, in case out is misspelt
            log.warning("train.resume=auto: %s holds no checkpoint to resume: training starts from step 0", out)
    resuming = state is not None or restart

    def claim_now() -> str:
        run_id = claim(out, resumed_id, resuming, cfg.train.overwrite, dist.torchrun_job())
        if state is None and not holds_run(out):  # nothing trained yet: the log starts empty, without what a
            (out / "train.log").unlink(missing_ok=True)  # refused run left there
        return run_id
    return claim_now, claim_clears(out, resumed_id, resuming, cfg.train.overwrite), resume, state


def pretrain(cfg: Config, progress: bool = True, train=None, cache_name: Optional[str] = None) -> dict:
    """Run (or resume) SimCLR pretraining as configured; returns the summary also written to summary.json.

    ``train``: a Dataset of images (PIL images or uint8 tensors, see :func:`simxent.data.item_image`) to
    train on instead of ``data.train``, which must then be empty. It is decoded like a folder: into the
    cache under ``cache_name`` (with its length and eight items' pixels), or into memory every run without one.
    Stops at ``train.epochs``, at ``train.max_time`` or on SIGTERM/SIGINT, always with a checkpoint. A stop
    on a signal returns too (the summary's ``stopped_by_signal`` is true: check it before evaluating); a
    second SIGINT, or a signal before the first step (nothing trained), raises KeyboardInterrupt at once.
    ``cfg`` is checked first (:func:`simxent.config.check_config`: fields set in Python too)."""
    check_config(cfg)
    check_one_source(cfg, train)  # before out is made, as every mistake found without reading images
    with stop_on_signals() as stop_requested, ExitStack() as held:
        run = setup_run(cfg, progress, held, train, cache_name)
        reason = None
        start_budget(run)
        stop_requested.steps_begun = True
        while reason is None and run.has_steps_left:
            reason = train_epoch(run, stop_requested)
        return finish(run, reason)


def warn_if_schedule_goes_back(resumed: dict, progress: float, total: int, cfg: Config) -> None:
    """Warn when a resumed run's schedule stands more than a step of its ``total`` behind the checkpoint's
    saved progress (more train.epochs, or train.budget_schedule=false after a time budget): its lr rises
    again before it anneals at the new end. (Another batch size rounds the position down by under a step.)"""
    saved = resumed.get("progress")
    if saved is not None and progress < float(saved) - 1 / max(1, total):
        log.warning("train.resume: the schedule goes back from the checkpoint's progress %.3f to %.3f of "
                    "train.epochs=%d: the lr rises again, then anneals at the new end", float(saved), progress,
                    cfg.train.epochs)


def start_budget(run: Run) -> None:
    """Start the time budget's clock, now that the steps begin, and say what the schedule spans."""
    left, budget = run.budget.start(), run.budget
    if run.pos.epoch >= run.cfg.train.epochs:
        if run.main:
            log.warning("train.resume: the run in %s has trained its train.epochs=%d, so nothing is trained; a larger "
                        "train.epochs continues it", run.out, run.cfg.train.epochs)
        return
    if not budget.spans:
        return
    if budget.finished():
        done = run.pos.epoch + run.pos.step / run.steps_per_epoch
        log.warning("train.resume: the run in %s ended annealed at its time budget, so its schedule is done and "
                    "nothing is trained; to train on, resume with train.budget_schedule=false, train.epochs above "
                    "the %.2f epochs done (now %d) and no train.max_time (or one that leaves room): the cosine "
                    "goes on over train.epochs and anneals at the last", run.out, done, run.cfg.train.epochs)
        return
    resumed = f", from progress {budget.start_progress:.3f}" if budget.start_progress else ""
    if left > 0:
        log.info("train.max_time=%gs: warm-up and cosine span the %.0f s left%s", budget.max_time, left, resumed)
    else:
        log.info("train.max_time=%gs: the deadline passed %.0f s before the first step", budget.max_time, -left)


@dataclass
class Opened:
    """What :func:`open_run` returns: the device, the autocast dtype, the run id (None in the other processes,
    and until ``claim_later``), the checkpoint to resume and its state (the main process's; the others read
    it later), and a claim of ``out`` that clears another run (``train.overwrite``), left to be made once the
    run's data and model are built, so that a setting that fails on them deletes nothing; train.log opens
    then, with the ``earlier`` warnings."""
    device: torch.device
    dtype: Optional[torch.dtype]
    run_id: Optional[str]
    resume: Path | None
    resumed: dict | None
    claim_later: Optional[Callable[[], str]]
    earlier: list[logging.LogRecord]


def open_run(cfg: Config, held: ExitStack) -> Opened:
    """Join the process group, claim ``out`` (main process; see :func:`_claim_out`) and set up logging."""
    device = dist.init(resolve_device(cfg.train.device))
    if cfg.train.batch_size % dist.world_size():
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) must divide by the "
                          f"{dist.world_size()} processes")
    for key in ("data.train", "data.val"):  # before out is made: a mistyped path leaves nothing behind
        path = getattr(cfg.data, key.split(".")[1])
        if path:
            with naming_the_key(key):
                check_source(path)
    # A mistyped checkpoint path, too; not on torchrun's restart, which goes on from its job's own checkpoint
    # once the file it was launched with may have been rotated away (see _resume_path).
    if cfg.train.resume not in ("", "auto") and not _torchrun_restart(Path(cfg.out)):
        resume_file(cfg.train.resume)
    run_id, resume, resumed, claim_later = None, None, None, None
    main = dist.is_main()
    level = logging.INFO if main else logging.WARNING
    setup_logging(None, level)  # stderr now; train.log opens below, once out is claimed, with what was said
    with held_warnings() as earlier:
        dtype = resolve_dtype(cfg.train.precision, device)  # fp16 on a CPU is refused before out is made
        if main and dist.job_id_is_torchruns_default():
            log.warning("torchrun's job id is 'none' (its default without --standalone or --rdzv-id): a restart "
                        "cannot tell this job's checkpoints in %s from an earlier job's launched the same way; give "
                        "each job its own --rdzv-id (SLURM's job id), or --standalone on one machine", cfg.out)
        if main:  # only the main process writes in out (and nothing before it holds the lock)
            claim_now, clears, resume, resumed = _claim_out(cfg, held, device)
            run_id, claim_later = (None, claim_now) if clears else (claim_now(), None)
    # The others resume the file the main process chose before its claim (which may record a new run id).
    resume = dist.from_main(resume)
    if cfg.data.cache and (cfg.data.val or not cfg.data.stream):  # data.val is always decoded into the cache
        writable_folder(cfg.data.cache_dir or default_cache_dir(), "data.cache_dir")
    if claim_later is None:
        setup_logging(Path(cfg.out) / "train.log" if main else None, level=level, earlier=earlier)
        held.push(close_log_file)
    return Opened(device, dtype, run_id, resume, resumed, claim_later, earlier)


def claim_deferred(opened: Opened, cfg: Config, held: ExitStack, hold: ExitStack, later: list) -> None:
    """Make ``opened``'s deferred claim (clearing the run ``out`` held) and open train.log with what was said
    before it (``later``: the records ``hold`` kept since :func:`open_run`)."""
    opened.run_id = opened.claim_later()
    hold.close()
    setup_logging(Path(cfg.out) / "train.log", earlier=[*opened.earlier, *later])
    held.push(close_log_file)


def setup_run(cfg: Config, progress: bool, held: ExitStack, dataset, cache_name: Optional[str]) -> Run:
    """Everything a run needs, built in order: process group and ``out``, data, model, optimiser, time budget,
    and the state of a resumed checkpoint; the config, TensorBoard and skipped_images.txt written."""
    started = time.monotonic()
    opened = open_run(cfg, held)
    device, dtype, resume, resumed = opened.device, opened.dtype, opened.resume, opened.resumed
    hold = held.enter_context(ExitStack())  # closed once a deferred claim is made, else on the way out
    later = hold.enter_context(held_warnings(logging.INFO)) if opened.claim_later else []
    set_threads(cfg.train.threads)
    configure_device(device)
    train, val, bank = _load_data_once(cfg, progress, dataset, cache_name)
    if not dist.is_main():  # the file the main process chose (open_run)
        resumed = _resume_state(cfg, device, resume)
    seed_everything(cfg.train.seed)  # after loading: decoding may draw from the RNG, a cache hit does not
    net, model = build_model(cfg, device, dist.world_size())
    torch.manual_seed(cfg.train.seed + dist.rank())  # each process draws its own augmentations
    batch, steps_per_epoch = cfg.train.batch_size, len(train) // cfg.train.batch_size
    peak = peak_lr(cfg.optim, batch)
    budget = time_budget(cfg, steps_per_epoch, started)
    optimizer = build_optimizer(net, cfg.optim, peak, net.temperature, cfg.loss.temperature_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    pos, ahead_progress, earlier = Position(), None, {}
    if resume:
        pos = restore_training(resume, resumed, net, optimizer, scaler, cfg.train.seed, batch)
        for key, was, now in changed_settings(resumed, cfg):
            level = logging.WARNING if key.startswith(CHANGES_TRAINING) else logging.INFO
            log.log(level, "resumed with %s=%s (the checkpoint's run had %s)", key, json.dumps(now), json.dumps(was))
        schedule_step = pos.epoch * steps_per_epoch + pos.step  # Run.schedule_step, before the Run is built
        budget.resume(*saved_progress(resumed, budget.total, schedule_step, batch))
        warn_if_schedule_goes_back(resumed, budget.progress(schedule_step), budget.total, cfg)
        ahead_progress = resumed.get("ahead_progress")  # None: an older checkpoint, or none drawn ahead
        earlier = resumed.get("history", {})
    del resumed  # the optimiser and model hold copies; the checkpoint's tensors can go
    if opened.claim_later:
        claim_deferred(opened, cfg, held, hold, later)
    main, out, run_id = dist.is_main(), Path(cfg.out), opened.run_id
    # purge_step drops what a killed run logged after its last checkpoint (or, killed before its first, at
    # all): one continuous curve. Never for a fresh folder: a purge in a new file would drop the events of
    # any file TensorBoard happens to read before it.
    restarted = resume or (main and holds_run(out))
    monitor = Monitor(out / "tb", enabled=main, purge_step=pos.global_step + 1 if restarted else None)
    bars = show_progress_bars(progress) and main
    run = Run(cfg, device, dtype, main, run_id, started, on_device(train, device), val, bank, net, model,
              MultiViewAugment(cfg, device), optimizer, scaler, peak, budget, monitor,
              SimilarityLog(out / "similarities.json", pos.global_step if resume else None), pos, bars,
              PlainProgress(main and not bars, cfg.train.epochs, steps_per_epoch), resumed_progress=ahead_progress)
    run.resume_history(earlier)
    held.push(run.writer.exit)  # on any way out, the checkpoint in flight lands before out is unlocked
    run.branch_from = resume if resume and run_id else None
    announce(run)
    return run


def announce(run: Run) -> None:
    """The run's opening lines: train.log, config.yaml, TensorBoard's config text, skipped_images.txt."""
    cfg, batch = run.cfg, run.cfg.train.batch_size
    aug, size = cfg.augment, cfg.data.image_size
    log.info("%d training images at data.image_size=%d (views %d px), %d steps/epoch, %s on %s x%d, autocast %s, "
             "global batch %d x %d views, peak lr %.4g", len(run.train), size, view_size(aug, size),
             run.steps_per_epoch, cfg.model.backbone, run.device, dist.world_size(), run.dtype, batch,
             run.views.n_views, run.peak)
    if run.views.n_views > 2:
        log.info("%d views per image, contrasted as loss.multi_view=%s", run.views.n_views, cfg.loss.multi_view)
    if aug.view_ratio_start is not None:
        log.info("resolution schedule: views grow from %d to %d px as the schedule progresses (train/view_size)",
                 view_size(aug, size, 0.0), view_size(aug, size))
    if run.main:
        warn_dropped_images(len(run.train), batch)
    if run.main and run.has_steps_left:  # a resume that trains nothing leaves the config that trained the run
        save_config(cfg, run.out / "config.yaml")
        run.monitor.config_text(format_config(cfg), run.pos.global_step)  # a resumed run's config at its step
    write_skipped(run)  # a streamed folder finds its bad files as it reads them: written again at the end
