"""Strict YAML configs and dotted overrides: every mistake names its key before any work starts."""
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from simxent.augment import small_view_size
from simxent.config import (Config, ConfigError, config_from_dict, load_config, parse_override, save_config, to_dict,
                            view_size)

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


def test_numbers_read_as_python_reads_them_not_as_yaml_1_1_octal_or_base_60(tmp_path):
    """PyYAML's YAML 1.1 reads 010 as 8 and 1:30 as 90: a seed or an epoch count written with a leading zero
    would change silently, and a time written as minutes:seconds would be seconds in base 60."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 010\n  seed: -07\n")
    cfg = load_config(path, ["train.batch_size=0128", "optim.lr=+1e-3"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.batch_size, cfg.optim.lr) == (10, -7, 128, 1e-3)
    for text, message in (("train.max_time=1:30", "train.max_time: expected a number, got '1:30'"),
                          ("train.epochs=1_000", "train.epochs: expected an integer, got '1_000'"),
                          ("train.epochs=0x10", "train.epochs: expected an integer, got '0x10'")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [text])


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  # crop_scale: [0.2, 1.0]\ntrain:\n  epochs: 3\n")
    assert load_config(path).train.epochs == 3 and load_config(path).augment == load_config(None).augment


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
    # A key of another section by its own name: that section's key, not the nearest spelling (train.resume).
    with pytest.raises(ConfigError, match=r"unknown key 'train.lr' .*; did you mean 'optim.lr'\?$"):
        load_config(None, ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"; did you mean 'train.batch_size' or 'eval.batch_size'\?$"):
        load_config(None, ["batch_size=64"])


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("train.batch_size=1", "train.batch_size.*out of range"),
    ("loss.temperature=0", "loss.temperature.*out of range"),
    ("loss.temperature=-1", "loss.temperature.*out of range"),
    ("optim.lr=-0.1", "optim.lr.*out of range"),
    ("loss.temperature_lr=-0.001", "loss.temperature_lr.*out of range"),
    ("augment.crop_scale=[0.0, 1.0]", "augment.crop_scale.*out of range"),
    ("augment.crop_scale=[0.5, 1.5]", "augment.crop_scale.*out of range"),
    ("augment.crop_scale=0.5", "augment.crop_scale: expected a list of 2"),
    ("model.backbone=resnet9", "model.backbone: 'resnet9' is not a backbone; did you mean"),
    ("model.cifar_stem=maybe", "model.cifar_stem: expected true or false"),
    ("optim.lr=.nan", "optim.lr: must be finite"),
    ("train.batch_size", "not of the form"),
    ("augment.views=1", "augment.views.*out of range"),
    ("augment.small_views=-1", "augment.small_views.*out of range"),
    ("augment.small_crop_scale=[0.5, 0.4]", "augment.small_crop_scale.*out of range"),
    ("augment.small_size=64", r"augment.small_size.*out of range \(null or in \[8, the smallest view size = 32\]\)"),
    ("loss.positives=classes", "loss.positives: 'classes' is not one of views, labels"),
    ("augment.jitter_strength=3", r"augment.jitter_strength.*out of range \(in \[0, 2.5\]\)"),  # hue over 0.5
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_a_learnt_temperature_starts_inside_its_range():
    with pytest.raises(ConfigError, match=r"loss.temperature: 2.0 is out of range \(in \[0.01, 1.0\] with "):
        load_config(None, ["loss.learn_temperature=true", "loss.temperature=2.0"])
    assert load_config(None, ["loss.temperature=2.0"]).loss.temperature == 2.0  # a fixed one: any t > 0


def test_small_views_are_no_larger_than_the_views():
    cfg = load_config(None, ["augment.view_ratio=0.5", "augment.small_size=16"])  # 16 px views at 32
    assert cfg.augment.small_size == 16
    with pytest.raises(ConfigError, match=r"augment.small_size: 20 is out of range \(null or in \[8, the smallest "
                                          r"view size = 16\]\)"):
        load_config(None, ["augment.view_ratio=0.5", "augment.small_size=20"])
    with pytest.raises(ConfigError, match=r"augment.small_size: 20 is out of range \(null or in \[8, the smallest "
                                          r"view size = 16\]\)"):  # a resolution schedule's first views
        load_config(None, ["augment.view_ratio_start=0.5", "augment.small_size=20"])


def test_a_resolution_schedule_rises_from_its_start_to_the_view_size_in_steps_of_4_px():
    """s(p) = s0 + round(i (s1 - s0) / n) with i = round(n p), n = ceil((s1 - s0) / 4), worked out by hand
    for 16 -> 24 px (16, 20, 24) and 13 -> 22 px (13, 16, 19, 22)."""
    aug = load_config(None, ["augment.view_ratio=0.75", "augment.view_ratio_start=0.5"]).augment
    assert [view_size(aug, 32, p) for p in (0, 0.2, 0.3, 0.7, 0.8, 1, 1.5)] == [16, 16, 20, 20, 24, 24, 24]
    assert [small_view_size(aug, 32, p) for p in (0, 0.3, 1)] == [8, 10, 12]
    odd = load_config(None, ["augment.view_ratio=0.6875", "augment.view_ratio_start=0.40625"]).augment
    assert [view_size(odd, 32, p) for p in (0, 0.1, 0.4, 0.6, 0.9, 1)] == [13, 13, 16, 19, 22, 22]
    assert view_size(load_config(None, ["augment.view_ratio=0.75"]).augment, 32, 0) == 24  # no schedule


@pytest.mark.parametrize("overrides, match", [
    (["augment.view_ratio_start=0.9", "augment.view_ratio=0.75"], r"augment.view_ratio_start: 0.9 is out of range"),
    (["augment.view_ratio_start=0.2"], r"augment.view_ratio_start: 0.2 is out of range \(null or in \(0, "
                                       r"augment.view_ratio\], for views of at least 8 px at data.image_size = 32\)"),
    (["augment.view_ratio_start=0.5", "data.stream=true"], r"augment.view_ratio_start: needs data.stream=false"),
])
def test_a_resolution_schedule_is_refused_where_it_cannot_hold(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder, not a file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "augment.crop_scale=[0.3, 0.9]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_from_dict(to_dict(cfg)) == cfg
    # Text that this loader reads as a number (PyYAML's own resolvers leave 1e3 and -.5 bare) stays text.
    texts = load_config(None, ["out=1e3", "data.val=-.5", "data.train=010", "model.weights=2e3"])
    save_config(texts, tmp_path / "t.yaml")
    assert load_config(tmp_path / "t.yaml") == texts
    # ... and text that PyYAML's own loader reads as a number stays text to it (other tools read config.yaml).
    texts = load_config(None, ["out=20240101_1200", "data.val=0x10", "data.train=1:30"])
    save_config(texts, tmp_path / "u.yaml")
    assert load_config(tmp_path / "u.yaml") == texts
    assert yaml.safe_load((tmp_path / "u.yaml").read_text())["out"] == "20240101_1200"


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


# Text keys (paths and names) take an override's text as it is; read as YAML, the left column would become the
# right: 010 -> 8 (octal), 0x10 -> 16, 12:30 -> 750 (sexagesimal), 'photos #2' -> 'photos' (a comment), yes -> True.
VERBATIM = ["010", "0x10", "12:30", "photos #2", "yes", "1e3", "[a, b]", "null", " spaced ", "~"]


@pytest.mark.parametrize("text", VERBATIM)
@pytest.mark.parametrize("key", ["out", "data.train", "data.val", "data.cache_dir", "train.resume"])
def test_text_keys_take_the_override_verbatim(key, text):
    cfg = load_config(None, [f"{key}={text}"])
    section, _, name = key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, name) == text


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=30).filter(str.strip))
def test_property_text_overrides_are_verbatim(text):
    assert parse_override(f"data.val={text}") == ("data.val", text)
    assert load_config(None, [f"out={text}"]).out == text


def test_empty_paths_name_the_key():
    for key in ("out", "data.train"):
        for empty in ("", "  "):
            with pytest.raises(ConfigError, match=rf"override '{key}={empty}': empty path; give a folder \({key}=DIR\)"):
                load_config(None, [f"{key}={empty}"])
    cfg = load_config(None, ["data.val=", "data.cache_dir=", "train.resume="])  # explicitly "none"
    assert (cfg.data.val, cfg.data.cache_dir, cfg.train.resume) == ("", "", "")


@pytest.mark.parametrize("text,read_as", [("010", "10"), ("1.50", "1.5"), ("yes", "True")])
def test_unquoted_number_for_a_text_key_in_yaml_is_refused(tmp_path, text, read_as):
    """YAML has already turned the text into a number; converting back would be a guess, so say to quote it.
    What is no plain decimal number (0x10, 12:30) stays text."""
    path = tmp_path / "c.yaml"
    path.write_text(f"out: {text}\n")
    with pytest.raises(ConfigError, match=rf"out: expected text, got {read_as}; quote it in YAML"):
        load_config(path)
    path.write_text(f"out: '{text}'\n")
    assert load_config(path).out == text
    for plain in ("0x10", "12:30"):
        path.write_text(f"out: {plain}\n")
        assert load_config(path).out == plain


def test_duplicate_keys_are_refused_with_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 1\n  batch_size: 32\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'epochs' at line 4"):
        load_config(path)
    path.write_text("train:\n  epochs: 1\nmodel:\n  head_out: 8\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'train' at line 5"):
        load_config(path)
    path.write_text("data:\n  train: a\ndata.train: b\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: data.train is set twice \(once as a dotted key\)"):
        load_config(path)
    # a merge key followed by an explicit key overrides the merged one on purpose: not a duplicate
    from simxent.config import read_yaml
    assert read_yaml("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  p: 3\n", "t") == {"a": {"p": 1, "q": 2}, "b": {"p": 3, "q": 2}}


def _bomb(levels: int, width: int = 9) -> str:
    """The 'billion laughs': level k is a list of ``width`` aliases of level k-1 (width**levels values)."""
    lines = ["a0: &a0 [0.5, 0.5]"]
    for k in range(1, levels + 1):
        lines.append(f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]")
    return "\n".join(lines) + f"\naugment:\n  crop_scale: *a{levels}\n"


def test_alias_bomb_is_refused_before_expansion(tmp_path):
    """9**6 = 531441 lists: read as YAML it becomes a small graph of shared lists, but the wrong-type message
    used to print its repr (megabytes; with 9 levels, gigabytes). The bomb is refused, in one short line."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(6))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: aliases expand to more than") and len(str(e.value)) < 300
    path.write_text(_bomb(40, width=2))  # 2**40 values: refused as fast
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config(path)
    path.write_text("augment:\n  crop_scale: &a [0.5, *a]\n")  # a list that contains itself
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config(path)
    with pytest.raises(ConfigError, match="override 'augment.crop_scale="):
        load_config(None, ["augment.crop_scale=" + "[" * 5000 + "]" * 5000])  # nested too deeply
    path.write_text("m: &m [0.5, 1.0]\naugment:\n  crop_scale: *m\n")  # a few aliases are fine
    with pytest.raises(ConfigError, match="unknown key 'm'"):
        load_config(path)


def test_huge_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["augment.crop_scale=[" + ", ".join(["1"] * 5000) + "]"])
    assert str(e.value).startswith("augment.crop_scale: expected a list of 2 numbers") and len(str(e.value)) < 300
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.backbone=" + "x" * 10**5])
    assert "is not a backbone" in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.backbone=" + "x" * 10**5 + ":build"])
    assert "cannot import" in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("override", ["augment.mean=[.nan,0,0]", "augment.std=[1, .inf, 1]",
                                      "augment.crop_scale=[.nan, 1]", "augment.crop_scale=[0.5, .nan]",
                                      "augment.blur_p=.nan", "optim.warmup_epochs=-.inf"])
def test_non_finite_values_in_any_float_or_list_key_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: must be finite, got "):
        load_config(None, [override])


def test_presets_by_name_are_the_packaged_files():
    from simxent.config import preset_names
    assert preset_names() == sorted(p.stem for p in CONFIGS) and set(preset_names()) >= {"cpu", "cifar10", "imagenet", "demo"}
    for path in CONFIGS:
        assert load_config(path.stem, ["data.train=x"]) == load_config(path, ["data.train=x"])
    assert load_config("cpu").model.backbone == "convnet_slim" and load_config("demo").train.batch_size == 128
    with pytest.raises(ConfigError, match=r"config file not found: old/cpu.yaml; the presets ship with simxent: write 'cpu'"):
        load_config("old/cpu.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: gpu; presets by name: cifar10, cpu, demo, imagenet"):
        load_config("gpu")


def test_a_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("cpu").write_text("train:\n  epochs: 3\n")
    assert load_config("cpu").train.epochs == 3


def _flat_defaults():
    def walk(tree, prefix=""):
        for k, v in tree.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return dict(walk(to_dict(Config())))


def _readme_table() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("| key | default | meaning |")
    return text[start:].split("\n\n")[0].strip().splitlines()


def test_readme_table_lists_exactly_the_keys_and_defaults_of_config():
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in _readme_table()[2:]]
    keys = [key.strip("`") for key, _, _ in rows]
    defaults = {key.strip("`"): default.strip("`") for key, default, _ in rows}
    flat = _flat_defaults()
    assert keys == list(flat)
    for key, value in flat.items():
        shown = defaults[key]
        assert (shown == value) if isinstance(value, str) and value else (json.loads(shown) == value), key
    assert all(meaning for _, _, meaning in rows)


def test_readme_table_is_made_from_the_field_help():
    from simxent.config import markdown_table
    assert _readme_table() == markdown_table().strip().splitlines(), (
        "README's configuration table differs from the dataclasses; paste the output of\n"
        "python -c 'from simxent.config import markdown_table; print(markdown_table())'")


def test_printed_config_reads_back_and_explains_every_key(tmp_path):
    from simxent.config import format_config
    cfg = load_config("cpu", ["out=010", "data.train=photos #2", "augment.blur_p=0.25", "optim.weight_decay=1e-5",
                              "train.resume=auto"])
    text = format_config(cfg)
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg
    import dataclasses
    lines = [line for line in text.splitlines() if line.startswith("  ") or line.startswith("out:")]
    helps = [f.metadata["help"] for s in (cfg, *[getattr(cfg, f.name) for f in dataclasses.fields(cfg)][1:])
             for f in dataclasses.fields(s) if not dataclasses.is_dataclass(getattr(s, f.name))]
    assert len(lines) == len(_flat_defaults()) == len(helps)
    assert all(line.endswith(f"  # {h}") and h for line, h in zip(lines, helps))


@pytest.mark.parametrize("override,match", [
    ("+model.foo=1", r"no Hydra '\+' prefix .*'model.foo' is not a key \(nearest: 'model.head_out'\)"),
    ("+model.head_out=1", r"no Hydra '\+' prefix .*; write model.head_out=1$"),
    ("++train.epochs=3", r"no Hydra '\+\+' prefix .*; write train.epochs=3$"),
    ("~loss.temperature=1", r"no Hydra '~' prefix"),
])
def test_hydra_prefixes_are_recognised(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_streaming_takes_two_full_size_views_only():
    """Streamed images larger than the view are cropped in the decoding workers, two crops per image."""
    for extra, fix in (("augment.views=3", "augment.views=2"), ("augment.small_views=2", "augment.small_views=0")):
        with pytest.raises(ConfigError, match=rf"data.stream=true makes two full-size views per image \(set {fix}, "
                                              r"or data.stream=false\)"):  # only the key that needs changing
            load_config(None, ["data.stream=true", extra])
    assert load_config(None, ["data.stream=false", "augment.views=3", "augment.small_views=2"]).augment.views == 3


def test_streaming_refuses_batchnorm_re_estimation_naming_the_fix():
    """A streamed folder keeps no decoded images: the cpu preset's re-estimation was dropped with a warning
    at the run's end."""
    with pytest.raises(ConfigError, match=r"train.bn_recalibration=5000: needs data.stream=false .* set "
                                          r"train.bn_recalibration=0"):
        load_config("cpu", ["data.stream=true", "augment.small_views=0"])
    assert load_config("cpu", ["data.stream=true", "augment.small_views=0", "train.bn_recalibration=0"]).data.stream


def test_streaming_refuses_supervised_positives():
    """A streamed bad file is replaced by another image whose label may differ, so labels-as-positives needs
    the cache; the message names both keys."""
    with pytest.raises(ConfigError, match=r"loss.positives=labels: needs data.stream=false"):
        load_config(None, ["data.stream=true", "loss.positives=labels"])
    assert load_config(None, ["data.stream=false", "loss.positives=labels"]).loss.positives == "labels"
    assert load_config(None, ["data.stream=true", "loss.positives=views"]).data.stream


def test_pairwise_multi_view_refuses_the_joint_losses_options():
    """loss.multi_view=pairs / full_pairs is self-supervised NT-Xent: with labels as positives or the
    decoupled loss it is refused, naming the key and the value it needs."""
    multi = "augment.small_views=2"
    for extra, key, needed in (("loss.positives=labels", "loss.positives", "views"),
                               ("loss.decoupled=true", "loss.decoupled", "false")):
        for mode in ("pairs", "full_pairs"):
            with pytest.raises(ConfigError, match=rf"loss.multi_view={mode}: works with {key}={needed} only"):
                load_config(None, [f"loss.multi_view={mode}", multi, extra])
        assert load_config(None, ["loss.multi_view=joint", multi, extra]).loss.multi_view == "joint"
    with pytest.raises(ConfigError, match="loss.multi_view: 'pair' is not one of joint, pairs, full_pairs"):
        load_config(None, ["loss.multi_view=pair"])


def test_pairwise_multi_view_needs_views_to_pair():
    """Two views have one pair, the joint loss already: pairs and full_pairs are refused there, and
    full_pairs without small views (where every pair has a full-size view, so it is pairs) too."""
    for mode in ("pairs", "full_pairs"):
        with pytest.raises(ConfigError, match=rf"loss.multi_view={mode}: needs more than two views per image "
                                              r"\(augment.views \+ augment.small_views is 2\)"):
            load_config(None, [f"loss.multi_view={mode}"])
    with pytest.raises(ConfigError, match="loss.multi_view=full_pairs: .* set loss.multi_view=pairs"):
        load_config(None, ["loss.multi_view=full_pairs", "augment.views=3"])
    assert load_config(None, ["loss.multi_view=pairs", "augment.views=3"]).loss.multi_view == "pairs"
    assert load_config(None, ["loss.multi_view=full_pairs", "augment.small_views=1"]).loss.multi_view == "full_pairs"


def test_jitter_order_and_view_batches_are_choices_named_when_wrong():
    cfg = load_config(None, ["augment.jitter_order=image", "model.view_batches=separate"])
    assert (cfg.augment.jitter_order, cfg.model.view_batches) == ("image", "separate")
    assert (Config().augment.jitter_order, Config().model.view_batches) == ("batch", "joint")
    with pytest.raises(ConfigError, match="augment.jitter_order: 'pixel' is not one of batch, image"):
        load_config(None, ["augment.jitter_order=pixel"])
    with pytest.raises(ConfigError, match="model.view_batches: 'split' is not one of joint, separate"):
        load_config(None, ["model.view_batches=split"])


def test_a_config_file_that_is_not_utf8_and_seeds_and_decode_sizes_out_of_range_are_named(tmp_path, monkeypatch):
    """A non-UTF-8 YAML file was a UnicodeDecodeError traceback; a seed such as 20240601120000 overflowed
    torch's per-epoch seed after decoding and building the model; a decode size of 200,000 px tried to
    allocate hundreds of GB."""
    (tmp_path / "latin1.yaml").write_bytes("train:\n  epochs: 2  # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a UTF-8 YAML file \(byte \d+\)"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "bom.yaml").write_text("train:\n  epochs: 2\n", encoding="utf-8-sig")
    assert load_config(tmp_path / "bom.yaml").train.epochs == 2
    real_read = Path.read_text

    def denied(self, *args, **kwargs):  # simulated: the tests may run as root
        if self.name == "bom.yaml":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=r"cannot read the config file .*bom.yaml: Permission denied"):
        load_config(tmp_path / "bom.yaml")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="train.seed"):
        load_config(None, ["train.seed=20240601120000"])
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1
    with pytest.raises(ConfigError, match="data.decode_size"):
        load_config(None, ["data.decode_size=200000"])
    assert load_config(None, ["data.image_size=1024", "data.decode_size=1536"]).data.decode_size == 1536  # its default
    (tmp_path / "null.yaml").write_text("data:\n  val: null\n")
    with pytest.raises(ConfigError, match=r"data.val: expected text, got None \(for none, write '' rather than null\)"):
        load_config(tmp_path / "null.yaml")
