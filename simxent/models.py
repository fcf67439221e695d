"""Encoders and the projection head.

:func:`backbone` is the one contract (timm's ``num_classes=0``): it returns ``(module, feature_dim)`` where
the module maps an image batch (B, 3, H, W) to pooled features (B, feature_dim), so no caller ever replaces
a classifier layer. ``model.backbone`` names one of three kinds of encoder:

- ``convnet`` and ``convnet_slim``: simxent's CPU-sized encoders (:data:`CONVNETS`);
- any torchvision classification model (:func:`torchvision_names`), random weights, classifier removed;
- ``package.module:function``: a function of no arguments returning an ``nn.Module`` that maps
  (B, 3, H, W) to (B, D).

The feature size D is found once, by one forward of a blank image at ``data.image_size``.
"""
from __future__ import annotations

import functools
import os
import sys
import importlib
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, fit_weights, read_weights_file
from .config import ConfigError, ModelConfig, shown
from .loss import Temperature
from .matmul_conv import use_matmul_convs

# Where torchvision keeps each family's classifier. Its last Linear (SqueezeNet: its 1x1 convolution)
# becomes an Identity in place, so any pooling after it stays and parameter names do not move.
CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head")
CIFAR_STEM_FAMILY = "resnet"  # torchvision's resnet module: ResNets, ResNeXts and wide ResNets

# simxent's CPU encoders: the widths of their four conv-BN-ReLU stages. convnet_slim halves the first,
# whose full-size maps cost memory traffic out of proportion to their few FLOPs: it trains about 1.2-1.4x
# the images per second of convnet on 2 cores and scored as high on validation splits (docs/studies.md).
CONVNETS = {"convnet": (64, 128, 256, 512), "convnet_slim": (32, 128, 256, 512)}


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """CPU-sized encoder: four 3x3 conv-BN-ReLU stages of ``widths`` (:data:`CONVNETS`; strides 1, 2, 2, 2),
    then global average pooling to a ``widths[-1]``-d feature."""

    strides = (1, 2, 2, 2)

    def __init__(self, widths: tuple[int, ...] = CONVNETS["convnet"]):
        super().__init__()
        self.widths = tuple(widths)
        layers, c_in = [], 3
        for width, stride in zip(self.widths, self.strides):
            layers.append(_conv_bn_relu(c_in, width, stride))
            c_in = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model, by the name ``torchvision.models.get_model`` takes."""
    # Imported where used: torchvision loads torch._dynamo, seconds of each command's start that a convnet
    # run needs none of.
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def backbone_names() -> tuple[str, ...]:
    """The names ``model.backbone`` accepts besides ``package.module:function``."""
    return tuple(CONVNETS) + torchvision_names()


def family(name: str) -> str:
    """The torchvision module that builds ``name`` (``resnet`` for resnet50, resnext50_32x4d and
    wide_resnet50_2; ``vision_transformer`` for vit_b_16); ``convnet`` for simxent's own."""
    if name in CONVNETS:
        return "convnet"
    import torchvision.models

    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


def families() -> dict[str, list[str]]:
    """Backbone names grouped by :func:`family`, in the order of :func:`backbone_names`."""
    groups: dict[str, list[str]] = {}
    for name in backbone_names():
        groups.setdefault(family(name), []).append(name)
    return groups


def has_cifar_stem(name: str) -> bool:
    """Whether ``model.cifar_stem`` applies: the ResNet family (conv1 + maxpool), and the convnets, whose
    first convolution is always 3x3 stride 1 (the setting changes nothing there)."""
    return name in CONVNETS or (name in torchvision_names() and family(name) == CIFAR_STEM_FAMILY)


def user_function(spec: str) -> Callable[[], nn.Module]:
    """The function named by ``package.module:function``, imported from the current folder or the path;
    errors name ``model.backbone``."""
    module_name, _, attr = spec.partition(":")
    if module_name == "__main__":  # found in this script only: not by an evaluation, an embedding, a resume
        raise ConfigError(f"model.backbone: {spec} is a function of the running script, which later loads of the "
                          f"checkpoint (linear eval, embed, a resume) cannot import: move it to a module file, say "
                          f"myencoders.py, and name it myencoders:{attr}")
    try:
        here = os.getcwd()  # a console script's path lacks the current folder
    except FileNotFoundError:  # the current folder was deleted: nothing to import from it
        here = None
    if here and here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing; say how
        raise ConfigError(f"model.backbone: cannot import {shown(module_name)} "
                          f"({type(e).__name__}: {shown(str(e))})") from None
    fn = getattr(module, attr, None)
    if isinstance(fn, nn.Module):
        raise ConfigError(f"model.backbone: {spec} is a module object; name a function that builds a new one "
                          f"(each run, resume and evaluation builds its own encoder)")
    if not callable(fn):
        raise ConfigError(f"model.backbone: {module_name} has no function {attr!r}")
    return fn


def user_backbone(spec: str) -> nn.Module:
    """What the user's function returns, called without arguments: an nn.Module."""
    try:
        net = user_function(spec)()
    except ConfigError:
        raise
    except Exception as e:  # the user's code may fail in any way; one line naming the key
        raise ConfigError(f"model.backbone: {spec}() failed: {type(e).__name__}: {shown(str(e))} (it is called "
                          f"without arguments)") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.backbone: {spec} returned {type(net).__name__}, not an nn.Module")
    return net


def _builder_kwargs(name: str, image_size: int) -> dict:
    """What some builders need beyond ``weights=None``: no auxiliary classifiers (GoogLeNet, Inception
    add them to the output in training mode), and the image size that ViT's position embeddings and
    MaxViT's attention grids are made for."""
    kind = family(name)
    if kind in ("googlenet", "inception"):
        return {"aux_logits": False, "init_weights": True}
    if kind == "vision_transformer":
        return {"image_size": image_size}
    if kind == "maxvit":
        return {"input_size": (image_size, image_size)}
    return {}


def _drop_classifier(net: nn.Module) -> None:
    """Replace the classifier's last Linear (SqueezeNet: last conv) by an Identity, in place."""
    attr = next(a for a in CLASSIFIER_NAMES if isinstance(getattr(net, a, None), nn.Module))
    head = getattr(net, attr)
    path = [n for n, m in head.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    if not path:
        setattr(net, attr, nn.Identity())
    else:
        *parents, last = path.split(".")
        setattr(head.get_submodule(".".join(parents)), last, nn.Identity())


def _torchvision_backbone(name: str, cifar_stem: bool, image_size: int) -> nn.Module:
    import torchvision.models

    try:
        net = torchvision.models.get_model(name, weights=None, **_builder_kwargs(name, image_size))
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"model.backbone: {name} cannot be built for {image_size} px images "
                          f"(data.image_size): {str(e).splitlines()[0]}") from None
    if cifar_stem:  # 3x3/1 instead of 7x7/2 + max-pool: 32 px images do not shrink to 1x1 too early
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    _drop_classifier(net)
    return net


def feature_size(net: nn.Module, name: str, image_size: int, key: str = "data.image_size") -> int:
    """D of the (1, D) features of one blank image, in eval mode without gradients; the module's mode
    is restored. Errors name ``model.backbone`` and ``key``, the setting that gave the size."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:  # a shape error deep in any model: one line instead of its traceback
        raise ConfigError(f"model.backbone: {name} cannot encode {image_size} px images ({key}): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        net.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 2:
        got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"model.backbone: {name} must map images (B, 3, H, W) to features (B, D); "
                          f"it gave {got} for a batch of 1 (pool and flatten inside the module)")
    return out.shape[1]


def backbone(name: str, cifar_stem: bool = False, image_size: int = 32) -> tuple[nn.Module, int]:
    """An encoder from images to pooled features, and the feature size (see the module docstring).

    ``cifar_stem`` (ResNet family) swaps the 7x7/2 convolution and the max-pool for one 3x3/1
    convolution. ``image_size`` is the side of the images the encoder will see: ViTs are built for it.
    """
    if name in CONVNETS:
        return ConvNet(CONVNETS[name]), CONVNETS[name][-1]
    if ":" in name:
        net = user_backbone(name)
    elif name in torchvision_names():
        net = _torchvision_backbone(name, cifar_stem, image_size)
    else:
        raise ConfigError(f"model.backbone: unknown backbone {name!r} ({', '.join(CONVNETS)}, a torchvision "
                          f"classification model or package.module:function)")
    return net, feature_size(net, name, image_size)


def left_out(encoder: nn.Module, key: str) -> bool:
    """Whether ``key`` of a torchvision model's state dict belongs to a part the encoder leaves out: the
    classifier (an Identity here) or the auxiliary classifiers of GoogLeNet and Inception (None here)."""
    node = encoder
    for part in key.split(".")[:-1]:
        node = getattr(node, part, "absent")
        if node is None or isinstance(node, nn.Identity):
            return True
        if not isinstance(node, nn.Module):
            return False
    return False


def load_weights(encoder: nn.Module, path: str, arch: str) -> None:
    """Start ``encoder`` from ``model.weights``: a plain state dict (a full torchvision model's too, see
    :func:`~simxent.checkpoint.fit_weights`) or a simxent checkpoint's encoder. Errors name the key."""
    try:
        weights = read_weights_file(path)
        if isinstance(weights, dict) and "format_version" in weights:
            if "encoder" not in weights:
                raise CheckpointError(f"{path} holds no encoder weights")
            weights = weights["encoder"]
        fit_weights(encoder, weights, path, arch)
    except CheckpointError as e:
        raise ConfigError(f"model.weights: {e}") from None


class ProjectionHead(nn.Sequential):
    """MLP g(h): ``layers`` linear layers, BatchNorm + ReLU between them (SimCLR v1 uses 2)."""

    def __init__(self, dim_in: int, hidden: int = 2048, dim_out: int = 128, layers: int = 2):
        mods, d = [], dim_in
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            d = hidden
        mods.append(nn.Linear(d, dim_out))
        super().__init__(*mods)


class SimCLR(nn.Module):
    """Encoder f and projection head g; ``forward`` returns the projections z = g(f(x)).

    The encoder starts from ``cfg.weights`` when set (a resumed run then loads its checkpoint over them).
    ``temperature`` (a :class:`~simxent.loss.Temperature`, fixed at 0.5 by default) is the NT-Xent's t; as
    a submodule, a learnt one has its gradient averaged by DDP with the others'. ``views`` is the number
    of views in each batch ``forward`` gets (one count per batch of a list): ``cfg.view_batches=separate``
    splits them."""

    def __init__(self, cfg: ModelConfig, image_size: int = 32, temperature: Temperature | None = None,
                 views: tuple[int, ...] = (2,)):
        super().__init__()
        self.temperature = temperature if temperature is not None else Temperature(0.5)
        self.encoder, self.feature_dim = backbone(cfg.backbone, cfg.cifar_stem, image_size)
        if cfg.matmul_convs:  # faster small-map convolutions in CPU training, same parameters (matmul_conv.py)
            use_matmul_convs(self.encoder)
        if cfg.weights:
            load_weights(self.encoder, cfg.weights, cfg.backbone + (" with the CIFAR stem" if cfg.cifar_stem else ""))
        self.head = ProjectionHead(self.feature_dim, cfg.head_hidden, cfg.head_out, cfg.head_layers)
        self.views, self.separate = tuple(views), cfg.view_batches == "separate"

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """z = g(f(x)) of a view-major batch ``[v1; v2; ...]``, or of a list of them (views at several
        sizes), concatenated in order: one forward call, so that DDP sees every use of a parameter in
        one graph.

        ``joint`` encodes each batch at once, so BatchNorm's batch statistics span all its views.
        ``separate``, in training mode, encodes each view v_i on its own: z = [g(f(v1)); g(f(v2)); ...],
        each BatchNorm batch one view of every image (and its running statistics updated once per view).
        In eval mode BatchNorm uses its running statistics and the two are the same."""
        batches = list(x) if isinstance(x, (list, tuple)) else [x]
        if self.separate and self.training:
            batches = [view for batch, n in zip(batches, self.views, strict=True)
                       for view in batch.unflatten(0, (n, -1)).unbind(0)]
        if len(batches) == 1:
            return self.head(self.encoder(batches[0]))
        return torch.cat([self.head(self.encoder(b)) for b in batches])


def markdown_backbones() -> str:
    """The table in docs/backbones.md: every name ``model.backbone`` accepts, by :func:`family`."""
    rows = ["| family | `model.backbone` |", "| --- | --- |"]
    rows += [f"| {kind} | {', '.join(f'`{n}`' for n in names)} |" for kind, names in families().items()]
    return "\n".join(rows) + "\n"
