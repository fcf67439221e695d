"""Strict YAML configs and dotted overrides: every mistake names its key before any work starts."""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simxent.config import Config, ConfigError, config_from_dict, load_config, parse_override, save_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "simxent" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_presets_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_presets_exist():
    assert {p.name for p in CONFIGS} >= {"cifar10.yaml", "cpu.yaml", "imagenet.yaml", "demo.yaml"}


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(None, ["train.batch_size=64", "loss.temperature=0.1", "augment.crop_scale=[0.2, 1]",
                             "model.cifar_stem=true", "augment.blur_p=null", "out=runs/x"])
    assert cfg.train.batch_size == 64 and cfg.loss.temperature == 0.1
    assert cfg.augment.crop_scale == (0.2, 1.0) and cfg.model.cifar_stem is True
    assert cfg.augment.blur_p is None and cfg.out == "runs/x"


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; users write it in files and overrides alike."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 1e-6\n")
    cfg = load_config(path, ["optim.lr=5E-4", "augment.crop_scale=[2e-1, 1]"])
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.lr == 5e-4 and cfg.augment.crop_scale == (0.2, 1.0)
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="optim.lr: must be finite"):
        load_config(None, ["optim.lr=infinity"])


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batchsize: 32\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.batchsize' in .*c.yaml; did you mean 'train.batch_size'"):
        load_config(path)


def test_unknown_override_and_section():
    with pytest.raises(ConfigError, match="did you mean 'loss.temperature'"):
        load_config(None, ["loss.temprature=0.2"])
    with pytest.raises(ConfigError, match="unknown key 'nosuch.thing'"):
        load_config(None, ["nosuch.thing=1"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["train=3"])


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("train.batch_size=1", "train.batch_size.*out of range"),
    ("loss.temperature=0", "loss.temperature.*out of range"),
    ("loss.temperature=-1", "loss.temperature.*out of range"),
    ("optim.lr=-0.1", "optim.lr.*out of range"),
    ("augment.crop_scale=[0.0, 1.0]", "augment.crop_scale.*out of range"),
    ("augment.crop_scale=[0.5, 1.5]", "augment.crop_scale.*out of range"),
    ("augment.crop_scale=0.5", "augment.crop_scale: expected a list of 2"),
    ("model.backbone=resnet9", "model.backbone: 'resnet9' is not one of"),
    ("model.cifar_stem=maybe", "model.cifar_stem: expected true or false"),
    ("optim.lr=.nan", "optim.lr: must be finite"),
    ("train.batch_size", "not of the form"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "augment.crop_scale=[0.3, 0.9]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=10**6), st.floats(min_value=1e-4, max_value=100, allow_nan=False))
def test_property_valid_overrides_round_trip(batch, temperature):
    cfg = load_config(None, [f"train.batch_size={batch}", f"loss.temperature={temperature!r}"])
    assert cfg.train.batch_size == batch and cfg.loss.temperature == temperature


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=20))
def test_property_unknown_keys_always_raise_config_error(key):
    valid = set(_keys())
    if key in valid or key.rstrip(".") in valid:
        return
    with pytest.raises(ConfigError):
        load_config(None, [f"{key}=1"])


@given(st.text(max_size=30))
def test_property_parser_never_crashes_unexpectedly(text):
    try:
        parse_override(text)
    except ConfigError:
        pass


def _keys():
    def walk(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield prefix + k
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield prefix + k
    return list(walk(to_dict(Config())))
