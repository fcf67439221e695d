"""Run configuration: dataclasses read from YAML with strict keys and ``dotted.key=value`` overrides.

Every key a user can set lives here, with its default and meaning. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key (and the nearest valid one) before any
work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration mistake, reported with the offending key or file."""


@dataclass
class DataConfig:
    train: str = ""  # folder of images; class sub-folders optional (labels unused in pretraining)
    val: str = ""  # labelled folder for kNN monitoring during pretraining (optional)
    image_size: int = 32  # images are decoded to this square size (shorter side, centre crop)
    cache: bool = True  # decode once into a memory-mapped uint8 array, reused across epochs and runs
    cache_dir: str = ""  # where decoded arrays live; default: ~/.cache/simxent
    stream: bool = False  # decode data.train every epoch in `workers` processes instead (folders too large to keep)
    workers: int = 2  # decoding processes
    on_bad_image: str = "skip"  # skip: warn, name and count unreadable files; error: stop on the first


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    flip_p: float = 0.5
    jitter_strength: float = 1.0  # s: brightness, contrast, saturation 0.8s, hue 0.2s
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: Optional[float] = None  # None: 0.5 for images of 64 px and more, 0 below
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | convnet
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 32 px images
    head_hidden: int = 2048
    head_out: int = 128
    head_layers: int = 2  # linear layers in the projection MLP (BatchNorm + ReLU between)


@dataclass
class LossConfig:
    temperature: float = 0.5
    learn_temperature: bool = False  # learn log(temperature), starting at `temperature`


@dataclass
class OptimConfig:
    name: str = "lars"  # sgd | adamw | lars
    lr: float = 0.3  # learning rate at a batch of 256, scaled by `lr_scaling`
    lr_scaling: str = "linear"  # linear: lr*B/256 | sqrt: lr*sqrt(B/256) | none
    weight_decay: float = 1e-6  # never applied to biases and normalisation layers
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    min_lr: float = 0.0  # end of the cosine decay, as a fraction of the peak lr


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # the global batch over all processes: 2 * batch_size views per step
    max_time: float = 0.0  # seconds; 0 = no limit. When reached: checkpoint, exit cleanly
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 where supported, else fp32)
    channels_last: bool = True
    compile: bool = False  # torch.compile the encoder, head and colour ops (slow first steps, faster after)
    threads: int = 0  # CPU threads for torch; 0 = all cores
    log_every: int = 10  # steps between TensorBoard scalars
    resume: str = ""  # "" (start fresh) | auto (last checkpoint in `out`) | path to a checkpoint
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (0: epoch ends only)
    keep_checkpoints: int = 2  # step checkpoints kept beside last.pt
    sync_bn: bool = True  # BatchNorm statistics over the global batch when several processes train


@dataclass
class EvalConfig:
    every: int = 1  # epochs between kNN evaluations of data.val (0 = never)
    knn_k: int = 200
    knn_temperature: float = 0.1
    batch_size: int = 512
    projector: int = 500  # data.val images shown in TensorBoard's embedding projector at the end (0 = none)


@dataclass
class Config:
    out: str = "runs/simxent"  # run directory: config.yaml, checkpoints/, TensorBoard events
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.on_bad_image": ("skip", "error"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "convnet"),
    "optim.name": ("sgd", "adamw", "lars"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
}


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
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (1e-4, 5E3) as strings; Python reads them as numbers.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key '{key}'{where}{hint}")


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _set(cfg: Config, key: str, value: Any, where: str = "") -> None:
    """Set ``cfg.<dotted key> = value`` after checking the key exists and coercing the type."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(type(node))
        if part not in hints:
            raise _unknown(key, _all_keys(cfg), where)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ConfigError(f"{key}{where}: is a section; set one of its keys, e.g. {key}.<name>")
            setattr(node, part, _coerce(value, hints[part], key))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise _unknown(key, _all_keys(cfg), where)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is read as YAML (``0.1``, ``true``, ``[0.2, 1.0]``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot read value: {e}") from None
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; then validation."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value, f" in {path}")
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, " in the command-line overrides")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a config saved in a checkpoint (strict, like a YAML file)."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value, " in the saved config")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Range and choice checks; each error names its key."""
    flat = _flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: '{flat[key]}' is not one of {', '.join(allowed)}")

    def check(ok: bool, key: str, rule: str):
        if not ok:
            raise ConfigError(f"{key}: {flat[key]!r} is out of range ({rule})")

    def finite(key):
        v = flat[key]
        return v is None or (isinstance(v, (int, float)) and math.isfinite(v))

    for key, v in flat.items():
        if isinstance(v, float) and not finite(key):
            raise ConfigError(f"{key}: must be finite, got {v!r}")
    lo, hi = cfg.augment.crop_scale
    check(0 < lo <= hi <= 1, "augment.crop_scale", "0 < min <= max <= 1")
    for p in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
        check(0 <= flat[f"augment.{p}"] <= 1, f"augment.{p}", "a probability in [0, 1]")
    check(cfg.augment.blur_p is None or 0 <= cfg.augment.blur_p <= 1, "augment.blur_p", "[0, 1] or null")
    check(cfg.augment.jitter_strength >= 0, "augment.jitter_strength", ">= 0")
    check(all(s > 0 for s in cfg.augment.std), "augment.std", "> 0")
    check(cfg.data.image_size >= 8, "data.image_size", ">= 8")
    check(cfg.data.workers >= 0, "data.workers", ">= 0")
    check(cfg.model.head_layers >= 1, "model.head_layers", ">= 1")
    check(cfg.model.head_hidden >= 1, "model.head_hidden", ">= 1")
    check(cfg.model.head_out >= 1, "model.head_out", ">= 1")
    check(cfg.loss.temperature > 0, "loss.temperature", "> 0")
    check(cfg.optim.lr >= 0, "optim.lr", ">= 0")
    check(cfg.optim.weight_decay >= 0, "optim.weight_decay", ">= 0")
    check(0 <= cfg.optim.momentum < 1, "optim.momentum", "[0, 1)")
    check(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0")
    check(0 <= cfg.optim.min_lr <= 1, "optim.min_lr", "[0, 1]")
    check(cfg.train.epochs >= 1, "train.epochs", ">= 1")
    check(cfg.train.batch_size >= 2, "train.batch_size", ">= 2")
    check(cfg.train.max_time >= 0, "train.max_time", ">= 0")
    check(cfg.train.threads >= 0, "train.threads", ">= 0")
    check(cfg.train.log_every >= 1, "train.log_every", ">= 1")
    check(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", ">= 1")
    check(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", ">= 0")
    check(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1")
    check(cfg.eval.every >= 0, "eval.every", ">= 0")
    check(cfg.eval.knn_k >= 1, "eval.knn_k", ">= 1")
    check(cfg.eval.projector >= 0, "eval.projector", ">= 0")
    check(cfg.eval.knn_temperature > 0, "eval.knn_temperature", "> 0")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", ">= 1")
