"""Run configuration: dataclasses read from YAML with strict keys and ``dotted.key=value`` overrides.

Every key a user can set lives here, with its default and meaning (the ``help`` of each field, which
``simxent-pretrain --help``, ``--print-config`` and the README's table are made from). Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the key (and the nearest valid
one) before any work starts. Presets ship in ``simxent/configs/`` and are named without the ``.yaml``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import logging
import math
import numbers
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .files import missing_file, write_text_atomic


# The range a learnt temperature is kept in (simxent.loss.Temperature). 0.01 is CLIP's bound (logit scale
# <= 100); the loss's gradients grow as 1/t below it. At 1 the logits span only [-1, 1], the softmax over
# 2N - 1 candidates is nearly flat and little is learnt. SimCLR's temperature study spans 0.05 to 1.
LEARNT_TEMPERATURE_RANGE = (0.01, 1.0)
MAX_IMAGE_SIZE = 1024  # px; every image is decoded at this size, N * size^2 * 3 bytes in all
MAX_DECODE_SIZE = 1536  # px; data.decode_size's default at MAX_IMAGE_SIZE (1.5 x)
log = logging.getLogger("simxent")


class ConfigError(ValueError):
    """A configuration mistake, reported with the offending key or file."""


def setting(default: Any, help: str) -> Any:
    """A config field whose meaning is data, so that --help, --print-config and the README share it."""
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class DataConfig:
    train: str = setting("", "folder of images, at any depth, or a text file listing image paths; class "
                                 "sub-folders optional (labels unused)")
    val: str = setting("", "labelled folder (one sub-folder per class) for kNN monitoring; empty: none")
    image_size: int = setting(32, "image size in px, 8 to 1024, of evaluation and (times augment.view_ratio, "
                                  "or its schedule) of the views; images no larger are decoded to it (shorter "
                                  "side, centre crop)")
    decode_size: Optional[int] = setting(None, "longer side of cached images larger than the view; "
                                               "null: 1.5 x data.image_size")
    cache: bool = setting(True, "decode once into a memory-mapped uint8 array, reused across epochs and runs")
    cache_dir: str = setting("", "where decoded arrays live; empty: $SIMXENT_CACHE or ~/.cache/simxent")
    stream: bool = setting(False, "decode data.train every epoch in data.workers processes instead of caching "
                                  "(folders too large to keep decoded)")
    workers: int = setting(2, "decoding processes")
    on_bad_image: str = setting("skip", "skip: warn, name and count unreadable files; error: stop on the first")


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area range")
    flip_p: float = setting(0.5, "horizontal flip probability")
    jitter_strength: float = setting(1.0, "s: brightness, contrast, saturation 0.8s, hue 0.2s")
    jitter_p: float = setting(0.8, "colour-jitter probability")
    jitter_order: str = setting("batch", "order of brightness, contrast, saturation, hue: batch: drawn per view "
                                         "batch, shared by its images; image: drawn per image, as torchvision "
                                         "(on a GPU 4x the colour-jitter work)")
    grayscale_p: float = setting(0.2, "grayscale probability")
    blur_p: Optional[float] = setting(None, "Gaussian blur probability; null: 0.5 from data.image_size 64 px, 0 below. "
                                          "Sigma in [0.1, 2.0] x view size / 224 (SimCLR's at 224 px), kernel about "
                                          "10 % of the view's side")
    solarize_p: float = setting(0.0, "solarize probability")
    mean: tuple[float, float, float] = setting((0.485, 0.456, 0.406), "normalisation mean per channel (ImageNet)")
    std: tuple[float, float, float] = setting((0.229, 0.224, 0.225), "normalisation std per channel (ImageNet)")
    views: int = setting(2, "views per image at the view size (>= 2)")
    small_views: int = setting(0, "extra small views per image (multi-crop, as SwAV), at augment.small_size")
    view_ratio: float = setting(1.0, "training views' side as a fraction of data.image_size, in (0, 1]: below 1 "
                                     "trains on the same crops at a lower resolution (cheaper steps, FixRes) and "
                                     "still evaluates at data.image_size")
    view_ratio_start: Optional[float] = setting(None, "null: views at augment.view_ratio throughout; else a "
                                                      "resolution schedule: the ratio at the start, rising with the lr "
                                                      "schedule's progress to augment.view_ratio at its end, "
                                                      "in steps of at most 4 px (train.compile recompiles "
                                                      "for each size)")
    small_size: Optional[int] = setting(None, "small views' size in px; null: half of the view size")
    small_crop_scale: tuple[float, float] = setting((0.05, 0.4), "RandomResizedCrop area range of the small views")


@dataclass
class ModelConfig:
    backbone: str = setting("resnet18", "convnet or convnet_slim (simxent's CPU encoders), any torchvision "
                                        "classification model (resnet50, convnext_tiny, vit_b_16, ...: "
                                        "docs/backbones.md) or package.module:function")
    cifar_stem: bool = setting(False, "3x3 stride-1 first conv and no max-pool, for 32 px images (ResNet family; "
                                      "the convnets always have it)")
    weights: str = setting("", "start the encoder from a state dict (torchvision's, classifier keys ignored) or "
                               "a simxent checkpoint; empty: random")
    head_hidden: int = setting(2048, "projection MLP hidden width")
    head_out: int = setting(128, "projection size")
    head_layers: int = setting(2, "linear layers in the projection MLP (BatchNorm + ReLU between)")
    view_batches: str = setting("joint", "training forward: joint: all views in one batch, BatchNorm statistics "
                                         "over all views (SimCLR's paper); separate: one forward per view "
                                         "(lightly's and solo-learn's examples)")
    matmul_convs: bool = setting(True, "in CPU training, convolutions with at most 16 output positions (bf16 "
                                       "autocast) or 9 (float32) as matrix products, where oneDNN's kernels are "
                                       "slow (simxent/matmul_conv.py); false: oneDNN throughout")


@dataclass
class LossConfig:
    temperature: float = setting(0.5, "NT-Xent temperature (if learnt, its start: in [0.01, 1])")
    learn_temperature: bool = setting(False, "learn log(temperature), starting at loss.temperature, kept in "
                                             "[0.01, 1]")
    temperature_lr: float = setting(1e-3, "the learnt log(temperature)'s own lr: not batch-scaled, same warm-up "
                                          "and cosine, no weight decay or LARS adaptation")
    decoupled: bool = setting(False, "decoupled contrastive learning (Yeh et al. 2022): an anchor's positives "
                                     "are left out of its softmax's denominator, which holds its negatives only "
                                     "(a learnt temperature then tends to its lower bound)")
    positives: str = setting("views", "views: an anchor's positives are its image's other views (self-supervised); "
                                      "labels: every other view of its class (supervised contrastive, needs class "
                                      "sub-folders in data.train)")
    multi_view: str = setting("joint", "with more than two views (multi-crop): joint: one softmax per anchor over "
                                       "every other view, its image's other views the positives; pairs: the mean "
                                       "of two-view NT-Xent over every pair of views (CMC's full graph of pairs); "
                                       "full_pairs: over the pairs with a full-size view (small views are not "
                                       "paired with each other)")


@dataclass
class OptimConfig:
    name: str = setting("lars", "sgd, adamw or lars (no decay or adaptation on biases, norms, per-channel "
                                "scales and ViT/Swin tokens)")
    lr: float = setting(0.3, "learning rate at a batch of 256, scaled by optim.lr_scaling")
    lr_scaling: str = setting("linear", "linear (lr times B/256), sqrt (lr times sqrt(B/256)) or none")
    weight_decay: float = setting(1e-6, "never applied to biases, norms, per-channel scales and ViT/Swin tokens")
    momentum: float = setting(0.9, "SGD and LARS momentum")
    warmup_epochs: float = setting(10.0, "linear warm-up, then cosine decay; one not shorter than train.epochs is "
                                         "cut to a tenth of the run")
    min_lr: float = setting(0.0, "end of the cosine decay, as a fraction of the peak lr")


@dataclass
class TrainConfig:
    epochs: int = setting(100, "passes over data.train")
    batch_size: int = setting(256, "global images per step over all processes (each in augment.views + "
                                     "augment.small_views views)")
    max_time: float = setting(0.0, "seconds from the run's start; 0: no limit. When reached: "
                                   "train.bn_recalibration (where the deadline ends the schedule), checkpoint and the "
                                   "last kNN of data.val (not counted in the budget), exit cleanly")
    budget_schedule: bool = setting(True, "true, with train.max_time: warm-up and cosine follow the further of the "
                                          "time used (first step to deadline) and the steps done (of train.epochs), "
                                          "so the run ends annealed at whichever comes first; false: they span "
                                          "train.epochs and max_time cuts them")
    seed: int = setting(0, "seeds every random draw: a CPU run repeats exactly (a GPU's fastest kernels "
                           "differ in the last bits)")
    device: str = setting("auto", "auto, cpu or cuda (refused without a GPU)")
    precision: str = setting("auto", "auto (bf16 where native, else fp16 on a GPU and fp32 on a CPU), bf16 "
                                     "(warned on a CPU without "
                                     "native bf16: 13-16x slower), fp16 (grad scaler; refused on a CPU: about 65x "
                                     "slower) or fp32")
    channels_last: bool = setting(True, "NHWC memory format")
    compile: bool = setting(False, "torch.compile the encoder, head and colour ops (slow first steps, faster after)")
    threads: int = setting(0, "CPU threads for torch; 0: torch's default (all cores, or OMP_NUM_THREADS when set)")
    log_every: int = setting(10, "steps between TensorBoard scalars (and the last step of a run)")
    resume: str = setting("", "empty: start fresh; auto: last checkpoint in out; or a checkpoint path")
    overwrite: bool = setting(False, "a fresh run clears the run out holds instead of refusing to start")
    max_bad_steps: int = setting(5, "stop after this many non-finite losses or gradients in a row")
    checkpoint_every: int = setting(0, "steps between checkpoints inside an epoch (0: epoch ends only)")
    keep_checkpoints: int = setting(2, "step checkpoints kept beside last.pt")
    sync_bn: bool = setting(True, "BatchNorm statistics over the global batch when several processes train")
    bn_recalibration: int = setting(0, "at the schedule's end, re-estimate the encoder's BatchNorm statistics "
                                       "over this many training images as evaluation sees them (unaugmented, at "
                                       "data.image_size); 0: keep training's, averaged over augmented views")


@dataclass
class EvalConfig:
    every: int = setting(1, "epochs between kNN evaluations of data.val (0: never)")
    knn_k: int = setting(200, "kNN neighbours")
    knn_temperature: float = setting(0.1, "kNN vote temperature")
    batch_size: int = setting(512, "feature-extraction batch")
    projector: int = setting(500, "data.val images in TensorBoard's embedding projector at the end (0: none; "
                                 "data.val is read when eval.every > 0)")
    crop_ratio: float = setting(0.875, "evaluation images larger than the view: shorter side to "
                                       "data.image_size / crop_ratio, then the centre crop")


@dataclass
class Config:
    out: str = setting("runs/simxent", "run directory: config.yaml, checkpoints/, TensorBoard events")
    data: DataConfig = section(DataConfig, "image folders and decoding")
    augment: AugmentConfig = section(AugmentConfig, "the random views")
    model: ModelConfig = section(ModelConfig, "encoder and projection head")
    loss: LossConfig = section(LossConfig, "NT-Xent")
    optim: OptimConfig = section(OptimConfig, "optimiser and learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "the training loop")
    eval: EvalConfig = section(EvalConfig, "kNN monitoring during pretraining")


CHOICES = {
    "data.on_bad_image": ("skip", "error"),
    "augment.jitter_order": ("batch", "image"),
    "model.view_batches": ("joint", "separate"),
    "loss.positives": ("views", "labels"),
    "loss.multi_view": ("joint", "pairs", "full_pairs"),
    "optim.name": ("sgd", "adamw", "lars"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
}
# Paths an override cannot leave empty (``out=`` would write the run into the current folder); in a file or
# a saved config, data.train "" is the unset default. data.val=, data.cache_dir= and train.resume= mean "none".
NONEMPTY = ("out", "data.train")
# A YAML document may use anchors and aliases, but expanded it must stay a config's size (no alias bombs).
MAX_YAML_VALUES = 10_000
HYDRA_PREFIXES = ("++", "+", "~")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80


def shown(value: Any) -> str:
    """``repr`` cut to a readable length, also for huge or deeply nested values."""
    return _short.repr(value)


class _Refused(yaml.YAMLError):
    """A YAML document that parses but that simxent will not read (duplicate keys, alias bombs)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values in ``node`` once every alias is expanded, memoised per node (a cycle counts as too many)."""
    if id(node) not in sizes:
        sizes[id(node)] = MAX_YAML_VALUES + 1  # seen again before it is finished: a recursive alias
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents whose aliases expand beyond
    ``MAX_YAML_VALUES`` values, measured on the composed node graph before any object is built."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise _Refused(f"aliases expand to more than {MAX_YAML_VALUES} values; write the values out")
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *base' then 'key: value' overrides the merged key on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if duplicate:
                raise _Refused(f"duplicate key {shown(key)} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


# Numbers are plain decimal integers and decimal or exponent floats only: PyYAML's YAML 1.1 reads 010 as 8
# (octal) and 1:30 as 90 (base 60). 010 is 10 here; 1:30, 1_000 and 0x10 are strings, which a number's key
# refuses by name.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_DECIMAL_FLOAT = r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"
StrictLoader.add_implicit_resolver(
    _FLOAT, re.compile(rf"{_DECIMAL_FLOAT}|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"), list("-+0123456789."))
StrictLoader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node), 10))


class _Dumper(yaml.SafeDumper):
    """Quotes text that :class:`StrictLoader` or PyYAML's own loader reads as anything but text: out: '1e3'
    (a number here, text to PyYAML's YAML 1.1 resolvers) and out: '20240101_1200' (the other way round)."""


_Dumper.yaml_implicit_resolvers = {
    first: yaml.SafeDumper.yaml_implicit_resolvers.get(first, []) + StrictLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *StrictLoader.yaml_implicit_resolvers}}


def read_yaml(text: str, where: str) -> Any:
    """Parse ``text`` with :class:`StrictLoader`; any refusal is one line naming ``where``."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _Refused as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def preset_names() -> list[str]:
    """The presets shipped in the package, by name: ``cpu``, ``cifar10``, ``imagenet``, ``demo``."""
    folder = importlib.resources.files(__package__) / "configs"
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_config_file(path: str | Path) -> tuple[str, str]:
    """(text, name for messages) of a YAML file, or of the packaged preset called ``path``."""
    if Path(path).is_file():
        try:
            return Path(path).read_text(encoding="utf-8-sig"), str(path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 YAML file (byte {e.start}); save it as UTF-8") from None
        except OSError as e:  # permissions: one line naming the file, not a traceback
            raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
    presets = preset_names()
    if str(path) in presets:
        resource = importlib.resources.files(__package__) / "configs" / f"{path}.yaml"
        return resource.read_text(encoding="utf-8"), str(resource)
    stem = Path(path).stem
    hint = (f"; the presets ship with simxent: write '{stem}'" if stem in presets
            else f"; presets by name: {', '.join(presets)}")
    raise ConfigError(missing_file(path, "config file") + hint)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {shown(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (1e-4, 5E3) as strings; Python reads them as numbers.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {shown(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        # Converting back would be a guess: YAML has already turned 010 into 8 and 12:30 into 750.
        none = " (for none, write '' rather than null)" if value is None else ""
        raise ConfigError(f"{key}: expected text, got {shown(value)}{none}; quote it in YAML, which reads "
                          f"unquoted 010, 0x10, 12:30, 1e3 and yes as numbers or booleans")
    raise ConfigError(f"{key}: unsupported type {hint}")


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, meaning) for every key of ``cfg`` (a :class:`Config`), in declaration order."""
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, f.metadata["help"]))
    return rows


def config_keys() -> list[str]:
    return [key for key, _, _ in describe(Config())]


def did_you_mean(word: str, options: typing.Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the option nearest to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    """An unknown key's error: the keys of the same name in other sections (train.lr: optim.lr), else the
    nearest spelling, else every valid key."""
    same_name = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    hint = (f"; did you mean {' or '.join(repr(k) for k in same_name)}?" if same_name else
            did_you_mean(key, valid) or f"; valid keys: {', '.join(valid)}")
    return ConfigError(f"unknown key {shown(key)}{where}{hint}")


def field_type(key: str, where: str = "") -> Any:
    """The declared type of the dotted ``key``; an unknown key or a section raises naming it."""
    node = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            raise _unknown(key, config_keys(), where)
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"{key}{where}: is a section; set one of its keys, e.g. {key}.<name>")
    return node


def _set(cfg: Config, key: str, value: Any, where: str = "") -> None:
    """Set ``cfg.<dotted key> = value`` after checking the key exists and coercing the type."""
    value = _coerce(value, field_type(key, where), key)
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, value)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``; a key given twice (``data: {train: x}`` and
    ``data.train: y`` in one file) is refused rather than one of them kept."""
    flat = {}
    for k, v in tree.items():
        items = flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        for key, value in items.items():
            if key in flat:
                raise ConfigError(f"{key} is set twice (once as a dotted key): keep one")
            flat[key] = value
    return flat


def _hydra_habit(text: str, key: str, raw: str) -> ConfigError | None:
    """Hydra's ``+key=v`` (add), ``++key=v`` (add or set) and ``~key`` (delete) have no meaning here."""
    prefix = next((p for p in HYDRA_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    bare = key[len(prefix):]
    said = f"override {shown(text)}: simxent takes no Hydra '{prefix}' prefix (its keys are fixed; set them as key=value)"
    if bare in config_keys():
        return ConfigError(f"{said}; write {bare}={raw}")
    close = difflib.get_close_matches(bare, config_keys(), n=1, cutoff=0.5)
    return ConfigError(f"{said}; {shown(bare)} is not a key" + (f" (nearest: '{close[0]}')" if close else ""))


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value`` and read the value by the key's declared type: text keys (paths,
    names) take it verbatim (``out=010`` is the folder '010'); the others read it as YAML (``0.1``,
    ``true``, ``null``, ``[0.2, 1.0]``)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {shown(text)} has no key")
    habit = _hydra_habit(text, key, raw)
    if habit:
        raise habit
    if field_type(key, " in the command-line overrides") is str:
        if key in NONEMPTY and not raw.strip():
            raise ConfigError(f"override {shown(text)}: empty path; give a folder ({key}=DIR)")
        return key, raw
    return key, read_yaml(raw, f"override {shown(text)}") if raw.strip() else ""


def file_settings(path: str | Path) -> tuple[dict[str, Any], str]:
    """The ``{"section.key": value}`` settings of a YAML file or preset, and its name for messages."""
    text, name = read_config_file(path)
    tree = read_yaml(text, name)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{name}: expected a mapping of keys at the top level")
    sections = {f.name for f in dataclasses.fields(Config)}  # 'augment:' with its keys commented out: empty
    tree = {k: {} if v is None and k in sections else v for k, v in tree.items()}
    try:
        return flatten(tree), name
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file or preset name (if any), then ``key=value`` overrides; then validation."""
    cfg = Config()
    if path:
        settings, name = file_settings(path)
        for key, value in settings.items():
            _set(cfg, key, value, f" in {name}")
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, " in the command-line overrides")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a config saved in a checkpoint (strict, like a YAML file)."""
    cfg = Config()
    for key, value in flatten(tree).items():
        _set(cfg, key, value, " in the saved config")
    validate(cfg)
    return cfg


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_from_saved(tree: dict, keys: typing.Iterable[str], where: str) -> Config:
    """The ``keys`` of a config saved by any simxent version, each checked like a user's setting; every
    other setting keeps its default.

    Reading only what is needed keeps old checkpoints loadable when a later version renames or drops an
    unrelated key: keys this version does not know are named in a warning and skipped. A needed key that
    is missing keeps its default, except ``model.backbone``, which names the architecture. Errors are one
    line that starts with ``where``.
    """
    flat = flatten(tree)
    unknown = sorted(set(flat) - set(config_keys()))
    if unknown:
        log.warning("%s: ignoring keys this simxent version does not know: %s", where, ", ".join(unknown))
    cfg = Config()
    try:
        if "model.backbone" in keys and "model.backbone" not in flat:
            raise ConfigError("model.backbone is missing; it names the encoder's architecture")
        for key in keys:
            if key in flat:
                _set(cfg, key, flat[key])
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(Path(path), yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False))


def format_config(cfg: Config) -> str:
    """``cfg`` as YAML that :func:`load_config` reads back, every key with its meaning as a comment.
    Values are written as JSON (a subset of YAML) so that text stays quoted text."""
    lines, section_name = [], None
    for key, value, meaning in describe(cfg):
        *parents, name = key.split(".")
        if parents and parents[0] != section_name:
            lines.append(f"{parents[0]}:")
        section_name = parents[0] if parents else None
        indent = "  " * len(parents)
        lines.append(f"{indent}{name}: {json.dumps(_plain(value))}  # {meaning}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The README's table of keys, defaults and meanings, made from the dataclasses."""
    def default(v):
        return v if isinstance(v, str) and v else json.dumps(_plain(v))
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{key}` | `{default(v)}` | {meaning} |" for key, v, meaning in describe(Config())]
    return "\n".join(rows) + "\n"


def check_backbone(model: ModelConfig) -> None:
    """``model.backbone`` is ``convnet``, ``convnet_slim``, a torchvision classification model or an importable
    ``package.module:function``; ``model.cifar_stem`` is set only where it applies."""
    # Imported here: models imports this module.
    from .models import CONVNETS, backbone_names, has_cifar_stem, torchvision_names, user_function

    name = model.backbone
    if ":" in name:
        module, _, function = name.partition(":")
        if not all(part.isidentifier() for part in module.split(".") + [function]):
            raise ConfigError(f"model.backbone: {shown(name)} is not of the form package.module:function")
        user_function(name)
    elif name not in CONVNETS and name not in torchvision_names():  # a convnet run never imports torchvision
        raise ConfigError(f"model.backbone: {shown(name)} is not a backbone{did_you_mean(name, backbone_names())} "
                          f"({', '.join(CONVNETS)}, a torchvision classification model as listed in "
                          f"docs/backbones.md, or package.module:function)")
    if model.cifar_stem and not has_cifar_stem(name):
        raise ConfigError(f"model.cifar_stem: applies to ResNet-family backbones (resnet*, resnext*, wide_resnet*), "
                          f"not {name}; set model.cifar_stem=false")


def check_streaming(cfg: Config) -> None:
    """Refuse the settings that streaming (``data.stream=true``) cannot honour."""
    if not cfg.data.stream:
        return
    if cfg.augment.view_ratio_start is not None:
        raise ConfigError("augment.view_ratio_start: needs data.stream=false (the decoding workers crop a streamed "
                          "image at one view size)")
    if (cfg.augment.views, cfg.augment.small_views) != (2, 0):
        # The decoding workers crop a streamed image larger than the view themselves, two crops per image.
        wanted = " ".join(f"{k}={v}" for k, v, now in (("augment.views", 2, cfg.augment.views),
                                                       ("augment.small_views", 0, cfg.augment.small_views)) if v != now)
        raise ConfigError(f"augment.views={cfg.augment.views}, augment.small_views={cfg.augment.small_views}: "
                          f"data.stream=true makes two full-size views per image (set {wanted}, or "
                          f"data.stream=false)")
    if cfg.train.bn_recalibration:
        raise ConfigError(f"train.bn_recalibration={cfg.train.bn_recalibration}: needs data.stream=false (a "
                          f"streamed folder keeps no decoded images to re-estimate BatchNorm statistics over); set "
                          f"train.bn_recalibration=0")
    if cfg.loss.positives == "labels":
        # A streamed bad file is replaced by the next readable one, possibly of another class, while the
        # batch keeps the first file's label: supervised positives would silently pair the wrong images.
        raise ConfigError("loss.positives=labels: needs data.stream=false (a streamed bad file is replaced by "
                          "another image whose class may differ from the label the batch keeps)")


def check_multi_view(cfg: Config) -> None:
    """The pairwise losses are self-supervised NT-Xent over more than two views: refuse them where they would
    be the joint loss (two views), ``pairs`` (full_pairs without small views) or need its options."""
    loss, aug = cfg.loss, cfg.augment
    if loss.multi_view == "joint":
        return
    for key, value, needed in (("loss.positives", loss.positives, "views"), ("loss.decoupled", loss.decoupled, False)):
        if value != needed:
            raise ConfigError(f"loss.multi_view={loss.multi_view}: works with {key}={str(needed).lower()} only "
                              f"(got {str(value).lower()}); set loss.multi_view=joint")
    if aug.views + aug.small_views < 3:
        raise ConfigError(f"loss.multi_view={loss.multi_view}: needs more than two views per image (augment.views + "
                          f"augment.small_views is {aug.views + aug.small_views}); two views have one pair, "
                          f"which joint already is")
    if loss.multi_view == "full_pairs" and aug.small_views == 0:
        raise ConfigError("loss.multi_view=full_pairs: pairs the full-size views with augment.small_views small "
                          "ones, and that is 0 (every pair has a full-size view: set loss.multi_view=pairs)")


def validate(cfg: Config) -> None:
    """Range and choice checks; each error names its key."""
    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {shown(flat[key])} is not one of {', '.join(allowed)}")
    check_backbone(cfg.model)
    for key, v in flat.items():  # before the range checks, which NaN would pass or fail misleadingly
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
            raise ConfigError(f"{key}: must be finite, got {shown(v)}")
    refuse_out_of_range(flat, data_and_augment_rules(cfg))
    check_streaming(cfg)
    check_multi_view(cfg)
    refuse_out_of_range(flat, training_rules(cfg))


def _attributes(node: Any, prefix: str = ""):
    """(dotted key, value) for every attribute of a config and its sections, unknown ones included."""
    for name, value in vars(node).items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _attributes(value, f"{prefix}{name}.")
        else:
            yield prefix + name, value


# Keys that name files or folders: a leading ~ is the user's home (os.path.expanduser) when a run starts.
PATH_KEYS = ("out", "data.train", "data.val", "data.cache_dir", "model.weights", "train.resume")


def check_config(cfg: Config) -> Config:
    """A config built or changed in Python, checked as a YAML file is: every attribute a known key (a
    misspelt one is named, with the nearest key), every value converted to its key's type or refused naming
    the key (in place: "0.1" becomes 0.1, 16.0 becomes 16, a list a tuple, a Path text, numpy's scalars
    Python's), a leading ~ of a path (PATH_KEYS) expanded, then :func:`validate`. Returns ``cfg``."""
    for key, value in list(_attributes(cfg)):
        if isinstance(value, os.PathLike):  # a pathlib.Path where a key takes text
            value = os.fspath(value)
        elif isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)):
            value = int(value) if isinstance(value, numbers.Integral) else float(value)  # numpy's scalars
        if key in PATH_KEYS and isinstance(value, str):  # the shell expands ~ after out= but not after data.train=
            value = os.path.expanduser(value)
        _set(cfg, key, value, " (set in Python)")
    validate(cfg)
    return cfg


def refuse_out_of_range(flat: dict, rules: list[tuple[bool, str, str]]) -> None:
    """One line naming the first key whose rule does not hold, with its value (``flat``) and the rule."""
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(f"{key}: {shown(flat[key])} is out of range ({rule})")


def view_size(aug: AugmentConfig, image_size: int, progress: float = 1.0) -> int:
    """The training views' side s1 = round(``augment.view_ratio`` x ``data.image_size``). Views smaller than
    the evaluation size are FixRes's remedy (Touvron et al. 2019): a random-resized crop magnifies objects,
    so training a little below the test resolution matches their apparent size at test time, for fewer pixels.

    With ``augment.view_ratio_start`` (s0 = round(start x image_size)) the side follows the schedule's
    progress p in [0, 1] (progressive resizing, as in FFCV and EfficientNetV2: cheap early steps learn
    coarse features) in n = ceil((s1 - s0) / 4) steps of at most 4 px, so that kernels meet few shapes:
    s(p) = s0 + round(i (s1 - s0) / n) with i = round(n p)."""
    end = round(aug.view_ratio * image_size)
    if aug.view_ratio_start is None:
        return end
    start = round(aug.view_ratio_start * image_size)
    n = math.ceil((end - start) / 4)
    if n <= 0:
        return start
    i = round(n * min(max(progress, 0.0), 1.0))
    return start + round(i * (end - start) / n)


def data_and_augment_rules(cfg: Config) -> list[tuple[bool, str, str]]:
    """``(holds, key, rule)`` for out, data and augment, in the order they are reported."""
    aug, lo, hi = cfg.augment, *cfg.augment.crop_scale
    small_lo, small_hi = aug.small_crop_scale
    view, smallest = view_size(aug, cfg.data.image_size), view_size(aug, cfg.data.image_size, 0.0)
    return [
        (cfg.out.strip() != "", "out", "a folder; empty would write the run into the current directory"),
        (0 < lo <= hi <= 1, "augment.crop_scale", "0 < min <= max <= 1"),
        *((0 <= getattr(aug, p) <= 1, f"augment.{p}", "a probability in [0, 1]")
          for p in ("flip_p", "jitter_p", "grayscale_p", "solarize_p")),
        (aug.blur_p is None or 0 <= aug.blur_p <= 1, "augment.blur_p", "[0, 1] or null"),
        # Hue's shift is 0.2 s, which torchvision caps at half a turn.
        (0 <= aug.jitter_strength <= 2.5, "augment.jitter_strength", "in [0, 2.5]"),
        (aug.views >= 2, "augment.views", ">= 2"),
        (aug.small_views >= 0, "augment.small_views", ">= 0"),
        (0 < small_lo <= small_hi <= 1, "augment.small_crop_scale", "0 < min <= max <= 1"),
        (all(s > 0 for s in aug.std), "augment.std", "> 0"),
        (8 <= cfg.data.image_size <= MAX_IMAGE_SIZE, "data.image_size", f"8 to {MAX_IMAGE_SIZE}"),
        (cfg.data.decode_size is None or cfg.data.image_size <= cfg.data.decode_size <= MAX_DECODE_SIZE,
         "data.decode_size", f"data.image_size to {MAX_DECODE_SIZE}, or null"),
        (0 < aug.view_ratio <= 1 and view >= 8, "augment.view_ratio",
         f"in (0, 1], for views of at least 8 px at data.image_size = {cfg.data.image_size}"),
        (aug.view_ratio_start is None or (0 < aug.view_ratio_start <= aug.view_ratio
                                          and smallest >= 8),
         "augment.view_ratio_start", f"null or in (0, augment.view_ratio], for views of at least 8 px at "
                                     f"data.image_size = {cfg.data.image_size}"),
        (aug.small_size is None or 8 <= aug.small_size <= smallest, "augment.small_size",
         f"null or in [8, the smallest view size = {smallest}]"),
    ]


def training_rules(cfg: Config) -> list[tuple[bool, str, str]]:
    """``(holds, key, rule)`` for data.workers, model, loss, optim, train and eval, in the order they are
    reported."""
    lo, hi = LEARNT_TEMPERATURE_RANGE
    return [
        (cfg.data.workers >= 0, "data.workers", ">= 0"),
        (cfg.model.head_layers >= 1, "model.head_layers", ">= 1"),
        (cfg.model.head_hidden >= 1, "model.head_hidden", ">= 1"),
        (cfg.model.head_out >= 1, "model.head_out", ">= 1"),
        (cfg.loss.temperature > 0, "loss.temperature", "> 0"),
        (not cfg.loss.learn_temperature or lo <= cfg.loss.temperature <= hi, "loss.temperature",
         f"in [{lo}, {hi}] with loss.learn_temperature=true"),
        (cfg.loss.temperature_lr >= 0, "loss.temperature_lr", ">= 0"),
        (cfg.optim.lr >= 0, "optim.lr", ">= 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", ">= 0"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum", "[0, 1)"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0"),
        (0 <= cfg.optim.min_lr <= 1, "optim.min_lr", "[0, 1]"),
        (cfg.train.epochs >= 1, "train.epochs", ">= 1"),
        # Per-epoch seeds (seed x 1,000,003 + epoch) must fit torch's 64-bit seeds.
        (abs(cfg.train.seed) < 2**32, "train.seed", "an integer from -(2^32 - 1) to 2^32 - 1"),
        (cfg.train.batch_size >= 2, "train.batch_size", ">= 2"),
        (cfg.train.max_time >= 0, "train.max_time", ">= 0"),
        (cfg.train.threads >= 0, "train.threads", ">= 0"),
        (cfg.train.log_every >= 1, "train.log_every", ">= 1"),
        (cfg.train.max_bad_steps >= 1, "train.max_bad_steps", ">= 1"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every", ">= 0"),
        (cfg.train.bn_recalibration >= 0, "train.bn_recalibration", ">= 0"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1"),
        (cfg.eval.every >= 0, "eval.every", ">= 0"),
        (cfg.eval.knn_k >= 1, "eval.knn_k", ">= 1"),
        (cfg.eval.projector >= 0, "eval.projector", ">= 0"),
        (cfg.eval.knn_temperature > 0, "eval.knn_temperature", "> 0"),
        (cfg.eval.batch_size >= 1, "eval.batch_size", ">= 1"),
        (0 < cfg.eval.crop_ratio <= 1, "eval.crop_ratio", "(0, 1]"),
    ]