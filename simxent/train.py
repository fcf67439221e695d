"""The pretraining loop: two views, encoder + head, NT-Xent, one optimiser step; checkpoints, logs, kNN."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .augment import ViewAugment
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError, save_config, to_dict
from .data import ImageArray, iterate_batches, load_folder
from .evaluate import autocast, extract_features, knn_scores, topk_accuracy
from .loss import Temperature, contrastive_stats, nt_xent
from .models import SimCLR
from .monitor import Monitor
from .runtime import resolve_device, resolve_dtype, rng_state, seed_everything, set_rng_state, set_threads, setup_logging
from .schedule import build_optimizer, lr_at, peak_lr

log = logging.getLogger("simxent")


class TrainingError(RuntimeError):
    """The run cannot go on (for example, the loss stayed non-finite)."""


@dataclass
class Position:
    """Where the run stands: ``epoch`` and ``step`` inside it (the next step to run), ``global_step``."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends on (seed, epoch) only, so a resumed run replays it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def checkpoint_path(cfg: Config) -> Path:
    return Path(cfg.out) / "checkpoints" / "last.pt"


def _state(cfg, model, temperature, optimizer, scaler, pos: Position) -> dict:
    return {
        "simxent_version": __version__,
        "config": to_dict(cfg),
        "encoder": model.encoder.state_dict(),
        "head": model.head.state_dict(),
        "temperature": temperature.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "position": {"epoch": pos.epoch, "step": pos.step, "global_step": pos.global_step},
        "rng": rng_state(),
    }


def _resume_path(cfg: Config) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        path = checkpoint_path(cfg)
        return path if path.exists() else None
    path = Path(cfg.train.resume)
    if not path.is_file():
        raise ConfigError(f"train.resume: checkpoint not found: {path}")
    return path


def knn_monitor(model: SimCLR, bank: ImageArray | None, val: ImageArray, augment: ViewAugment, cfg: Config,
                device, dtype) -> float:
    """kNN top-1 of ``val`` against the labelled training images, or leave-one-out within ``val``."""
    feats = lambda data, desc: extract_features(  # noqa: E731
        model.encoder, data.images, augment.normalize, device, cfg.eval.batch_size, dtype,
        cfg.train.channels_last, desc=desc)
    query = feats(val, "kNN val")
    if bank is None:
        scores = knn_scores(query, val.labels, query, len(val.classes), cfg.eval.knn_k, cfg.eval.knn_temperature,
                            exclude_self=True)
    else:
        scores = knn_scores(feats(bank, "kNN bank"), bank.labels, query, len(val.classes), cfg.eval.knn_k,
                            cfg.eval.knn_temperature)
    return topk_accuracy(scores, val.labels, 1)


def load_data(cfg: Config, progress: bool = True) -> tuple[ImageArray, ImageArray | None, ImageArray | None]:
    """Training images, the optional labelled validation folder, and the kNN bank (train, if labelled)."""
    if not cfg.data.train:
        raise ConfigError("data.train: no image folder given (set data.train=PATH)")
    opts = dict(cache=cfg.data.cache, cache_dir=cfg.data.cache_dir or None, workers=cfg.data.workers,
                on_bad_image=cfg.data.on_bad_image, progress=progress)
    train = load_folder(cfg.data.train, cfg.data.image_size, **opts)
    if len(train) < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {len(train)} readable images in {cfg.data.train}")
    val = bank = None
    if cfg.data.val and cfg.eval.every > 0:
        val = load_folder(cfg.data.val, cfg.data.image_size, **opts)
        if not val.classes or (val.labels < 0).any():
            raise ConfigError(f"data.val: {cfg.data.val} needs one sub-folder per class for kNN evaluation")
        if train.classes and (train.labels >= 0).all():
            if train.classes != val.classes:
                raise ConfigError(f"data.val: classes of {cfg.data.val} differ from those of {cfg.data.train}")
            bank = train
    return train, val, bank


def pretrain(cfg: Config, progress: bool = True) -> dict:
    """Run (or resume) SimCLR pretraining as configured; returns the summary also written to summary.json."""
    started = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "train.log")
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.precision, device)
    set_threads(cfg.train.threads)
    train, val, bank = load_data(cfg, progress)
    seed_everything(cfg.train.seed)  # after loading: decoding may draw from the RNG, a cache hit does not

    model = SimCLR(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    temperature = Temperature(cfg.loss.temperature, cfg.loss.learn_temperature).to(device)
    augment = ViewAugment(cfg.augment, cfg.data.image_size).to(device)
    batch = cfg.train.batch_size
    steps_per_epoch = len(train) // batch
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    peak = peak_lr(cfg.optim, batch)
    optimizer = build_optimizer(nn.ModuleList([model, temperature]), cfg.optim, peak)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    pos = Position()
    resume = _resume_path(cfg)
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
        temperature.load_state_dict(state["temperature"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        pos = Position(**state["position"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, step %d", resume, pos.epoch, pos.step)
    save_config(cfg, out / "config.yaml")
    monitor = Monitor(out / "tb", purge_step=pos.global_step + 1 if resume else None)
    log.info("%d training images, %d steps/epoch, %s on %s, autocast %s, peak lr %.4g",
             len(train), steps_per_epoch, cfg.model.backbone, device, dtype, peak)

    def save():
        save_checkpoint(_state(cfg, model, temperature, optimizer, scaler, pos), checkpoint_path(cfg))

    history = {"knn_top1": []}
    bad_steps, stopped_early, last_loss = 0, False, float("nan")
    while pos.epoch < cfg.train.epochs and not stopped_early:
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=pos.step, desc=f"epoch {pos.epoch + 1}/{cfg.train.epochs}",
                   unit="step", disable=not progress, leave=False)
        tick, seen = time.perf_counter(), 0
        for step, x in iterate_batches(train, batch, epoch_generator(cfg.train.seed, pos.epoch), start=pos.step):
            lr = lr_at(pos.global_step, total_steps, warmup, peak, cfg.optim.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = x.to(device, non_blocking=True)
            v1, v2 = augment(x), augment(x)
            views = torch.cat([v1, v2])
            if cfg.train.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                z = model(views)
            z1, z2 = z.float().chunk(2)
            t = temperature()
            loss = nt_xent(z1, z2, t)
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                bad_steps += 1
                log.warning("non-finite loss at step %d (%d in a row): step skipped", pos.global_step, bad_steps)
                if bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"loss was non-finite for {bad_steps} steps in a row; stopping without overwriting "
                        f"{checkpoint_path(cfg)} (lower optim.lr or use train.precision=fp32)")
                continue
            bad_steps = 0
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            pos.step, pos.global_step = step + 1, pos.global_step + 1
            seen += len(x)
            bar.update(1)
            if pos.global_step % cfg.train.log_every == 0:
                rate = seen / (time.perf_counter() - tick)
                tick, seen = time.perf_counter(), 0
                stats = contrastive_stats(z1, z2)
                monitor.scalars({"loss": last_loss, "lr": lr, "temperature": t.item(), "images_per_s": rate,
                                 **stats}, pos.global_step, prefix="train/")
                bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{rate:.0f}")
            if step == 0:
                monitor.view_pairs("train/view_pairs", v1, v2, cfg.augment.mean, cfg.augment.std, pos.global_step)
            if cfg.train.max_time and time.monotonic() - started >= cfg.train.max_time:
                stopped_early = True
                log.info("train.max_time=%gs reached at epoch %d step %d: checkpointing and stopping",
                         cfg.train.max_time, pos.epoch, pos.step)
                break
        bar.close()
        if not stopped_early:
            pos.epoch, pos.step = pos.epoch + 1, 0
        save()
        if val is not None and (pos.epoch % cfg.eval.every == 0 or stopped_early or pos.epoch == cfg.train.epochs):
            top1 = knn_monitor(model, bank, val, augment, cfg, device, dtype)
            history["knn_top1"].append({"epoch": pos.epoch, "step": pos.global_step, "top1": top1})
            monitor.scalars({"knn_top1": top1}, pos.global_step, prefix="val/")
            log.info("epoch %d: kNN top-1 %.4f", pos.epoch, top1)
        monitor.flush()
    monitor.close()
    summary = {
        "checkpoint": str(checkpoint_path(cfg)),
        "epoch": pos.epoch,
        "global_step": pos.global_step,
        "stopped_by_max_time": stopped_early,
        "last_loss": last_loss,
        "seconds": time.monotonic() - started,
        "skipped_images": train.skipped,
        **history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
