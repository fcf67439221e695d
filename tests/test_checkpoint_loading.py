"""Reading encoders: old checkpoints, tolerant saved configs, malformed files, plain state dicts scored with
``--backbone``, and exports that load without simxent."""
import importlib
import json
import logging
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from simxent.checkpoint import CheckpointError, export_torchvision, load_backbone, load_encoder, save_checkpoint
from simxent.cli import linear_eval_main
from simxent.config import ConfigError, load_config, preset_names, to_dict
from simxent.models import backbone
from tests.fixtures.make_checkpoint_v1 import probe_images

ROOT = Path(__file__).resolve().parents[1]
linear_eval_module = importlib.import_module("simxent.linear_eval")  # simxent.linear_eval is the function
FIXTURES = ROOT / "tests" / "fixtures"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def scrambled_statistics(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics away from (0, 1), so that a loader dropping them is seen."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in encoder.named_buffers():
        if "running_" in name:
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return encoder.eval()


def write_checkpoint(path: Path, config: dict, encoder: nn.Module = None, **extra) -> Path:
    state = {"config": config, **extra}
    if encoder is not None:
        state["encoder"] = encoder.state_dict()
    save_checkpoint(state, path)
    return path


def tiny_convnet_checkpoint(path: Path, **config_changes) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    encoder = scrambled_statistics(backbone("convnet")[0])
    config = to_dict(load_config(None, ["model.backbone=convnet", "data.image_size=16"]))
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return write_checkpoint(path, config, encoder), encoder


# --- old checkpoints and tolerant saved configs -------------------------------------------------------------

def test_a_checkpoint_written_by_simxent_0_1_0_still_loads(tmp_path):
    """tests/fixtures/checkpoint_v1.pt.xz was written by simxent 0.1.0's training code (see
    make_checkpoint_v1.py); its features on a fixed input are stored beside it."""
    path = tmp_path / "checkpoint_v1.pt"
    path.write_bytes(lzma.decompress((FIXTURES / "checkpoint_v1.pt.xz").read_bytes()))
    expected = json.loads((FIXTURES / "checkpoint_v1.json").read_text())
    with torch.no_grad():
        features = load_encoder(path)(probe_images())
    assert features.shape == (2, 512)
    torch.testing.assert_close(features[:, ::64], torch.tensor(expected["features_every64th"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(features.sum(1), torch.tensor(expected["features_sum"]), rtol=1e-4, atol=1e-5)


def test_unknown_and_unneeded_saved_keys_do_not_stop_loading(tmp_path, caplog):
    """A key that a later version added or renamed is named in a warning; keys the encoder does not need are
    not read at all, even when their values are of a type this version would refuse."""
    path, encoder = tiny_convnet_checkpoint(tmp_path / "c.pt", train__epochs="many", optim__name="lion")
    write_checkpoint(path, {**torch.load(path, weights_only=True)["config"], "schedule": {"kind": "cosine"},
                            "model": {"backbone": "convnet", "cifar_stem": False, "width_multiplier": 2}}, encoder)
    with caplog.at_level(logging.WARNING, logger="simxent"):
        loaded = load_encoder(path)
    assert "model.width_multiplier" in caplog.text and "schedule.kind" in caplog.text
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), encoder(x))


@pytest.mark.parametrize("model, message", [
    ({"cifar_stem": False}, "model.backbone is missing"),
    ({"backbone": "resnet9"}, "model.backbone: 'resnet9' is not a backbone"),
    ({"backbone": "resnet18", "cifar_stem": "yes"}, "model.cifar_stem: expected true or false"),
])
def test_what_rebuilds_the_encoder_is_checked_strictly(tmp_path, model, message):
    path = write_checkpoint(tmp_path / "c.pt", {"model": model}, backbone("resnet18")[0])
    with pytest.raises(ConfigError, match=f"c.pt, saved config: {message}"):
        load_encoder(path)


def test_architecture_is_checked_against_the_weight_shapes(tmp_path):
    """A missing cifar_stem defaults to false, which the weights of a CIFAR-stem ResNet contradict."""
    path = write_checkpoint(tmp_path / "c.pt", {"model": {"backbone": "resnet18"}}, backbone("resnet18", True)[0])
    with pytest.raises(CheckpointError, match=r"do not fit resnet18: 1 wrong shape \(conv1.weight \[64, 3, 3, 3\] "
                                              r"\(model: \[64, 3, 7, 7\]\)\)"):
        load_encoder(path)
    path = write_checkpoint(tmp_path / "d.pt", {"model": {"backbone": "resnet34"}}, backbone("resnet18")[0])
    with pytest.raises(CheckpointError, match=r"do not fit resnet34: 96 missing \(layer1.2.conv1.weight, "):
        load_encoder(path)


# --- malformed checkpoints: one line and exit status 2 ----------------------------------------------------

def score(ckpt, folder, tmp_path, *more) -> int:
    return linear_eval_main(["--checkpoint", str(ckpt), "--train", str(folder), "--test", str(folder.parent / "test"),
                             "--epochs", "1", "--knn-k", "3", "--workers", "0", "--no-progress",
                             "--out", str(tmp_path / "eval"), *more])


@pytest.fixture
def split_folder(tmp_path):
    from tests.conftest import write_image
    root = tmp_path / "split"
    for p, (part, n) in enumerate((("train", 6), ("test", 3))):
        for c, name in enumerate(("a", "b")):
            for i in range(n):
                write_image(root / part / name / f"{i}.png", seed=100 * p + 10 * c + i)
    return root / "train"


def malformed(tmp_path, case: str) -> Path:
    path, _ = tiny_convnet_checkpoint(tmp_path / "c.pt")
    state = torch.load(path, weights_only=True)
    if case == "no config":
        del state["config"]
    elif case == "huge image_size":
        state["config"]["data"]["image_size"] = 100000
    else:
        state["format_version"] = {"string": "1", "bool": True, "float": 1.0}[case]
    torch.save(state, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("no config", "c.pt has no saved config"),
    ("string", "c.pt: format_version is '1', not a positive integer"),
    ("bool", "c.pt: format_version is True, not a positive integer"),
    ("float", "c.pt: format_version is 1.0, not a positive integer"),
    ("huge image_size", r"c.pt, saved config: data.image_size: 100000 is out of range \(8 to 1024\)"),
])
def test_malformed_checkpoints_get_one_line(tmp_path, split_folder, capsys, case, message):
    assert score(malformed(tmp_path, case), split_folder, tmp_path) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("simxent: error: ")
    assert re.search(message, err), err


def test_image_size_and_cache_come_from_the_command_line_not_the_checkpoint(tmp_path, split_folder, capsys,
                                                                             caplog):
    """The checkpoint names a cache folder that cannot exist here (its parent is a file) and an absurd image
    size; --image-size replaces the size unread, and nothing is written where the checkpoint says."""
    (tmp_path / "scratch").write_text("a file, not a folder")
    path = malformed(tmp_path, "huge image_size")
    state = torch.load(path, weights_only=True)
    state["config"]["data"]["cache_dir"] = str(tmp_path / "scratch" / "cache")
    torch.save(state, path)
    cache = tmp_path / "mine"
    with caplog.at_level(logging.INFO, logger="simxent"):
        assert score(path, split_folder, tmp_path, "--image-size", "16", "--cache-dir", str(cache),
                     "--json", str(tmp_path / "r.json")) == 0
    assert "images are scored at 16 px (--image-size); the checkpoint trained on" in caplog.text
    assert json.loads((tmp_path / "r.json").read_text())["image_size"] == 16
    assert any(cache.glob("*.npy")) and (tmp_path / "scratch").is_file()
    assert score(path, split_folder, tmp_path, "--image-size", "5000") == 2
    assert "--image-size: 5000 is out of range" in capsys.readouterr().err


# --- plain state dicts: --backbone ------------------------------------------------------------------------

def test_a_torchvision_state_dict_is_scored_with_its_own_features(tmp_path, split_folder, monkeypatch):
    """A seeded torchvision resnet18 saved with its fc: the features linear evaluation computes are those of
    torchvision's model with fc replaced by Identity, on the decoded images normalised with ImageNet's
    mean and std."""
    torch.manual_seed(3)
    reference = scrambled_statistics(torchvision.models.resnet18())
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    reference.fc = nn.Identity()
    seen, extract = [], linear_eval_module.extract_features

    def spy(encoder, images, *args, **kwargs):
        seen.append((images, extract(encoder, images, *args, **kwargs)))
        return seen[-1][1]

    monkeypatch.setattr(linear_eval_module, "extract_features", spy)
    assert score(tmp_path / "r18.pth", split_folder, tmp_path, "--backbone", "resnet18", "--image-size", "16",
                 "--precision", "fp32", "--json", str(tmp_path / "r.json")) == 0
    assert len(seen) == 2 and json.loads((tmp_path / "r.json").read_text())["backbone"] == "resnet18"
    for images, features in seen:
        x = images.permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(features, reference(x), rtol=1e-4, atol=1e-5)


def test_plain_state_dicts_are_checked_against_the_backbone(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")
    load_backbone(tmp_path / "no_fc.pth", "resnet18")  # without its classifier: fine
    with pytest.raises(CheckpointError, match=r"do not fit resnet50: 198 missing \(layer1.0.conv3.weight, .*; 23 wrong shape"):
        load_backbone(tmp_path / "no_fc.pth", "resnet50")
    with pytest.raises(CheckpointError, match=r"do not fit resnet18 with the CIFAR stem: 1 wrong shape \(conv1"):
        load_backbone(tmp_path / "no_fc.pth", "resnet18", cifar_stem=True)
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth: expected a state dict"):
        load_backbone(tmp_path / "list.pth", "resnet18")
    path, _ = tiny_convnet_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt is a simxent checkpoint: leave out --backbone"):
        load_backbone(path, "convnet")


# --- exports that load without simxent --------------------------------------------------------------------

# Exactly the loading code of the README; each snippet leaves `model` ready for inference.
LOADERS = {
    "resnet": '''model = torchvision.models.resnet50()
model.fc = nn.Identity()
model.load_state_dict(torch.load("resnet50.pth", weights_only=True))
model.eval()''',
    "cifar_stem": '''model = torchvision.models.resnet18()
model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity()
model.fc = nn.Identity()
model.load_state_dict(torch.load("resnet18.pth", weights_only=True))
model.eval()''',
    "convnet": '''model = torch.export.load("convnet.pt2").module()''',
}
PRESETS = {"imagenet": ("resnet", "resnet50.pth"), "cifar10": ("cifar_stem", "resnet18.pth"),
           "cpu": ("convnet", "convnet.pt2"), "demo": ("convnet", "convnet.pt2")}
BLOCKED = """import os, sys
sys.modules["simxent"] = None  # any import of simxent fails
import torch, torchvision
from torch import nn
"""
RUN_IN = """os.chdir({folder!r})
{code}
with torch.no_grad():
    torch.save(model(torch.load("x.pt")), "y.pt")
"""


def test_the_readme_shows_each_loader():
    readme = (ROOT / "README.md").read_text()
    for code in LOADERS.values():
        assert code in readme


def test_a_convnet_export_is_named_pt2_and_said_to_be_a_program(tmp_path, capfd):
    """A convnet's export needs a .pt2 name (torch.load cannot read it, torch.export.load reads only that)
    and an existing folder; a .pt2 given where a state dict belongs is named as a program, not corrupt."""
    cfg = load_config("cpu")
    ckpt = write_checkpoint(tmp_path / "last.pt", to_dict(cfg), backbone(cfg.model.backbone)[0])
    with pytest.raises(CheckpointError, match=r"needs a name ending in .pt2 \(e.g. enc.pt2\)"):
        export_torchvision(ckpt, tmp_path / "enc.pth")
    with pytest.raises(CheckpointError, match="the folder .*nowhere does not exist"):
        export_torchvision(ckpt, tmp_path / "nowhere" / "enc.pt2")
    assert not list(tmp_path.glob("enc*")) and not list(tmp_path.glob(".enc*"))
    assert export_torchvision(ckpt, tmp_path / "enc.pt2") == "exported_program"
    assert "ending in .pt2" not in capfd.readouterr().err  # torch's complaint about a temporary file's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.pt2", "last.pt"]
    with pytest.raises(CheckpointError, match="enc.pt2 is a torch.export program .* give the simxent checkpoint"):
        load_backbone(tmp_path / "enc.pt2", cfg.model.backbone)
    # The other way round: a state dict named .pt2 would pass for a program that torch.export.load cannot read.
    resnet = write_checkpoint(tmp_path / "resnet.pt", to_dict(load_config("cifar10")), backbone("resnet18", True)[0])
    with pytest.raises(CheckpointError, match=r"written as a state dict .* name it r18.pth"):
        export_torchvision(resnet, tmp_path / "r18.pt2")
    assert not (tmp_path / "r18.pt2").exists()


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """torch's writer reports a full disk or a refused file (/proc/x.pth) as its own RuntimeError."""
    cfg = load_config(None, ["model.backbone=resnet18"])
    ckpt = write_checkpoint(tmp_path / "last.pt", to_dict(cfg), backbone("resnet18")[0])

    def full_disk(obj, f, *args, **kwargs):
        open(f, "wb").write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:747] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot export to .*enc.pth: .*PytorchStreamWriter failed"):
        export_torchvision(ckpt, tmp_path / "enc.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    def ctrl_c_while_writing(obj, f, *args, **kwargs):
        open(f, "wb").write(b"part")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", ctrl_c_while_writing)
    with pytest.raises(KeyboardInterrupt):
        export_torchvision(ckpt, tmp_path / "enc.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # nor does Ctrl-C leave a temporary file


def test_every_preset_exports_a_file_that_loads_without_simxent(tmp_path):
    """Each preset's export, loaded by the README's code in a Python that cannot import simxent, gives the
    features of simxent's encoder (BatchNorm statistics included)."""
    assert sorted(PRESETS) == preset_names()
    script, expected = BLOCKED, {}
    for i, (preset, (loader, name)) in enumerate(sorted(PRESETS.items())):
        cfg = load_config(preset)
        torch.manual_seed(i)
        encoder = scrambled_statistics(backbone(cfg.model.backbone, cfg.model.cifar_stem)[0])
        work = tmp_path / preset
        work.mkdir()
        ckpt = write_checkpoint(work / "last.pt", to_dict(cfg), encoder)
        kind = export_torchvision(ckpt, work / name)
        assert kind == ("exported_program" if loader == "convnet" else "state_dict")
        x = torch.randn(3, 3, 40, 48)
        torch.save(x, work / "x.pt")
        with torch.no_grad():
            expected[preset] = encoder(x)
        script += RUN_IN.format(folder=str(work), code=LOADERS[loader])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-c", script], env=env, check=True, timeout=300)
    for preset, features in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / preset / "y.pt"), features, rtol=1e-4, atol=1e-5)
