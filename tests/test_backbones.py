"""Backbones by name: every torchvision family, a user's ``package.module:function``, and ``model.weights``.

References are torchvision's own models: an encoder is the torchvision model minus its last classifier
layer, so that layer applied to the encoder's features must give the full model's logits.
"""
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from simxent.checkpoint import export_torchvision, load_checkpoint, load_encoder, save_checkpoint
from simxent.cli import pretrain_main
from simxent.config import ConfigError, ModelConfig, load_config
from simxent.demo import make_shapes
from simxent.loss import nt_xent
from simxent.models import SimCLR, backbone, families, fit_weights, load_weights, markdown_backbones
from simxent.train import pretrain
from tests.conftest import TINY_RUN

DOCS = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"

# family: (smallest variant, image size it accepts, feature size from the paper / torchvision's classifier
# input, path of the last classifier layer in torchvision's model). Read off torchvision's source by hand.
FAMILIES = {
    "alexnet": ("alexnet", 64, 4096, "classifier.6"),
    "convnext": ("convnext_tiny", 32, 768, "classifier.2"),
    "densenet": ("densenet121", 32, 1024, "classifier"),
    "efficientnet": ("efficientnet_b0", 32, 1280, "classifier.1"),
    "googlenet": ("googlenet", 32, 1024, "fc"),
    "inception": ("inception_v3", 75, 2048, "fc"),
    "maxvit": ("maxvit_t", 224, 512, "classifier.5"),
    "mnasnet": ("mnasnet0_5", 32, 1280, "classifier.1"),
    "mobilenetv2": ("mobilenet_v2", 32, 1280, "classifier.1"),
    "mobilenetv3": ("mobilenet_v3_small", 32, 1024, "classifier.3"),
    "regnet": ("regnet_x_400mf", 32, 400, "fc"),
    "resnet": ("resnet18", 32, 512, "fc"),
    "shufflenetv2": ("shufflenet_v2_x0_5", 32, 1024, "fc"),
    "squeezenet": ("squeezenet1_1", 32, 512, "classifier.1"),
    "swin_transformer": ("swin_t", 32, 768, "head"),
    "vgg": ("vgg11", 32, 4096, "classifier.6"),
    "vision_transformer": ("vit_b_32", 32, 768, "heads.head"),
}
TOO_SLOW_TO_TRAIN = {"maxvit"}  # 224 px is its smallest size: one step takes seconds; built and checked only


def torchvision_model(name: str, size: int) -> nn.Module:
    """The full torchvision model (auxiliary classifiers included), built for ``size`` where it must be."""
    kwargs = {"vit_b_32": {"image_size": size}, "maxvit_t": {"input_size": (size, size)},
              "googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}.get(name, {})
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def logits_from_features(full: nn.Module, classifier: str, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full model's last layer applied to the encoder's features. SqueezeNet's last layer is a 1x1
    convolution before a ReLU and global pooling, so it is compared on pooled features instead."""
    features = encoder.eval()(x)
    if classifier == "classifier.1" and isinstance(full.classifier[1], nn.Conv2d):
        return features
    return full.get_submodule(classifier)(features)


def reference(full: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    if name.startswith("squeezenet"):
        return full.features(x).mean(dim=(2, 3))  # relu(features) = features: a Fire module ends in ReLUs
    return full(x)


def test_every_torchvision_family_is_covered_here():
    assert set(families()) == set(FAMILIES) | {"convnet"}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_family_builds_trains_and_loads_torchvision_weights(kind):
    name, size, dim, classifier = FAMILIES[kind]
    torch.manual_seed(0)
    model = SimCLR(ModelConfig(backbone=name, head_hidden=32, head_out=16), image_size=size)
    assert model.feature_dim == dim
    x = torch.randn(2, 3, size, size)

    # model.weights from a full torchvision state dict (classifier and auxiliary heads in it, ignored):
    # the encoder is then the torchvision model minus its last layer.
    full = torchvision_model(name, size)
    fit_weights(model.encoder, full.state_dict(), "torchvision", name)
    with torch.no_grad():
        torch.testing.assert_close(logits_from_features(full, classifier, model.encoder, x), reference(full, name, x),
                                   rtol=1e-4, atol=1e-5)

    if kind not in TOO_SLOW_TO_TRAIN:  # one SimCLR step changes the encoder, with finite gradients
        model.train()
        before = [p.detach().clone() for p in model.encoder.parameters()]
        z = model(torch.randn(4, 3, size, size))
        loss = nt_xent(z[:2], z[2:], 0.5)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        # Clipped: 4 views of 1x1 feature maps make BatchNorm's gradients huge in some families (RegNet).
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch.optim.SGD(model.parameters(), lr=0.01).step()
        assert any(not torch.equal(b, p) for b, p in zip(before, model.encoder.parameters()))

    # Export: the encoder's state dict loads into the torchvision model, only the classifier (and the
    # auxiliary heads, which the encoder leaves out) missing; the logits agree again.
    missing, unexpected = full.load_state_dict(model.encoder.state_dict(), strict=False)
    assert unexpected == []
    assert all(k.startswith((classifier + ".", "aux1.", "aux2.", "AuxLogits.")) for k in missing)
    assert any(k.startswith(classifier + ".") for k in missing)
    with torch.no_grad():
        assert torch.isfinite(reference(full, name, x)).all()
        torch.testing.assert_close(logits_from_features(full, classifier, model.encoder, x), reference(full, name, x),
                                   rtol=1e-4, atol=1e-5)
