"""Linear evaluation of a checkpoint: frozen features once, then a linear probe and weighted kNN,
optionally beside an untrained encoder of the same architecture."""
from __future__ import annotations

import logging
import math
from numbers import Integral, Real
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import figures as figures_lib
from .augment import Normalize
from .calibration import class_probabilities, per_class, reliability
from .checkpoint import (ENCODER_KEYS, checkpoint_encoder, encoder_digest, load_backbone, load_checkpoint,
                         saved_config)
from .config import MAX_IMAGE_SIZE, Config, ConfigError, DataConfig
from .data import (ImageArray, ImageList, class_difference, copied_images, find_source, load_configured, naming_the_key,
                   shared_files)
from .class_weights import check_spec, class_weights, positive_weights
from .evaluate import OBJECTIVES, Objective, classification_report, confusion_matrix, extract_features, knn_scores, \
    objective_named, probe_logits, train_linear_probe
from .files import json_text, missing_file, write_text_atomic
from .rundir import mark_output
from .label_files import check_label_sets, read_label_csv
from .models import backbone
from .monitor import Monitor
from .runtime import cpu_supports_bf16, resolve_device, resolve_dtype, seed_everything, setup_logging

log = logging.getLogger("simxent")


@dataclass
class ProbeOptions:
    epochs: int = 100
    lr: float = 1e-2
    # Chosen on validation splits of CIFAR-10 and tinyimagenet20: 0.003 to 0.007 above 5e-4 on each of four
    # frozen encoders (docs/studies.md, "The linear probe's weight decay").
    weight_decay: float = 0.05
    batch_size: int = 256
    label_smoothing: float = 0.0
    class_weight: str = "none"  # none | balanced | effective | FILE of "class_name weight" lines
    beta: float = 0.999  # for effective class weights (Cui et al. 2019)
    knn_k: int = 200
    knn_temperature: float = 0.1
    seed: int = 0


def probe_option_name(field: str, flags: bool) -> str:
    """How an error names a :class:`ProbeOptions` field: its command-line flag, or the field itself (Python)."""
    if not flags:
        return f"ProbeOptions.{field}"
    return "--probe-batch-size" if field == "batch_size" else "--" + field.replace("_", "-")


def check_probe_options(opts: ProbeOptions, flags: bool = False) -> None:
    """Refuse out-of-range probe options before any work, naming the command-line option (``flags``) or the
    ProbeOptions field.

    The probe's AdamW moves each weight by about ``lr`` per step on standardised features, so an lr above 1
    only throws the weights around; decoupled weight decay multiplies them by 1 - lr * weight_decay each
    step, which must stay positive. Comparisons are written so that NaN fails them; the types come first
    (from Python, ``ProbeOptions(epochs=2.5)`` would fail only once features are extracted)."""
    def name(field: str) -> str:
        return probe_option_name(field, flags)

    for field, kind in (("epochs", Integral), ("batch_size", Integral), ("knn_k", Integral), ("seed", Integral),
                        ("lr", Real), ("weight_decay", Real), ("beta", Real), ("label_smoothing", Real),
                        ("knn_temperature", Real)):  # numpy's scalars are numbers too
        value = getattr(opts, field)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{name(field)} must be {'an integer' if kind is Integral else 'a number'}, "
                              f"got {value!r}")
    rules = (("epochs", opts.epochs >= 1, "an integer >= 1"),
             ("lr", 0 < opts.lr <= 1, "a number in (0, 1]"),
             ("weight_decay", 0 <= opts.weight_decay < math.inf, "a finite number >= 0"),
             ("weight_decay", opts.lr * opts.weight_decay < 1,
              f"below 1 / {name('lr')} (AdamW scales the weights by 1 - lr * weight_decay per step)"),
             ("batch_size", opts.batch_size >= 1, "an integer >= 1"),
             ("label_smoothing", 0 <= opts.label_smoothing < 1, "a number in [0, 1)"),
             ("beta", 0 <= opts.beta < 1, "a number in [0, 1)"),
             ("knn_k", opts.knn_k >= 1, "an integer >= 1"),
             ("knn_temperature", 0 < opts.knn_temperature < math.inf, "a finite number > 0"))
    for field, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{name(field)} must be {rule}, got {getattr(opts, field)}")


def default_out(checkpoint: str | Path) -> Path:
    """Where linear evaluation writes without ``--out``: for a checkpoint in a simxent run (``RUN/checkpoints/*.pt``
    beside ``RUN/config.yaml``) ``RUN/linear_eval`` for its last.pt and ``RUN/linear_eval/<file stem>`` for
    another (``RUN/linear_eval/step-000000500-<run id>`` for that step file), so that one checkpoint's
    figures do not replace another's; else ``linear_eval`` beside the checkpoint file."""
    name = Path(checkpoint).name  # as given: a link named last.pt is the run's last checkpoint
    folder = Path(checkpoint).resolve().parent
    run = folder.parent
    if folder.name == "checkpoints" and (run / "config.yaml").is_file():
        return run / "linear_eval" if name == "last.pt" else run / "linear_eval" / Path(name).stem
    return folder / "linear_eval"


def tensorboard_folder(out: Path) -> Path:
    """``out/tb/<date-time>``: each evaluation a TensorBoard run of its own, so that two evaluations into one
    ``out`` are two curves, not one that runs through both."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    while True:  # made here, not by TensorBoard's writer: two evaluations within a second get one each
        folder = out / "tb" / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1


def check_outputs(out: Path, json_path: Optional[Path]) -> None:
    """Make sure the results can be written before any work: ``out`` is (or can be made) a writable folder,
    ``json_path`` a file in one."""
    if json_path is not None and json_path.is_dir():
        raise ConfigError(f"--json {json_path} is a folder; give a file name such as {json_path / 'eval.json'}")
    for option, folder in (("--out", out), ("--json", json_path.parent if json_path else None)):
        if folder is None:
            continue
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{option}: {folder} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ConfigError(f"{option}: cannot write in {folder}: {e.strerror or e}") from None
    mark_output(out)


def check_same_classes(train: ImageList, test: ImageList, train_dir, test_dir) -> None:
    """Both folders hold the same class folders, every image inside one (from their listings, before decoding:
    the decoded arrays keep the listings' classes and labels)."""
    for data, d in ((train, train_dir), (test, test_dir)):
        if not data.labelled:
            given = "an image list carries no classes: " if data.kind == "list" else ""
            raise ConfigError(f"{d}: {given}linear evaluation needs one sub-folder per class, with every image "
                              f"inside one")
    if train.classes != test.classes:
        raise ConfigError(f"classes of {test_dir} differ from those of {train_dir}: "
                          + class_difference(("train", train_dir, train.classes), ("test", test_dir, test.classes)))


def check_held_out(train: ImageArray, test: ImageArray, train_dir, test_dir) -> None:
    """Refuse a test folder that shares images with the training folder: its scores would be training scores
    (for kNN, each shared image would find its own copy). Copies under other names (the same pixels) are
    refused when they are half the test folder or more (a copy of the training folder), else warned about."""
    shared = shared_files(test, train)
    if shared.any():
        example = test.files[int(shared.nonzero()[0, 0])]
        raise ConfigError(f"{test_dir} shares {int(shared.sum())} of its {len(test)} images with {train_dir} "
                          f"(e.g. {example}): its scores would be measured on training images; give a held-out "
                          f"test folder")
    copies = copied_images(test, train)
    if copies.any():
        said = (f"{int(copies.sum())} of the {len(test)} images of {test_dir} have the pixels of a training image "
                f"of {train_dir} (e.g. {test.files[int(copies.nonzero()[0, 0])]})")
        if 2 * int(copies.sum()) >= len(test):
            raise ConfigError(f"{said}: the scores would be measured on training images; give a held-out test folder")
        log.warning("%s: they score as training images", said)


@dataclass
class Targets:
    """What the probe predicts: class indices (multiclass) or an (N, labels) 0/1 matrix (binary, multilabel)."""

    objective: str  # a key of OBJECTIVES
    names: list[str]  # classes, the positive class, or the labels
    train: torch.Tensor
    test: torch.Tensor
    outcomes: Optional[list[str]] = None  # an exclusive probe's classes by index (binary: the two folders)

    def __post_init__(self):
        self.outcomes = self.outcomes or self.names

    @property
    def kind(self) -> Objective:
        return objective_named(self.objective)


def positive_class_of(classes: list[str], positive: Optional[str]) -> str:
    """The binary probe's positive class among two class folders: ``positive``, or the second in sorted order."""
    if len(classes) != 2:
        raise ConfigError(f"--objective binary needs exactly 2 class folders, found {len(classes)}: "
                          f"{', '.join(classes)}")
    positive = positive or classes[1]
    if positive not in classes:
        raise ConfigError(f"--positive-class {positive!r} is not one of {', '.join(classes)}")
    return positive


def binary_targets(train: ImageArray, test: ImageArray, positive: Optional[str]) -> Targets:
    """Two class folders; ``positive`` (default: the second in sorted order) is label 1."""
    positive = positive_class_of(train.classes, positive)
    p = train.classes.index(positive)
    y_train, y_test = (train.labels == p).long().unsqueeze(1), (test.labels == p).long().unsqueeze(1)
    return Targets("binary", [positive], y_train, y_test, outcomes=[train.classes[1 - p], positive])


class ProbeCurves:
    """A probe's per-epoch curves, each scored with the probe as it stands at the end of the epoch, on every
    image of the split:

    - ``train_ce``, ``test_ce``: plain cross entropy, -log p(true class), averaged over images (for binary
      and multi-label probes the plain binary cross entropy, averaged over images and labels), without
      class weights or label smoothing: the two splits measured alike, so a test CE that rises while the
      train CE falls is over-fitting;
    - ``train_objective``: the loss the probe minimises on the training features (class or positive
      weights, label smoothing), which is not comparable with the test CE;
    - ``train_accuracy``, ``test_accuracy``: top-1 (multi-class) or the fraction of labels right at logit 0.
    """

    def __init__(self, train_x: torch.Tensor, test_x: torch.Tensor, targets: Targets,
                 weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
        self.train_x, self.test_x, self.targets = train_x, test_x, targets
        self.plain = targets.kind.loss()
        self.objective = targets.kind.loss(weight, label_smoothing)
        self.history = {k: [] for k in ("epoch", "train_ce", "test_ce", "train_objective", "train_accuracy",
                                        "test_accuracy")}

    @torch.no_grad()
    def record(self, epoch: int, probe) -> dict:
        """Append this epoch's row to ``history`` and return it."""
        train_logits, test_logits = probe_logits(probe, self.train_x), probe_logits(probe, self.test_x)
        y_train, y_test = self.targets.train, self.targets.test
        row = {"train_ce": self.plain(train_logits, y_train).item(),
               "test_ce": self.plain(test_logits, y_test).item(),
               "train_objective": self.objective(train_logits, y_train).item(),
               "train_accuracy": self.targets.kind.accuracy(train_logits, y_train),
               "test_accuracy": self.targets.kind.accuracy(test_logits, y_test)}
        self.history["epoch"].append(epoch)
        for k, v in row.items():
            self.history[k].append(v)
        return row


def objective_label(weight: Optional[torch.Tensor], label_smoothing: float, multiclass: bool) -> str:
    """How the figure names the training objective, e.g. "train objective (weighted, smoothed)";
    ``multiclass``: whether the loss takes label smoothing."""
    parts = (["weighted"] if weight is not None else []) + (["smoothed"] if multiclass and label_smoothing else [])
    return f"train objective ({', '.join(parts)})" if parts else "train objective (= train CE)"


def probe_report(name: str, logits: torch.Tensor, targets: Targets, monitor: Monitor, step: int,
                 figures: dict) -> dict:
    """The probe's test figures for its objective (accuracy and confusion, ROC AUC and F1, or mAP), and
    calibration and per-class loss where classes exclude each other; adds their plots to ``figures``."""
    linear = targets.kind.metrics(logits, targets.test, targets.names)
    if targets.objective == "binary":  # rows: true outcome (negative folder, then positive), columns: predicted
        linear["confusion"] = confusion_matrix(targets.kind.predict(logits).flatten(), targets.test.flatten(),
                                               2).tolist()
        linear["confusion_classes"] = targets.outcomes
    if "confusion" in linear:
        monitor.confusion_counts(f"{name}/probe/confusion", linear["confusion"], targets.outcomes, step)
        figures["confusion"] = figures_lib.confusion_matrix(linear["confusion"], targets.outcomes,
                                                            f"{name}: linear probe")
    if targets.kind.exclusive:
        probs = class_probabilities(logits, targets.objective)
        linear["calibration"] = reliability(probs, targets.test)
        linear["per_class_loss"] = per_class(logits, targets.test, targets.outcomes, targets.objective)
        monitor.scalars({"ece": linear["calibration"]["ece"]}, step, prefix=f"{name}/probe/")
        figures["reliability"] = figures_lib.reliability_diagram(linear["calibration"], name)
        figures["per_class"] = figures_lib.per_class_bars(linear["per_class_loss"], f"{name}: linear probe")
    if "per_label_ap" in linear:
        figures["per_label_ap"] = figures_lib.per_label_ap_bars(
            linear["per_label_ap"], targets.test.float().mean(0).tolist(), f"{name}: linear probe")
    return linear


def score_encoder(name: str, encoder, train: ImageArray, test: ImageArray, targets: Targets, normalize: Normalize,
                  device, dtype, opts: ProbeOptions, weight: Optional[torch.Tensor], monitor: Monitor,
                  feature_batch: int = 512, progress: bool = True, figures_dir: Optional[Path] = None) -> dict:
    """Linear probe (and, for folder classes, kNN) figures for one encoder. Curves, per-class loss and
    accuracy, confusion matrices and the reliability diagram go to TensorBoard and, with ``figures_dir``,
    to PNG files there."""
    encoder = encoder.to(device).to(memory_format=torch.channels_last)
    train_x = extract_features(encoder, train.images, normalize, device, feature_batch, dtype,
                               desc=f"{name}: train features", progress=progress)
    test_x = extract_features(encoder, test.images, normalize, device, feature_batch, dtype,
                              desc=f"{name}: test features", progress=progress)
    curves = ProbeCurves(train_x, test_x, targets, weight, opts.label_smoothing)

    def on_epoch(epoch, probe):  # recorded as epochs trained, 1 to opts.epochs, where the final scores are logged
        monitor.scalars(curves.record(epoch + 1, probe), epoch + 1, prefix=f"{name}/probe/")

    probe = train_linear_probe(train_x, targets.train, len(targets.names), opts.epochs, opts.lr, opts.weight_decay,
                               opts.batch_size, weight, opts.label_smoothing, opts.seed, on_epoch, progress,
                               objective=targets.objective)
    with torch.no_grad():
        logits = probe_logits(probe, test_x)
    result = {"feature_dim": train_x.shape[1], "probe_history": curves.history}
    figures = {"probe_curves": figures_lib.probe_curves(curves.history, f"{name}: linear probe",
                                                         objective_label(weight, opts.label_smoothing,
                                                                         targets.kind.smoothing))}
    linear = probe_report(name, logits, targets, monitor, opts.epochs, figures)
    for kind, fig in figures.items():
        publish(monitor, f"{name}/probe/{kind}", fig, opts.epochs, figures_dir, f"{name}_{kind}.png")
    result["linear"] = linear
    if train.classes and targets.kind.exclusive:
        knn = classification_report(
            knn_scores(train_x, train.labels, test_x, len(train.classes), opts.knn_k, opts.knn_temperature),
            test.labels, train.classes, floor=0.0)  # votes: a class without one is no top-5 hit
        knn["k"] = min(opts.knn_k, len(train))  # the neighbours that voted (options.knn_k: those asked for)
        if "confusion_classes" in linear:  # the probe's rows are its outcomes; the kNN's, the folder's classes
            knn["confusion_classes"] = train.classes
        monitor.confusion_counts(f"{name}/knn/confusion", knn["confusion"], train.classes)
        publish(monitor, f"{name}/knn/confusion", figures_lib.confusion_matrix(knn["confusion"], train.classes,
                f"{name}: kNN"), 0, figures_dir, f"{name}_knn_confusion.png")
        result["knn"] = knn
    return result


def publish(monitor: Monitor, tag: str, fig, step: int, figures_dir: Optional[Path], file_name: str) -> None:
    """``fig`` drawn once, for TensorBoard's image ``tag`` and, with ``figures_dir``, its PNG file there."""
    pixels = figures_lib.render(fig)
    monitor.figure(tag, pixels, step)
    if figures_dir is not None:
        figures_lib.save(pixels, figures_dir / file_name)


def feature_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for feature extraction: the checkpoint's ``train.precision``, except a precision a
    CPU runs slowly (fp16, about 65x slower than float32; bf16 without native support, 13-16x), which
    becomes ``auto`` there: the checkpoint may come from a GPU."""
    if device.type == "cpu" and (precision == "fp16" or (precision == "bf16" and not cpu_supports_bf16())):
        log.info("the checkpoint trained with train.precision=%s, slow on this CPU: features are extracted with "
                 "precision auto", precision)
        precision = "auto"
    return resolve_dtype(precision, device)


def encoder_to_score(checkpoint: str | Path, backbone_name: Optional[str] = None, cifar_stem: bool = False,
                     image_size: Optional[int] = None) -> tuple[torch.nn.Module, Config]:
    """The encoder to score and the settings that go with it: architecture, input normalisation, precision
    and image size; every other setting is the default.

    From a simxent checkpoint, only those keys of its saved config are read and checked (data folders, cache
    and machine settings are the command line's); ``image_size``, when given, replaces the saved one unread.
    From a plain state dict (``backbone_name``): ImageNet normalisation and ``image_size`` (default 32)."""
    if image_size is not None and not 8 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size: {image_size} is out of range (8 to {MAX_IMAGE_SIZE})")
    if backbone_name:
        cfg = Config()
        cfg.model.backbone, cfg.model.cifar_stem = backbone_name, cifar_stem
        cfg.data.image_size = image_size or cfg.data.image_size
        encoder = load_backbone(checkpoint, backbone_name, cifar_stem, image_size=cfg.data.image_size)
    else:
        if cifar_stem:
            raise ConfigError("--cifar-stem goes with --backbone; a simxent checkpoint's config says whether it has one")
        state = load_checkpoint(checkpoint)
        keys = ENCODER_KEYS + ("augment.mean", "augment.std", "train.precision")
        if image_size:  # replaces the saved size unread (a ViT's weights then say whether they fit it)
            keys = tuple(k for k in keys if k != "data.image_size")
        cfg = saved_config(state, checkpoint, keys)
        data = state["config"].get("data") if isinstance(state.get("config"), dict) else None
        trained = data.get("image_size") if isinstance(data, dict) else None  # unread: maybe malformed
        if image_size and trained is not None and image_size != trained:  # allowed (FixRes-style), never unsaid
            log.info("images are scored at %d px (--image-size); the checkpoint trained on %s px images", image_size,
                     trained)
        cfg.data.image_size = image_size or cfg.data.image_size
        encoder = checkpoint_encoder(state, cfg, checkpoint)
    return encoder, cfg


def check_eval_options(opts: ProbeOptions, crop_ratio: float, objective: str, train_labels, test_labels,
                       positive_class: Optional[str] = None, workers: int = 0) -> None:
    """One line naming the option of :func:`linear_eval` that is out of range, names no file, or belongs to
    another ``--objective`` (a label file given without ``--objective multilabel`` would be ignored, and the
    folders' classes scored instead)."""
    check_probe_options(opts)
    if not 0 < crop_ratio <= 1:
        raise ConfigError(f"--crop-ratio: {crop_ratio} is out of range ((0, 1])")
    if workers < 0:
        raise ConfigError(f"--workers: {workers} is out of range (>= 0)")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    for option, value, theirs in (("--train-labels", train_labels, "multilabel"),
                                  ("--test-labels", test_labels, "multilabel"),
                                  ("--positive-class", positive_class, "binary")):
        if value and objective != theirs:
            raise ConfigError(f"{option} applies to --objective {theirs}; this run's is {objective} (add "
                              f"--objective {theirs}, or leave {option} out)")
    if opts.label_smoothing and objective != "multiclass":  # BCE's targets are not smoothed: say so, not ignore it
        raise ConfigError(f"--label-smoothing applies to --objective multiclass; this run's is {objective}")
    if not OBJECTIVES[objective].exclusive:  # labels that do not exclude each other come from label files
        if not (train_labels and test_labels):
            raise ConfigError("--objective multilabel needs --train-labels and --test-labels CSV files")
        for option, path in (("--train-labels", train_labels), ("--test-labels", test_labels)):
            if not Path(path).is_file():
                raise ConfigError(f"{option}: {missing_file(path, 'label file')}")


def label_file_targets(train: ImageArray, test: ImageArray, train_dir, test_dir, opts: ProbeOptions,
                       positive_class: Optional[str], train_labels, test_labels) -> tuple[Targets, Optional[torch.Tensor]]:
    """Multi-label targets from the --train-labels / --test-labels CSVs, and positive-label weights."""
    y_train, names = read_label_csv(train_labels, train, train_dir)
    y_test, _ = read_label_csv(test_labels, test, test_dir, names)
    check_label_sets(y_test, names, train_labels, test_labels)
    return Targets("multilabel", names, y_train, y_test), positive_weights(opts.class_weight, y_train, names)


def positive_class_targets(train: ImageArray, test: ImageArray, train_dir, test_dir, opts: ProbeOptions,
                           positive_class: Optional[str], train_labels, test_labels
                           ) -> tuple[Targets, Optional[torch.Tensor]]:
    """Binary targets from two class folders, and the positive class's weight."""
    targets = binary_targets(train, test, positive_class)
    return targets, positive_weights(opts.class_weight, targets.train, targets.names)


def folder_class_targets(train: ImageArray, test: ImageArray, train_dir, test_dir, opts: ProbeOptions,
                         positive_class: Optional[str], train_labels, test_labels
                         ) -> tuple[Targets, Optional[torch.Tensor]]:
    """Class indices from the class folders, and the class weights."""
    if len(train.classes) < 2:  # every prediction would be right: a score of 1.0 that means nothing
        raise ConfigError(f"--train: {train_dir} has one class folder ({', '.join(train.classes)}); a probe and kNN "
                          f"need at least 2 classes")
    targets = Targets("multiclass", train.classes, train.labels, test.labels)
    return targets, class_weights(opts.class_weight, train.labels, train.classes, opts.beta)


# Where each objective's targets come from (its Objective says how they are scored).
TARGET_SOURCES = {"multiclass": folder_class_targets, "binary": positive_class_targets,
                  "multilabel": label_file_targets}


def eval_targets(objective: str, train: ImageArray, test: ImageArray, train_dir, test_dir, opts: ProbeOptions,
                 positive_class: Optional[str], train_labels, test_labels) -> tuple[Targets, Optional[torch.Tensor]]:
    """The probe's targets for ``objective`` and its class (or positive-label) weights; a warning when the
    kNN that goes with exclusive classes would ask for more neighbours than there are training images."""
    targets, weight = TARGET_SOURCES[objective](train, test, train_dir, test_dir, opts, positive_class, train_labels,
                                                test_labels)
    if train.classes and targets.kind.exclusive and opts.knn_k > len(train):
        # Not named as --knn-k: the sweep and the Python API reach this too, where k is not that option.
        log.warning("kNN's k = %d exceeds the %d training images: it votes with all of them", opts.knn_k, len(train))
    return targets, weight


def load_eval_folders(train_dir, test_dir, data: DataConfig, progress: bool, crop_ratio: float, objective: str,
                      class_weight: str = "none", positive_class: Optional[str] = None
                      ) -> tuple[ImageArray, ImageArray]:
    """The --train and --test folders decoded for evaluation, checked to share no image. Classes from folders,
    and the options that name them (``class_weight``'s file, ``positive_class``), are checked on the file
    listings first, before hours of decoding a folder that cannot be scored."""
    with naming_the_key("--train"):
        train = find_source(train_dir)
    with naming_the_key("--test"):
        test = find_source(test_dir)
    if OBJECTIVES[objective].exclusive:
        check_same_classes(train, test, train_dir, test_dir)
    if objective == "binary":
        positive_class_of(train.classes, positive_class)
    check_spec(class_weight, objective == "multiclass", train.classes)
    with naming_the_key("--train"):
        train = load_configured(train, data, progress, crop_ratio=crop_ratio)
    with naming_the_key("--test"):
        test = load_configured(test, data, progress, crop_ratio=crop_ratio)
    check_held_out(train, test, train_dir, test_dir)
    return train, test


def evaluation_header(encoder: torch.nn.Module, cfg: Config, train: ImageArray, test: ImageArray, targets: Targets,
                      weight: Optional[torch.Tensor]) -> dict:
    """What an evaluation's JSON says of what it scored: the weights' digest (one checkpoint path holds other
    weights once its run is resumed), the encoder's settings, the objective, classes and images."""
    return {
        "encoder_digest": encoder_digest(encoder),
        "backbone": cfg.model.backbone,
        "cifar_stem": cfg.model.cifar_stem,
        "image_size": cfg.data.image_size,
        "objective": targets.objective,
        "classes": targets.names if targets.objective == "multilabel" else train.classes,  # labels, not folders
        "targets": targets.names,
        "train_images": len(train),
        "test_images": len(test),
        "skipped_images": train.skipped + test.skipped,
        "class_weight": None if weight is None else dict(zip(targets.names, weight.tolist())),
    }


def linear_eval(checkpoint: str | Path, train_dir: str | Path, test_dir: str | Path,
                opts: Optional[ProbeOptions] = None,
                random_init: bool = False, out: Optional[str | Path] = None, json_path: Optional[str | Path] = None,
                device: str = "auto", workers: int = 2, cache: bool = True, progress: bool = True,
                objective: str = "multiclass", positive_class: Optional[str] = None,
                train_labels: Optional[str | Path] = None, test_labels: Optional[str | Path] = None,
                backbone_name: Optional[str] = None, cifar_stem: bool = False, image_size: Optional[int] = None,
                cache_dir: Optional[str | Path] = None, precision: Optional[str] = None,
                crop_ratio: float = 0.875) -> dict:
    """Score a pretrained checkpoint (and, with ``random_init``, an untrained twin) on labelled folders, with
    the probe's ``opts`` (default :class:`ProbeOptions`); returns every figure (``--json``'s content).

    ``objective``: ``multiclass`` (class folders), ``binary`` (two class folders, ``positive_class`` is 1)
    or ``multilabel`` (labels from ``train_labels`` / ``test_labels`` CSVs of ``file,label;label``).
    ``backbone_name`` scores a plain state dict instead (see :func:`encoder_to_score`). Images are decoded
    at ``image_size`` (default: the checkpoint's) into ``cache_dir`` (default: $SIMXENT_CACHE or
    ~/.cache/simxent); features are computed in ``precision`` (default: the checkpoint's). Images larger
    than the view are evaluated at the centre ``crop_ratio`` (see :func:`simxent.data.decode_eval`)."""
    setup_logging()
    opts = opts or ProbeOptions()
    check_eval_options(opts, crop_ratio, objective, train_labels, test_labels, positive_class, workers)
    dev = resolve_device(device, option="--device")
    pretrained, cfg = encoder_to_score(checkpoint, backbone_name, cifar_stem, image_size)
    out = Path(out) if out else default_out(checkpoint)
    check_outputs(out, Path(json_path) if json_path else None)
    dtype = feature_dtype(precision or cfg.train.precision, dev)
    data = DataConfig(image_size=cfg.data.image_size, cache=cache, cache_dir=str(cache_dir or ""), workers=workers)
    train, test = load_eval_folders(train_dir, test_dir, data, progress, crop_ratio, objective, opts.class_weight,
                                    positive_class)
    targets, weight = eval_targets(objective, train, test, train_dir, test_dir, opts, positive_class, train_labels,
                                   test_labels)
    normalize = Normalize(cfg.augment.mean, cfg.augment.std)
    tb_run = tensorboard_folder(out)
    monitor = Monitor(tb_run)
    encoders = {"pretrained": pretrained}
    if random_init:
        seed_everything(opts.seed)
        encoders["random_init"], _ = backbone(cfg.model.backbone, cfg.model.cifar_stem, cfg.data.image_size)
    # Absolute paths, as simxent-embed's meta.json: the JSON is read from elsewhere than where it was run.
    results = {"checkpoint": str(Path(checkpoint).resolve()),
               **evaluation_header(pretrained, cfg, train, test, targets, weight),
               "train": str(Path(train_dir).resolve()), "test": str(Path(test_dir).resolve()), "options": vars(opts),
               "figures": str((out / "figures" / tb_run.name).resolve())}  # each evaluation's own: its TB run's name
    try:
        for name, encoder in encoders.items():
            results[name] = score_encoder(name, encoder, train, test, targets, normalize, dev, dtype, opts, weight,
                                          monitor, progress=progress, figures_dir=Path(results["figures"]))
            log_scores(monitor, name, results[name], opts.epochs)
            if json_path:  # after each encoder: a baseline that fails (memory, Ctrl-C) keeps the pretrained figures
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(Path(json_path), json_text(results, indent=2))
    finally:
        monitor.close()
    log.info("figures in %s; TensorBoard run in %s", results["figures"], tb_run)
    return results


def log_scores(monitor: Monitor, name: str, result: dict, step: int) -> None:
    """An encoder's final scores as TensorBoard scalars (``{name}/linear/top1``, ``{name}/knn/top1``, ...),
    beside the probe's curves, as pretraining logs its ``final/`` ones."""
    for scorer in ("linear", "knn"):
        values = {k: v for k, v in result.get(scorer, {}).items() if isinstance(v, float)}
        monitor.scalars(values, step, prefix=f"{name}/{scorer}/")


def format_results(results: dict) -> str:
    """A small table: one row per encoder with the objective's headline figures (those measured: no top-5
    for five classes or fewer)."""
    objective = results.get("objective", "multiclass")
    columns = [(a, b) for a, b in OBJECTIVES[objective].columns if results["pretrained"][a][b] is not None]
    names = [f"{a} {b}".replace("balanced_accuracy", "balanced acc.") for a, b in columns]
    width = max(len(n) for n in names) + 2
    rows = ["encoder      " + "".join(f"{n:>{width}}" for n in names)]
    for name in ("pretrained", "random_init"):
        if name in results:
            rows.append(f"{name:<13}" + "".join(f"{results[name][a][b]:>{width}.4f}" for a, b in columns))
    return "\n".join(rows)
