"""Linear evaluation of a checkpoint: frozen features once, then a linear probe and weighted kNN,
optionally beside an untrained encoder of the same architecture."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .augment import Normalize
from .checkpoint import load_checkpoint
from .config import ConfigError, config_from_dict
from .data import ImageArray, load_folder
from .class_weights import class_weights
from .evaluate import classification_report, extract_features, knn_scores, train_linear_probe
from .models import backbone
from .monitor import Monitor
from .runtime import resolve_device, resolve_dtype, seed_everything, set_threads, setup_logging

log = logging.getLogger("simxent")


@dataclass
class ProbeOptions:
    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 5e-4
    batch_size: int = 256
    label_smoothing: float = 0.0
    class_weight: str = "none"  # none | balanced | effective | FILE of "class_name weight" lines
    beta: float = 0.999  # for effective class weights (Cui et al. 2019)
    knn_k: int = 200
    knn_temperature: float = 0.1
    seed: int = 0


def check_same_classes(train: ImageArray, test: ImageArray, train_dir, test_dir) -> None:
    for data, d in ((train, train_dir), (test, test_dir)):
        if not data.classes or (data.labels < 0).any():
            raise ConfigError(f"{d}: linear evaluation needs one sub-folder per class, with every image inside one")
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise ConfigError(f"classes of {test_dir} differ from those of {train_dir}: "
                          f"only in train: {only_train or '-'}; only in test: {only_test or '-'}")


def score_encoder(name: str, encoder, train: ImageArray, test: ImageArray, normalize: Normalize, device, dtype,
                  opts: ProbeOptions, weight: Optional[torch.Tensor], monitor: Monitor,
                  feature_batch: int = 512, progress: bool = True) -> dict:
    """Linear probe and kNN figures for one encoder; curves and confusion matrix go to TensorBoard."""
    encoder = encoder.to(device).to(memory_format=torch.channels_last)
    train_x = extract_features(encoder, train.images, normalize, device, feature_batch, dtype,
                               desc=f"{name}: train features", progress=progress)
    test_x = extract_features(encoder, test.images, normalize, device, feature_batch, dtype,
                              desc=f"{name}: test features", progress=progress)
    classes = train.classes

    def on_epoch(epoch, probe, train_loss):
        with torch.no_grad():
            logits = probe(test_x)
            test_loss = torch.nn.functional.cross_entropy(logits, test.labels).item()
            acc = (logits.argmax(1) == test.labels).float().mean().item()
        monitor.scalars({"train_loss": train_loss, "test_loss": test_loss, "test_top1": acc}, epoch,
                        prefix=f"{name}/probe/")

    probe = train_linear_probe(train_x, train.labels, len(classes), opts.epochs, opts.lr, opts.weight_decay,
                               opts.batch_size, weight, opts.label_smoothing, opts.seed, on_epoch, progress)
    with torch.no_grad():
        linear = classification_report(probe(test_x), test.labels, classes)
    knn = classification_report(
        knn_scores(train_x, train.labels, test_x, len(classes), opts.knn_k, opts.knn_temperature),
        test.labels, classes)
    monitor.confusion(f"{name}/probe/confusion", linear["confusion"], classes)
    monitor.confusion(f"{name}/knn/confusion", knn["confusion"], classes)
    return {"linear": linear, "knn": knn, "feature_dim": train_x.shape[1]}


def linear_eval(checkpoint: str | Path, train_dir: str | Path, test_dir: str | Path, opts: ProbeOptions,
                random_init: bool = False, out: Optional[str | Path] = None, json_path: Optional[str | Path] = None,
                device: str = "auto", workers: int = 2, cache: bool = True, progress: bool = True) -> dict:
    """Score a pretrained checkpoint (and, with ``random_init``, an untrained twin) on labelled folders."""
    setup_logging()
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    out = Path(out) if out else Path(checkpoint).resolve().parent.parent / "linear_eval"
    dev = resolve_device(device)
    dtype = resolve_dtype(cfg.train.precision, dev)
    set_threads(cfg.train.threads)
    load = dict(cache=cache, cache_dir=cfg.data.cache_dir or None, workers=workers, on_bad_image=cfg.data.on_bad_image)
    train = load_folder(train_dir, cfg.data.image_size, **load)
    test = load_folder(test_dir, cfg.data.image_size, **load)
    check_same_classes(train, test, train_dir, test_dir)
    weight = class_weights(opts.class_weight, train.labels, train.classes, opts.beta)
    normalize = Normalize(cfg.augment.mean, cfg.augment.std)
    monitor = Monitor(out / "tb")

    encoders = {}
    pretrained, _ = backbone(cfg.model.backbone, cfg.model.cifar_stem)
    pretrained.load_state_dict(state["encoder"])
    encoders["pretrained"] = pretrained
    if random_init:
        seed_everything(opts.seed)
        encoders["random_init"], _ = backbone(cfg.model.backbone, cfg.model.cifar_stem)
    results = {
        "checkpoint": str(checkpoint),
        "train": str(train_dir),
        "test": str(test_dir),
        "classes": train.classes,
        "train_images": len(train),
        "test_images": len(test),
        "skipped_images": train.skipped + test.skipped,
        "class_weight": None if weight is None else dict(zip(train.classes, weight.tolist())),
        "options": vars(opts),
    }
    for name, encoder in encoders.items():
        results[name] = score_encoder(name, encoder, train, test, normalize, dev, dtype, opts, weight, monitor,
                                      progress=progress)
    monitor.close()
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def format_results(results: dict) -> str:
    """A small table: one row per encoder, linear and kNN top-1/top-5."""
    rows = ["encoder       linear top-1  linear top-5  kNN top-1  kNN top-5"]
    for name in ("pretrained", "random_init"):
        if name in results:
            r = results[name]
            rows.append(f"{name:<13} {r['linear']['top1']:>12.4f}  {r['linear']['top5']:>12.4f}  "
                        f"{r['knn']['top1']:>9.4f}  {r['knn']['top5']:>9.4f}")
    return "\n".join(rows)
