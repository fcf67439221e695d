"""Backbones by name: every torchvision family, a user's ``package.module:function``, and ``model.weights``.

References are torchvision's own models: an encoder is the torchvision model minus its last classifier
layer, so that layer applied to the encoder's features must give the full model's logits.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from simxent.checkpoint import export_torchvision, fit_weights, load_checkpoint, load_encoder
from simxent.cli import pretrain_main
from simxent.config import ConfigError, ModelConfig, load_config
from simxent.demo import make_shapes
from simxent.loss import nt_xent
from simxent.models import SimCLR, backbone, families, markdown_backbones
from simxent.train import pretrain
from tests.conftest import ROOT, TINY_RUN

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


def test_slim_convnet_halves_the_first_stage_only(tmp_path):
    """convnet_slim is convnet with a first stage of 32 channels: the same strides and 512-d features, and a
    convnet's weights are refused with the shapes that differ."""
    slim, wide = backbone("convnet_slim")[0], backbone("convnet")[0]

    def shapes(net):
        return [(tuple(m.weight.shape), m.stride) for m in net.modules() if isinstance(m, nn.Conv2d)]

    assert shapes(slim) == [((32, 3, 3, 3), (1, 1)), ((128, 32, 3, 3), (2, 2)), ((256, 128, 3, 3), (2, 2)),
                            ((512, 256, 3, 3), (2, 2))]
    assert shapes(wide)[0] == ((64, 3, 3, 3), (1, 1)) and shapes(wide)[2:] == shapes(slim)[2:]
    assert slim(torch.randn(2, 3, 24, 24)).shape == (2, 512) and backbone("convnet_slim")[1] == 512
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match=r"do not fit convnet_slim: 6 wrong shape \(features.0.0.weight "
                                          r"\[64, 3, 3, 3\] \(model: \[32, 3, 3, 3\]\)"):
        SimCLR(ModelConfig(backbone="convnet_slim", weights=str(tmp_path / "wide.pth")))


@pytest.mark.parametrize("name,dim", [("expand1024", 1024), ("wide4", 1024), ("deep3", 512), ("slim_deep3", 512),
                                      ("slim_res3", 512), ("slim_deep34", 512), ("slim_narrow34", 384),
                                      ("slim_half2", 512)])
def test_the_encoder_study_variants_are_backbones(monkeypatch, name, dim):
    """scripts/encoder_variants.py's encoders train as model.backbone=encoder_variants:NAME with
    PYTHONPATH=scripts (docs/studies.md): features of the size their docstrings give, at 24 and 12 px views."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    model = SimCLR(ModelConfig(backbone=f"encoder_variants:{name}", head_hidden=16, head_out=8), 24)
    assert model.feature_dim == dim
    for size in (24, 12):
        assert model(torch.randn(4, 3, size, size)).shape == (4, 8)


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


def test_cifar_stem_where_it_applies():
    net, dim = backbone("resnext50_32x4d", cifar_stem=True)
    assert dim == 2048 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert load_config(None, ["model.backbone=convnet", "model.cifar_stem=true"]).model.cifar_stem
    with pytest.raises(ConfigError, match="model.cifar_stem: applies to ResNet-family backbones.*not vit_b_16"):
        load_config(None, ["model.backbone=vit_b_16", "model.cifar_stem=true"])


@pytest.mark.parametrize("name,match", [
    ("convnext_tyni", "model.backbone: 'convnext_tyni' is not a backbone; did you mean 'convnext_tiny'?"),
    ("resnet9", "model.backbone: 'resnet9' is not a backbone"),
    ("no_such_package_xyz:build", "model.backbone: cannot import 'no_such_package_xyz'"),
    ("torch.nn:no_such_function", "model.backbone: torch.nn has no function 'no_such_function'"),
    ("my model:build", "model.backbone: 'my model:build' is not of the form package.module:function"),
])
def test_bad_backbone_names_stop_at_config_time(name, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"model.backbone={name}"])


def test_image_size_a_family_cannot_take_is_named():
    with pytest.raises(ConfigError, match="model.backbone: alexnet cannot encode 32 px images .data.image_size."):
        backbone("alexnet", image_size=32)
    with pytest.raises(ConfigError, match="model.backbone: vit_b_16 cannot be built for 40 px images"):
        backbone("vit_b_16", image_size=40)


USER_MODULE = '''
from torch import nn

def small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())

def feature_map():
    return nn.Conv2d(3, 8, 3)

def not_a_module():
    return 3

def one_size():  # 16 px images only, as a ViT takes the size it was built for
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))

def unpooled():  # any size, but its feature size follows the image's
    return nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Flatten())

def needs_width(width):
    return nn.Conv2d(3, width, 1)

instance = small()

def fails():
    raise RuntimeError("no GPU here")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module of backbone functions, under a name no other test uses."""
    (tmp_path / "my_backbones_for_simxent.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_backbones_for_simxent"
    monkeypatch.delitem(__import__("sys").modules, "my_backbones_for_simxent", raising=False)


def test_user_backbone_must_give_pooled_features(user_module):
    net, dim = backbone(f"{user_module}:small", image_size=16)
    assert dim == 8 and net(torch.zeros(3, 3, 16, 16)).shape == (3, 8) and net.training
    with pytest.raises(ConfigError, match=r"must map images \(B, 3, H, W\) to features \(B, D\); "
                                          r"it gave \[1, 8, 14, 14\]"):
        backbone(f"{user_module}:feature_map", image_size=16)
    with pytest.raises(ConfigError, match="returned int, not an nn.Module"):
        backbone(f"{user_module}:not_a_module")
    with pytest.raises(ConfigError, match="model.cifar_stem: applies to ResNet-family"):
        load_config(None, [f"model.backbone={user_module}:small", "model.cifar_stem=true"])


def test_user_backbone_mistakes_are_one_line_naming_the_key(user_module, small_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"model.backbone: .*:needs_width\(\) failed: TypeError: .*width.* "
                                          r"\(it is called without arguments\)"):
        backbone(f"{user_module}:needs_width")
    with pytest.raises(ConfigError, match=r"model.backbone: .*:fails\(\) failed: RuntimeError: 'no GPU here'"):
        backbone(f"{user_module}:fails")
    with pytest.raises(ConfigError, match=r":instance is a module object; name a function that builds"):
        backbone(f"{user_module}:instance")
    with pytest.raises(ConfigError, match=r"__main__:build is a function of the running script.*myencoders:build"):
        load_config(None, ["model.backbone=__main__:build"])
    # 16 px images give 2 x 8 x 8 = 128 features, the 12 px views 2 x 6 x 6 = 72: refused before training
    cfg = load_config(None, [*TINY_RUN, f"data.train={small_folder}", f"out={tmp_path / 'run'}",
                             f"model.backbone={user_module}:unpooled", "augment.view_ratio=0.75"])
    with pytest.raises(ConfigError, match=r"gives 72 features for 12 px views \(augment.view_ratio\) but 128 for "
                                          r"16 px images \(data.image_size\): .*must not depend"):
        pretrain(cfg, progress=False)
    cfg = load_config(None, [*TINY_RUN, f"data.train={small_folder}", f"out={tmp_path / 'run'}",
                             f"model.backbone={user_module}:unpooled", "augment.small_views=2"])
    with pytest.raises(ConfigError, match=r"gives 32 features for 8 px views \(augment.small_size\)"):
        pretrain(cfg, progress=False)


def test_a_backbone_module_in_the_current_folder_is_found_by_a_console_script(tmp_path):
    """A console script's sys.path holds its own folder, not the current one, as `python -m` would."""
    (tmp_path / "folder_backbones_for_simxent.py").write_text(textwrap.dedent(USER_MODULE))
    code = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.', " + repr(str(tmp_path)) + ")]\n"
            "from simxent.models import backbone\n"
            "print(backbone('folder_backbones_for_simxent:small', image_size=16)[1])")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split()[-1] == "8", run.stderr


def test_weights_that_do_not_fit_are_named_in_one_line(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    stem = ModelConfig(backbone="resnet18", cifar_stem=True, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ConfigError, match=r"model.weights: .*r18.pth: weights do not fit resnet18 with the CIFAR "
                                          r"stem: 1 wrong shape \(conv1.weight \[64, 3, 7, 7\] "
                                          r"\(model: \[64, 3, 3, 3\]\)\)$"):
        SimCLR(stem)
    with pytest.raises(ConfigError, match=r"do not fit resnet34: \d+ missing \(layer1.2.conv1.weight, .*, \.\.\.\)$"):
        SimCLR(ModelConfig(backbone="resnet34", weights=str(tmp_path / "r18.pth")))
    with pytest.raises(ConfigError, match="do not fit convnet: .* missing .*; .* unexpected"):
        SimCLR(ModelConfig(backbone="convnet", weights=str(tmp_path / "r18.pth")))
    with pytest.raises(ConfigError, match="model.weights: checkpoint not found: .*none.pth"):
        SimCLR(ModelConfig(backbone="convnet", weights=str(tmp_path / "none.pth")))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="model.weights: .*list.pth: expected a state dict"):
        SimCLR(ModelConfig(backbone="convnet", weights=str(tmp_path / "list.pth")))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_holding_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": Path("x")}, path)
    with pytest.raises(ConfigError, match="model.weights: refusing to load .*evil.pth"):
        SimCLR(ModelConfig(backbone="convnet", weights=str(path)))


def test_backbone_typo_and_misfit_weights_exit_2_through_the_command(tmp_path, capsys):
    folder = make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=1, size=16) / "train"
    assert pretrain_main(["model.backbone=mobilenet_v3_smal", f"out={tmp_path / 'a'}"]) == 2
    assert "model.backbone: 'mobilenet_v3_smal' is not a backbone; did you mean 'mobilenet_v3_small'?" in \
        capsys.readouterr().err
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    args = [*TINY_RUN, f"data.train={folder}", f"out={tmp_path / 'b'}", f"model.weights={tmp_path / 'r18.pth'}"]
    assert pretrain_main(["--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simxent: error: model.weights: ") and "do not fit convnet" in err[0]


def test_docs_list_every_backbone():
    assert markdown_backbones() in DOCS.read_text(), (
        "docs/backbones.md is out of date; regenerate its table with "
        "python -c 'from simxent.models import markdown_backbones; print(markdown_backbones())'")


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=8, test_per_class=1, size=32) / "train"


def run_args(folder, out, name, *more):
    return [*TINY_RUN, f"data.train={folder}", "data.image_size=32", f"model.backbone={name}", f"out={out}",
            "optim.lr=0.01", *more]


def encoder_weights(path):
    return load_checkpoint(path)["encoder"]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1"])
def test_pipeline_pretrains_resumes_and_exports(name, small_folder, tmp_path):
    """A torchvision family through the real run: two epochs straight, or one then a resumed second, end with
    the same weights; the exported state dict loads into torchvision's model and gives load_encoder's features.
    A constant lr (no warm-up, a cosine to the peak itself): the schedule then does not depend on
    train.epochs, which the split run raises from 1 to 2."""
    constant = ("optim.warmup_epochs=0", "optim.min_lr=1")
    straight = pretrain(load_config(None, run_args(small_folder, tmp_path / "straight", name, "train.epochs=2",
                                                   *constant)), progress=False)
    pretrain(load_config(None, run_args(small_folder, tmp_path / "split", name, "train.epochs=1", *constant)),
             progress=False)
    resumed = pretrain(load_config(None, run_args(small_folder, tmp_path / "split", name, "train.epochs=2",
                                                  "train.resume=auto", *constant)), progress=False)
    assert straight["epoch"] == resumed["epoch"] == 2
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    a, b = encoder_weights(tmp_path / "straight" / "checkpoints" / "last.pt"), encoder_weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    export_torchvision(last, tmp_path / "export.pth")
    full = torchvision.models.get_model(name, weights=None).eval()
    missing, unexpected = full.load_state_dict(torch.load(tmp_path / "export.pth", weights_only=True), strict=False)
    assert unexpected == [] and missing and all(k.startswith("classifier.") for k in missing)
    x = torch.randn(2, 3, 32, 32)
    classifier = FAMILIES["mobilenetv3" if name.startswith("mobilenet") else "squeezenet"][3]
    with torch.no_grad():
        torch.testing.assert_close(logits_from_features(full, classifier, load_encoder(last), x),
                                   reference(full, name, x), rtol=1e-4, atol=1e-5)

    # model.weights=<simxent checkpoint> starts a new run from its encoder.
    fresh = SimCLR(ModelConfig(backbone=name, weights=str(last)), image_size=32)
    assert all(torch.equal(v, b[k]) for k, v in fresh.encoder.state_dict().items())


def test_user_backbone_trains_checkpoints_and_loads(user_module, small_folder, tmp_path):
    cfg = load_config(None, run_args(small_folder, tmp_path / "run", f"{user_module}:small", "train.epochs=1"))
    summary = pretrain(cfg, progress=False)
    assert summary["global_step"] == 2 and summary["skipped_steps"] == 0 and 0 < summary["last_loss"] < 10
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    encoder = load_encoder(tmp_path / "run" / "checkpoints" / "last.pt")
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
    assert all(torch.equal(v, state["encoder"][k]) for k, v in encoder.state_dict().items())


# --- model.view_batches: one BatchNorm batch per view, or all views together ----------------------------------

def simclr(view_batches: str, views=(2,)) -> SimCLR:
    torch.manual_seed(0)  # the same weights for both settings
    cfg = ModelConfig(backbone="convnet", head_hidden=16, head_out=8, view_batches=view_batches)
    return SimCLR(cfg, image_size=8, views=views).double()


def test_separate_view_batches_encode_each_view_on_its_own():
    """Training mode: ``separate`` is the model run on each view alone, concatenated (float64, exactly);
    ``joint`` differs, its BatchNorm statistics spanning both views. Eval mode: both the same."""
    x = torch.rand(2 * 6, 3, 8, 8, dtype=torch.float64)
    joint, separate = simclr("joint"), simclr("separate")
    per_view = torch.cat([joint(v) for v in x.split(6)])
    assert torch.equal(separate(x), per_view)
    assert (joint(x) - per_view).abs().max() > 1e-3
    separate.load_state_dict(joint.state_dict())  # the same running statistics
    joint.eval(), separate.eval()
    torch.testing.assert_close(separate(x), joint(x), rtol=0, atol=0)
    torch.testing.assert_close(joint(x), torch.cat([joint(v) for v in x.split(6)]), rtol=0, atol=1e-12)


def test_separate_view_batches_split_every_batch_of_a_multi_crop_list():
    """Three full-size and two small views: five encoder batches, each one view of all four images, in order."""
    full, small = torch.rand(3 * 4, 3, 8, 8, dtype=torch.float64), torch.rand(2 * 4, 3, 6, 6, dtype=torch.float64)
    joint, separate = simclr("joint"), simclr("separate", views=(3, 2))
    per_view = torch.cat([joint(v) for v in [*full.split(4), *small.split(4)]])
    assert torch.equal(separate([full, small]), per_view)


def test_pretraining_with_separate_view_batches_runs(small_folder, tmp_path, monkeypatch):
    """model.view_batches=separate through the real training loop, with multi-crop: every encoder call is
    one view of the batch (16 images), three at 16 px then two at 8 px per step."""
    from simxent.models import ConvNet

    calls, real = [], ConvNet.forward

    def spy(self, x):
        if self.training:  # not the probes of the encoder's feature size at each view size (eval mode)
            calls.append(tuple(x.shape[i] for i in (0, 3)))
        return real(self, x)

    monkeypatch.setattr(ConvNet, "forward", spy)
    cfg = load_config(None, [*TINY_RUN, f"data.train={small_folder}", f"out={tmp_path / 'run'}", "train.epochs=1",
                             "eval.every=0", "augment.views=3", "augment.small_views=2", "model.view_batches=separate"])
    summary = pretrain(cfg, progress=False)
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["last_loss"]))
    assert calls == ([(16, 16)] * 3 + [(16, 8)] * 2) * 2


def test_views_below_the_image_size_train_small_and_evaluate_at_the_image_size(small_folder, tmp_path,
                                                                                monkeypatch):
    """augment.view_ratio=0.75 at data.image_size=16: each step encodes the full views at 12 px and multi-crop's
    small ones at half that (8 px, the floor); kNN monitoring encodes the validation images at 16 px."""
    from simxent.models import ConvNet

    calls, real = [], ConvNet.forward

    def spy(self, x):
        calls.append((x.shape[3], self.training))
        return real(self, x)

    monkeypatch.setattr(ConvNet, "forward", spy)
    cfg = load_config(None, [*TINY_RUN, f"data.train={small_folder}", f"data.val={small_folder}",
                             f"out={tmp_path / 'run'}", "train.epochs=1", "eval.projector=0", "augment.view_ratio=0.75",
                             "augment.small_views=1"])
    summary = pretrain(cfg, progress=False)
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["last_loss"]))
    assert {size for size, training in calls if training} == {12, 8}
    assert calls[-1] == (16, False)  # kNN monitoring after the epoch


def test_a_view_size_the_backbone_cannot_take_is_named(user_module, small_folder, tmp_path):
    base = [*TINY_RUN, f"data.train={small_folder}", f"out={tmp_path / 'run'}", f"model.backbone={user_module}:one_size"]
    with pytest.raises(ConfigError, match=r"model.backbone: .*:one_size cannot encode 8 px images "
                                          r"\(augment.view_ratio\)"):
        pretrain(load_config(None, [*base, "augment.view_ratio=0.5"]), progress=False)
    for ratio in (1.5, 0.25, 0):  # larger than the image; 4 px; none
        with pytest.raises(ConfigError, match=r"augment.view_ratio.*out of range \(in \(0, 1\], for views of at "
                                              r"least 8 px at data.image_size = 16\)"):
            load_config(None, [*base, f"augment.view_ratio={ratio}"])


def test_blur_follows_the_data_resolution_not_the_view_size():
    """SimCLR's default blurs 64 px data and not 32 px data; 48 px views of 64 px images are still blurred,
    with the sigma scaled to the 48 px view."""
    from simxent.augment import RandomGaussianBlur, blur_sigma
    from simxent.train import MultiViewAugment

    def blurs(*overrides):
        aug = MultiViewAugment(load_config("cpu", list(overrides)), torch.device("cpu"))
        return [(m.p, m.sigma) for m in aug.full.modules() if isinstance(m, RandomGaussianBlur)]

    assert blurs("data.image_size=64", "augment.view_ratio=0.75") == [(0.5, blur_sigma(48))]
    assert blurs("data.image_size=32", "augment.view_ratio=1") == []
    assert blurs("data.image_size=64", "augment.view_ratio=0.75", "augment.blur_p=0.2") == [(0.2, blur_sigma(48))]


def test_scheduled_views_grow_with_their_small_views_and_blur():
    """A resolution schedule 32 -> 48 px at 64 px data: the full views, multi-crop's small views (half of
    them) and the blur sigma (scaled to each view) follow the progress."""
    from simxent.augment import RandomGaussianBlur, blur_sigma
    from simxent.train import MultiViewAugment

    aug = MultiViewAugment(load_config("cpu", ["data.image_size=64", "augment.view_ratio_start=0.5"]),
                           torch.device("cpu"))
    for progress, size in ((0.0, 32), (0.5, 40), (1.0, 48)):
        full, small = aug.at(progress)
        assert (full.size, small.size) == (size, size // 2)
        assert [m.sigma for m in full.modules() if isinstance(m, RandomGaussianBlur)] == [blur_sigma(size)]
    assert aug.full is aug.at(1.0)[0]  # what monitoring normalises with, built once


def test_a_scheduled_first_view_size_the_backbone_cannot_take_is_named(user_module, small_folder, tmp_path):
    base = [*TINY_RUN, f"data.train={small_folder}", f"out={tmp_path / 'run'}",
            f"model.backbone={user_module}:one_size"]
    with pytest.raises(ConfigError, match=r"model.backbone: .*:one_size cannot encode 8 px images "
                                          r"\(augment.view_ratio_start\)"):
        pretrain(load_config(None, [*base, "augment.view_ratio_start=0.5"]), progress=False)


def test_streamed_views_are_cropped_at_the_view_size(small_folder, tmp_path, monkeypatch):
    """With data.stream=true the decoding workers take the crops: at view_ratio 0.75 of 16 px, 12 px views."""
    from simxent.models import ConvNet

    sizes, real = set(), ConvNet.forward

    def spy(self, x):
        if self.training:
            sizes.add(tuple(x.shape[2:]))
        return real(self, x)

    monkeypatch.setattr(ConvNet, "forward", spy)
    cfg = load_config(None, [*TINY_RUN, f"data.train={small_folder}", f"out={tmp_path / 'run'}", "train.epochs=1",
                             "eval.every=0", "data.stream=true", "data.workers=1", "augment.view_ratio=0.75"])
    assert pretrain(cfg, progress=False)["global_step"] == 2 and sizes == {(12, 12)}
