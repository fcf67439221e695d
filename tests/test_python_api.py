"""The public Python API: what ``import simxent`` offers, and the README's Python example, run as written."""
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import simxent
from simxent.checkpoint import load_checkpoint
from simxent import cli
from simxent.config import ConfigError, check_config
from simxent.demo import make_shapes
from tests.conftest import TINY_RUN

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first ``python`` block of the README's "## Python" section; it says it is the runnable one."""
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.startswith("# runnable example"), "the Python section's first block is not the runnable example"
    return code


def test_the_public_names_are_the_working_functions():
    from simxent import augment, checkpoint, config, loss, search, train
    import importlib
    probe = importlib.import_module("simxent.linear_eval")
    assert set(simxent.__all__) == {"Config", "EmbedOptions", "ProbeOptions", "ViewAugment", "embed", "embed_folder",
                                    "export_torchvision", "linear_eval", "load_config", "load_encoder", "nt_xent",
                                    "pretrain", "read_store", "search_files", "__version__"}
    assert simxent.pretrain is train.pretrain and simxent.linear_eval is probe.linear_eval
    assert simxent.ViewAugment is augment.ViewAugment and simxent.nt_xent is loss.nt_xent
    assert simxent.load_encoder is checkpoint.load_encoder and simxent.Config is config.Config
    assert simxent.embed is search.embed and simxent.embed_folder is search.embed_folder
    assert simxent.search_files is search.search_files and simxent.read_store is search.read_store
    # From Python, everything after the checkpoint and the two folders has a default.
    params = list(inspect.signature(simxent.linear_eval).parameters.values())
    assert [p.name for p in params[:3]] == ["checkpoint", "train_dir", "test_dir"]
    assert all(p.default is not inspect.Parameter.empty for p in params[3:])


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes photos/ and runs/ where it runs
    namespace = {"__name__": "__main__"}
    exec(compile(readme_example(), f"{README}:Python", "exec"), namespace)
    assert namespace["summary"]["global_step"] == 2 * 64 // 16
    results = namespace["results"]["pretrained"]
    assert results["linear"]["top1"] == 1.0  # dark against light noise: any encoder tells them apart
    out = capsys.readouterr().out
    assert "NT-Xent of the trained encoder's features" in out
    first = namespace["files"][0]  # an image of the embedded folder is its own nearest neighbour
    assert namespace["found"][0]["neighbours"][0]["name"] == first.relative_to("photos/train").as_posix()
    assert namespace["found"][0]["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    folder_run = load_checkpoint(tmp_path / "runs/example/checkpoints/last.pt")
    dataset_run = load_checkpoint(tmp_path / "runs/from-dataset/checkpoints/last.pt")
    assert dataset_run["position"] == folder_run["position"]
    # The Dataset holds the folder's images in its order: the same run, to the same weights.
    for key, value in folder_run["encoder"].items():
        torch.testing.assert_close(dataset_run["encoder"][key], value, rtol=0, atol=1e-6)


def test_fields_set_in_python_are_checked_before_any_work(tmp_path):
    """Each mistake is one ConfigError naming its key, before data.train (missing here) is looked at;
    values of the right meaning are converted as a YAML file's are."""
    mistakes = [("train", "epochs", "two", "train.epochs: expected an integer"),
                ("loss", "temperature", -1.0, "loss.temperature: -1.0 is out of range"),
                ("train", "batch_size", 16.5, "train.batch_size: expected an integer"),
                ("augment", "crop_scale", 0.5, "augment.crop_scale: expected a list of 2 numbers"),
                ("train", "precision", "bf32", "train.precision: 'bf32' is not one of"),
                ("optim", "name", "Adam", "optim.name: 'Adam' is not one of"),
                ("train", "epoch", 1, "unknown key 'train.epoch' \\(set in Python\\); did you mean 'train.epochs'")]
    for section, name, value, message in mistakes:
        cfg = simxent.load_config("cpu", [f"data.train={tmp_path / 'missing'}", f"out={tmp_path / 'run'}"])
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=message):
            simxent.pretrain(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    cfg = simxent.Config()
    cfg.loss.temperature, cfg.train.batch_size, cfg.augment.crop_scale = "0.1", 16.0, [0.2, 1]
    cfg.out, cfg.train.epochs, cfg.optim.lr = tmp_path / "run", np.int64(3), np.float32(0.5)
    assert check_config(cfg) is cfg and (cfg.loss.temperature, cfg.train.batch_size) == (0.1, 16)
    assert cfg.augment.crop_scale == (0.2, 1.0) and cfg.out == str(tmp_path / "run")
    assert (type(cfg.train.epochs), type(cfg.optim.lr), cfg.train.epochs, cfg.optim.lr) == (int, float, 3, 0.5)


def test_a_leading_tilde_is_the_home_folder_in_every_path_key(tmp_path, monkeypatch, capsys):
    """The shell expands ~ after out= but not after data.train=, so data.train=~/photos reached simxent as
    written and was "not found"; a run now expands it in every path key, and config.yaml records the result."""
    monkeypatch.setenv("HOME", str(tmp_path))
    make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=2, size=16)
    assert cli.pretrain_main([*TINY_RUN, "data.train=~/shapes/train", "data.val=~/shapes/test", "out=~/run",
                              "data.cache_dir=~/cache", "train.epochs=1", "--no-progress"]) == 0
    saved = simxent.load_config(tmp_path / "run" / "config.yaml")
    assert (saved.data.train, saved.data.val, saved.out) == (f"{tmp_path}/shapes/train", f"{tmp_path}/shapes/test",
                                                             f"{tmp_path}/run")
    assert any((tmp_path / "cache").iterdir())
    cfg = simxent.Config()
    cfg.model.weights, cfg.train.resume, cfg.data.train = "~/w.pt", "~/run/checkpoints/last.pt", "a~b"
    check_config(cfg)
    assert (cfg.model.weights, cfg.train.resume, cfg.data.train) == (f"{tmp_path}/w.pt",
                                                                     f"{tmp_path}/run/checkpoints/last.pt", "a~b")
