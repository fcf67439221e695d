"""What linear evaluation reads before it scores: label files, class weights, probe options, device and
precision, and where it writes. Each mistake stops with one line naming the file, line or option."""
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from simxent import cli
from simxent.class_weights import ClassWeightError, class_weights
from simxent.cli import linear_eval_main, pretrain_main
from simxent.config import ConfigError, load_config
from simxent.data import ImageArray
from simxent.demo import make_shapes
from simxent.evaluate import ProbeDivergedError, train_linear_probe
from simxent.label_files import check_label_sets, read_label_csv
from simxent.linear_eval import ProbeOptions, check_probe_options, default_out, feature_dtype
from simxent.runtime import SlowStepWatch, resolve_device, resolve_dtype
from simxent.train import pretrain
from tests.conftest import TINY_RUN

linear_eval_module = importlib.import_module("simxent.linear_eval")  # simxent.linear_eval is the function


def fake_folder(root: Path, names: list[str], skipped=()) -> ImageArray:
    """An ImageArray whose files are ``root/name``: label parsing reads only the file names."""
    files = [str(root / n) for n in names]
    return ImageArray(torch.zeros(len(files), 2, 2, 3, dtype=torch.uint8), torch.full((len(files),), -1), [],
                      files, [str(root / n) for n in skipped])


# ---- multi-label CSV files


def test_label_csv_quoting_header_and_empty_rows(tmp_path, caplog):
    root = tmp_path / "imgs"
    data = fake_folder(root, ["a,b.png", "sub/c.png", "d.png"])
    f = tmp_path / "labels.csv"
    f.write_text('file,labels\n"a,b.png",cat;dog\n./sub/c.png, dog\n\n# a comment\nd.png,\n')
    with caplog.at_level(logging.INFO, logger="simxent"):
        y, names = read_label_csv(f, data, root)
    assert names == ["cat", "dog"]  # the header's "labels" is no label
    assert y.tolist() == [[1, 1], [0, 1], [0, 0]]
    assert "labels.csv:1: first row (file,labels) taken as a header" in caplog.text
    # A test file is read against the training names; a header there is recognised the same way.
    y, _ = read_label_csv(f, data, root, ["cat", "dog", "eel"])
    assert y.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    # Without a header the first row is a row.
    f.write_text('\ufeff"a,b.png",cat\nsub/c.png,dog\nd.png,cat\n', encoding="utf-8")  # with a byte-order mark
    assert read_label_csv(f, data, root)[0].tolist() == [[1, 0], [0, 1], [1, 0]]
    # An absolute path to an image of the folder names that image, also when the image is a link elsewhere.
    f.write_text(f'"a,b.png",cat\n{root / "sub" / "c.png"},dog\nd.png,cat\n')
    assert read_label_csv(f, data, root)[0].tolist() == [[1, 0], [0, 1], [1, 0]]
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "c.png").symlink_to(tmp_path / "elsewhere.png")
    assert read_label_csv(f, data, root)[0].tolist() == [[1, 0], [0, 1], [1, 0]]


@pytest.mark.parametrize("text, match", [
    ("a.png,cat\nb.png,dog\na.png,dog\n", r"a.png is labelled on lines 1 and 3"),
    ("a.png,cat\nb.png,dog\nzz.png,dog\n", r"labels.csv:3: zz.png is not an image of"),
    ("zz.png,cat\na.png,cat\nb.png,dog\n", r"labels.csv:1: zz.png is not an image of"),  # a stale row, no header
    ("a.png,cat\nb,x.png,dog\n", r"labels.csv:2: expected 'file,label;label;...' .*quote.*3 field"),
    ("a.png,cat\nb.png\n", r"labels.csv:2: expected .*1 field"),
    ("a.png,cat\n", r"no labels for 1 image\(s\) .* b.png"),
])
def test_label_csv_mistakes_name_the_line(tmp_path, text, match):
    root = tmp_path / "imgs"
    f = tmp_path / "labels.csv"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_label_csv(f, fake_folder(root, ["a.png", "b.png"]), root)


def test_label_csv_unknown_test_label_and_unreadable_images(tmp_path):
    root = tmp_path / "imgs"
    f = tmp_path / "test.csv"
    f.write_text("a.png,cat\nb.png,eel\n")
    with pytest.raises(ConfigError, match=r"test.csv:2: b.png has label\(s\) \['eel'\] that the training labels lack"):
        read_label_csv(f, fake_folder(root, ["a.png", "b.png"]), root, ["cat"])
    # A row for an image skipped as unreadable is no mistake; its labels do not count.
    y, names = read_label_csv(f, fake_folder(root, ["a.png"], skipped=["b.png"]), root)
    assert names == ["cat"] and y.tolist() == [[1]]


def test_label_csv_of_an_image_list_names_files_as_the_list_does(tmp_path):
    """A list source's root is its text file: rows name images relative to the list's folder, or absolute."""
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "train.txt"
    elsewhere = tmp_path / "other" / "c.png"
    listing.write_text(f"a.png\n./sub/b.png\n../up.png\n{elsewhere}\n")
    data = fake_folder(lists, ["a.png", "sub/b.png", "../up.png"])
    data.files.append(str(elsewhere))
    f = tmp_path / "labels.csv"
    f.write_text(f"a.png,cat\nsub/b.png,dog\n../up.png,cat;dog\n{elsewhere},\n")
    y, names = read_label_csv(f, data, listing)
    assert names == ["cat", "dog"] and y.tolist() == [[1, 0], [0, 1], [1, 1], [0, 0]]
    f.write_text(f"{lists / 'a.png'},cat\n{lists / 'sub' / 'b.png'},dog\n../up.png,cat;dog\n{elsewhere},\n")
    assert read_label_csv(f, data, listing)[0].tolist() == y.tolist()  # absolute paths below the list's folder
    f.write_text("a.png,cat\nsub/b.png,dog\n../up.png,cat\nc.png,dog\n")
    with pytest.raises(ConfigError, match=r"labels.csv:4: c.png is not an image of .*train.txt"):
        read_label_csv(f, data, listing)


def test_label_csv_of_a_list_given_by_a_relative_path_with_absolute_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    listing, a, b = Path("lists/train.txt"), tmp_path / "lists" / "a.png", tmp_path / "lists" / "b.png"
    listing.write_text(f"{a}\n{b}\n")
    data = fake_folder(Path("lists"), [str(a), str(b)])
    f = tmp_path / "labels.csv"
    for rows in (f"{a},cat\n{b},dog\n", "a.png,cat\nb.png,dog\n"):  # as the list writes them, or relative
        f.write_text(rows)
        assert read_label_csv(f, data, listing)[0].tolist() == [[1, 0], [0, 1]]


def test_label_csv_that_is_not_text_or_csv_is_one_line(tmp_path):
    root = tmp_path / "imgs"
    data = fake_folder(root, ["a.png"])
    f = tmp_path / "labels.csv"
    f.write_bytes(b"a.png,caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=r"labels.csv: not a UTF-8 label file \(byte 9"):
        read_label_csv(f, data, root)
    f.write_text("a.png," + "x" * 200_000 + "\n")
    with pytest.raises(ConfigError, match=r"labels.csv: not a readable CSV label file \(field larger"):
        read_label_csv(f, data, root)


def test_label_sets_with_undefined_metrics(tmp_path, caplog):
    names = ["cat", "dog"]
    with pytest.raises(ConfigError, match="train.csv: no image has a label"):
        check_label_sets(torch.zeros(3, 0, dtype=torch.long), [], "train.csv", "test.csv")
    with pytest.raises(ConfigError, match="test.csv: no test image has any label .* mAP and micro F1 are undefined"):
        check_label_sets(torch.zeros(3, 2, dtype=torch.long), names, "train.csv", "test.csv")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        assert check_label_sets(torch.tensor([[1, 0], [1, 0]]), names, "train.csv", "test.csv") == ["dog"]
    assert "dog have no positive test image: their average precision is undefined" in caplog.text
    assert check_label_sets(torch.tensor([[1, 0], [0, 1]]), names, "train.csv", "test.csv") == []


# ---- class weights and the probe's numbers


@pytest.mark.parametrize("text, match", [
    ("cat 1e39\ndog 1\n", r"w.txt: class weights must be finite and > 0, got cat=1e\+39 \(inf in float32\)"),
    ("cat 1\ndog 1e-50\n", r"w.txt: class weights must be finite and > 0, got dog=1e-50 \(0 in float32\)"),
    ("cat -2\ndog 1\n", r"w.txt: class weights must be finite and > 0, got cat=-2 "),
    ("cat 3e38\ndog 3e38\n", r"w.txt: class weights times class counts sum to inf in float32"),
    ("cat 1\ndog 2\n# again\ncat 3\n", r"class cat is on lines 1 and 4"),
])
def test_weight_files_checked_in_float32_and_once_per_class_naming_the_file(tmp_path, text, match):
    f = tmp_path / "w.txt"
    f.write_text(text)
    with pytest.raises(ClassWeightError, match=match):
        class_weights(str(f), torch.tensor([0, 1]), ["cat", "dog"])


@pytest.mark.parametrize("field, value, option", [
    ("lr", float("inf"), "--lr"), ("lr", 1e30, "--lr"), ("lr", float("nan"), "--lr"), ("lr", 0.0, "--lr"),
    ("weight_decay", float("inf"), "--weight-decay"), ("weight_decay", float("nan"), "--weight-decay"),
    ("weight_decay", -1.0, "--weight-decay"), ("weight_decay", 100.0, "--weight-decay"),  # lr * wd >= 1
    ("label_smoothing", float("nan"), "--label-smoothing"), ("label_smoothing", 1.0, "--label-smoothing"),
    ("epochs", 0, "--epochs"), ("beta", float("inf"), "--beta"), ("knn_temperature", float("inf"), "--knn-temperature"),
    ("batch_size", 0, "--probe-batch-size"), ("knn_k", 0, "--knn-k"),
    # From Python: a float epoch count failed once features were extracted, a string in a comparison
    ("epochs", 2.5, "--epochs"), ("knn_k", "5", "--knn-k"), ("lr", "0.1", "--lr"), ("seed", None, "--seed"),
])
def test_probe_options_are_checked_naming_the_option(field, value, option):
    check_probe_options(ProbeOptions())
    check_probe_options(ProbeOptions(knn_k=np.int64(20), lr=np.float32(0.01)))  # numpy's scalars are numbers
    check_probe_options(ProbeOptions(lr=1.0, weight_decay=0.5, label_smoothing=0.1))
    with pytest.raises(ConfigError, match=f"^{option} must be"):
        check_probe_options(ProbeOptions(**{field: value}), flags=True)
    with pytest.raises(ConfigError, match=rf"^ProbeOptions\.{field} must be"):  # from Python: the field's name
        check_probe_options(ProbeOptions(**{field: value}))


def test_diverging_probe_stops_with_a_message():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    with pytest.raises(ProbeDivergedError, match=r"diverged at epoch 1 .*lower --lr \(now 1e\+30\)"):
        train_linear_probe(x, y, 3, epochs=3, lr=1e30, batch_size=16, progress=False)
    with pytest.raises(ProbeDivergedError, match="diverged"):
        train_linear_probe(x, (y == 0).long().unsqueeze(1), 1, epochs=3, lr=float("inf"), progress=False,
                           objective="binary")
    train_linear_probe(x, y, 3, epochs=3, lr=1.0, batch_size=16, progress=False)  # high but stable


# ---- device and precision


def test_cuda_without_a_gpu_names_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train.device=cuda but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^--device=cuda but no CUDA device"):
        resolve_device("cuda", option="--device")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^--device: 'gpu' is not a device \(auto, cpu, cuda or cuda:N\)"):
        resolve_device("gpu", option="--device")  # was torch's RuntimeError listing every device type


def test_precision_on_a_cpu(monkeypatch, caplog):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="train.precision=fp16 on a CPU: .*65x slower"):
        resolve_dtype("fp16", cpu)
    monkeypatch.setattr("simxent.runtime.cpu_supports_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="simxent"):
        assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert "train.precision=bf16 on a CPU without native bf16" in caplog.text
    # Linear evaluation cannot change the checkpoint's precision: on a CPU it falls back to auto.
    monkeypatch.setattr(linear_eval_module, "cpu_supports_bf16", lambda: False)
    assert feature_dtype("fp16", cpu) is None and feature_dtype("bf16", cpu) is None
    assert feature_dtype("fp32", cpu) is None


def test_a_slow_training_step_is_reported(shapes_run_args, monkeypatch, caplog):
    monkeypatch.setattr(SlowStepWatch, "limit", 0.0)  # every step counts as slow: the warning comes once
    with caplog.at_level(logging.WARNING, logger="simxent"):
        pretrain(load_config(None, shapes_run_args), progress=False)
    assert caplog.text.count("a training step took") == 1
    assert "train.max_time, SIGTERM and Ctrl-C are only seen between steps" in caplog.text


# ---- through the commands


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step pretraining run on 20 shape images, and the shapes."""
    root = tmp_path_factory.mktemp("inputs")
    shapes = make_shapes(root / "shapes", train_per_class=4, test_per_class=2, size=16)
    cfg = load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=1", "eval.every=0",
                             "data.cache=false", f"out={root / 'run'}"])
    pretrain(cfg, progress=False)
    return root / "run", shapes


@pytest.fixture
def shapes_run_args(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=1, size=16)
    return [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=2", "eval.every=0", f"out={tmp_path / 'run'}"]


def evaluate(ckpt, shapes, *more):
    return linear_eval_main(["--checkpoint", str(ckpt), "--train", str(shapes / "train"), "--test",
                             str(shapes / "test"), "--epochs", "2", "--knn-k", "3", "--workers", "0",
                             "--no-progress", *more])


def test_device_and_precision_errors_exit_2_naming_the_option(run, tmp_path, monkeypatch, capsys):
    run_dir, shapes = run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate(run_dir / "checkpoints" / "last.pt", shapes, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "--device=cuda but no CUDA device" in err and "train.device" not in err
    base = [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=1", f"out={tmp_path / 'r'}"]
    assert pretrain_main([*base, "train.device=cuda"]) == 2
    assert "train.device=cuda but no CUDA device" in capsys.readouterr().err
    assert pretrain_main([*base, "train.device=cpu", "train.precision=fp16"]) == 2
    assert "train.precision=fp16 on a CPU" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bad_options_and_outputs_stop_before_decoding(run, tmp_path, monkeypatch, capsys):
    run_dir, shapes = run

    def no_decoding(*a, **k):
        raise AssertionError("images decoded before the options were checked")
    monkeypatch.setattr(linear_eval_module, "load_configured", no_decoding)
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert evaluate(ckpt, shapes, "--lr", "inf") == 2
    assert "--lr must be a number in (0, 1], got inf" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--json", str(tmp_path)) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--objective", "multilabel", "--train-labels", str(tmp_path / "none.csv"),
                    "--test-labels", str(tmp_path / "none.csv")) == 2
    assert "--train-labels: label file not found" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--objective", "multilabel", "--train-labels", str(tmp_path),
                    "--test-labels", str(tmp_path)) == 2
    assert f"--train-labels: label file {tmp_path} is a folder, not a file" in capsys.readouterr().err
    # an option of another objective would be ignored and the folders' classes scored instead
    (tmp_path / "labels.csv").write_text("")
    assert evaluate(ckpt, shapes, "--train-labels", str(tmp_path / "labels.csv")) == 2
    assert "--train-labels applies to --objective multilabel; this run's is multiclass" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--positive-class", "circle", "--objective", "multiclass") == 2
    assert "--positive-class applies to --objective binary" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--objective", "binary", "--label-smoothing", "0.1") == 2  # would be ignored
    assert "--label-smoothing applies to --objective multiclass; this run's is binary" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--workers", "-1") == 2  # was the DataLoader's traceback
    assert "--workers: -1 is out of range (>= 0)" in capsys.readouterr().err
    (tmp_path / "taken").write_text("")
    assert evaluate(ckpt, shapes, "--out", str(tmp_path / "taken")) == 2
    assert f"--out: {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err


def test_class_weight_and_positive_class_mistakes_stop_before_decoding(run, tmp_path, monkeypatch, capsys):
    """A misspelt or unreadable weight file, one naming other classes, a weighting the objective does not take,
    a positive class that is no class folder: each refused from the folders' listings, before any decoding."""
    run_dir, shapes = run
    ckpt = run_dir / "checkpoints" / "last.pt"
    two = tmp_path / "two"  # circle and cross: a binary folder pair
    for split in ("train", "test"):
        for name in ("circle", "cross"):
            shutil.copytree(shapes / split / name, two / split / name)

    def no_decoding(*a, **k):
        raise AssertionError("images decoded before the options were checked")
    monkeypatch.setattr(linear_eval_module, "load_configured", no_decoding)
    assert evaluate(ckpt, shapes, "--class-weight", str(tmp_path / "weigths.txt")) == 2
    assert f"class-weight file not found: {tmp_path / 'weigths.txt'}" in capsys.readouterr().err
    (tmp_path / "w.txt").write_text("circle 1\ncross 1\nring 1\nsquare 1\ntrinagle 2\n")
    assert evaluate(ckpt, shapes, "--class-weight", str(tmp_path / "w.txt")) == 2
    assert "unknown: trinagle; missing: triangle" in capsys.readouterr().err
    (tmp_path / "ansi.txt").write_bytes("caf\u00e9 2\n".encode("cp1252"))
    assert evaluate(ckpt, shapes, "--class-weight", str(tmp_path / "ansi.txt")) == 2
    assert f"{tmp_path / 'ansi.txt'}: not a UTF-8 class-weight file (byte 3)" in capsys.readouterr().err
    assert evaluate(ckpt, two, "--objective", "binary", "--class-weight", "effective") == 2
    assert "binary and multi-label probes take none or balanced" in capsys.readouterr().err
    assert evaluate(ckpt, two, "--objective", "binary", "--positive-class", "crosss") == 2
    assert "--positive-class 'crosss' is not one of circle, cross" in capsys.readouterr().err
    assert evaluate(ckpt, shapes, "--objective", "binary") == 2
    assert "--objective binary needs exactly 2 class folders, found 5" in capsys.readouterr().err


def test_a_single_class_is_refused_not_scored_one(run, tmp_path, capsys):
    """With one class every prediction is right: the probe and kNN would report 1.0, which means nothing."""
    run_dir, shapes = run
    one = tmp_path / "one"
    for split in ("train", "test"):
        first = sorted((shapes / split).iterdir())[0]
        shutil.copytree(first, one / split / first.name)
    assert linear_eval_main(["--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--train", str(one / "train"),
                             "--test", str(one / "test"), "--workers", "0", "--no-progress"]) == 2
    assert "has one class folder" in capsys.readouterr().err


def test_diverging_probe_exits_2(run, monkeypatch, capsys):
    run_dir, shapes = run
    for module in (cli, linear_eval_module):  # let an lr through that the checks refuse
        monkeypatch.setattr(module, "check_probe_options", lambda opts, flags=False: None)
    assert evaluate(run_dir / "checkpoints" / "last.pt", shapes, "--lr", "1e30") == 2
    assert "simxent: error: linear probe diverged at epoch" in capsys.readouterr().err


def test_outputs_go_beside_a_loose_checkpoint(run, tmp_path, monkeypatch):
    run_dir, shapes = run
    here = tmp_path / "here"
    (here / "checkpoints").mkdir(parents=True)  # a folder named checkpoints, but no run around it
    shutil.copy(run_dir / "checkpoints" / "last.pt", here / "model.pt")
    monkeypatch.chdir(here)
    assert evaluate("model.pt", shapes) == 0
    assert (here / "linear_eval" / "figures").is_dir() and any((here / "linear_eval" / "tb").iterdir())
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("here", "cache")]  # nothing in the parent
    assert default_out(run_dir / "checkpoints" / "last.pt") == run_dir / "linear_eval"
    assert default_out(run_dir / "checkpoints" / "step-000004.pt") == run_dir / "linear_eval" / "step-000004"
    assert default_out(here / "model.pt") == here / "linear_eval"
    assert default_out(here / "checkpoints" / "x.pt") == here / "checkpoints" / "linear_eval"


def test_each_checkpoint_and_each_evaluation_has_its_own_outputs(run, tmp_path):
    """Without --out, a run's step file is scored into its own folder (its figures do not replace last.pt's),
    and two evaluations into one folder are two TensorBoard runs, not one curve through both."""
    run_dir, shapes = run
    out = tmp_path / "ev"
    step_file = sorted((run_dir / "checkpoints").glob("step-*.pt"))[0]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("linear_eval"))
    for checkpoint in (copy / "checkpoints" / "last.pt", copy / "checkpoints" / step_file.name):
        assert evaluate(checkpoint, shapes) == 0
    assert (copy / "linear_eval" / "figures").is_dir()
    assert (copy / "linear_eval" / step_file.stem / "figures").is_dir()
    for _ in range(2):
        assert evaluate(copy / "checkpoints" / "last.pt", shapes, "--out", str(out)) == 0
    runs = sorted((out / "tb").iterdir())
    assert len(runs) == 2 and all(len(list(r.glob("events.out.tfevents.*"))) == 1 for r in runs)


def test_multilabel_csv_with_header_and_a_label_without_test_positives(run, tmp_path, capsys):
    run_dir, shapes = run

    def write_csv(split, labels_of):
        rows = ["file,labels"] + [f'"{f.relative_to(shapes / split).as_posix()}",{";".join(labels_of(f.parent.name))}'
                                  for f in sorted((shapes / split).rglob("*.png"))]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    write_csv("train", lambda shape: ["round"] if shape in ("circle", "ring") else ["straight"])
    write_csv("test", lambda shape: ["straight"] if shape not in ("circle", "ring") else [])
    report = tmp_path / "r.json"
    assert evaluate(run_dir / "checkpoints" / "last.pt", shapes, "--objective", "multilabel", "--train-labels",
                    str(tmp_path / "train.csv"), "--test-labels", str(tmp_path / "test.csv"), "--json",
                    str(report)) == 0
    assert "round have no positive test image" in capsys.readouterr().err
    strict = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    linear = strict["pretrained"]["linear"]
    assert linear["ap_undefined"] == ["round"] and linear["per_label_ap"]["round"] is None
    assert linear["mAP"] == linear["per_label_ap"]["straight"]
    assert (Path(strict["figures"]) / "pretrained_per_label_ap.png").is_file()
    write_csv("test", lambda shape: [])
    assert evaluate(run_dir / "checkpoints" / "last.pt", shapes, "--objective", "multilabel", "--train-labels",
                    str(tmp_path / "train.csv"), "--test-labels", str(tmp_path / "test.csv")) == 2
    assert "no test image has any label" in capsys.readouterr().err


def test_multilabel_on_image_lists(run, tmp_path):
    """--train and --test may be image lists; the label files name the images as the lists do."""
    run_dir, shapes = run
    for split in ("train", "test"):
        files = sorted((shapes / split).rglob("*.png"))
        (tmp_path / f"{split}.txt").write_text("".join(f"{os.path.relpath(f, tmp_path)}\n" for f in files))
        (tmp_path / f"{split}.csv").write_text("".join(
            f"{os.path.relpath(f, tmp_path)},{'round' if f.parent.name in ('circle', 'ring') else 'straight'}\n"
            for f in files))
    report = tmp_path / "r.json"
    assert linear_eval_main(["--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--train",
                             str(tmp_path / "train.txt"), "--test", str(tmp_path / "test.txt"), "--epochs", "2",
                             "--knn-k", "3", "--workers", "0", "--no-progress", "--objective", "multilabel",
                             "--train-labels", str(tmp_path / "train.csv"), "--test-labels",
                             str(tmp_path / "test.csv"), "--json", str(report)]) == 0
    linear = json.loads(report.read_text())["pretrained"]["linear"]
    assert set(linear["per_label_ap"]) == {"round", "straight"} and 0 <= linear["mAP"] <= 1


def test_a_knn_k_above_the_training_images_is_said(run, tmp_path, caplog):
    """20 training images and --knn-k 200: a warning says kNN votes with all of them (none with --knn-k 3)."""
    run_dir, shapes = run
    ckpt = run_dir / "checkpoints" / "last.pt"
    with caplog.at_level(logging.WARNING, logger="simxent"):
        assert evaluate(ckpt, shapes, "--out", str(tmp_path / "a")) == 0
        assert "--knn-k" not in caplog.text
        assert evaluate(ckpt, shapes, "--knn-k", "200", "--out", str(tmp_path / "b")) == 0
    assert "kNN's k = 200 exceeds the 20 training images" in caplog.text


def test_a_folder_given_as_the_class_weight_file_is_named_as_one(tmp_path):
    with pytest.raises(ClassWeightError, match=f"class-weight file {tmp_path} is a folder, not a file"):
        class_weights(str(tmp_path), torch.tensor([0, 1]), ["cat", "dog"])
    with pytest.raises(ClassWeightError, match=f"class-weight file not found: {tmp_path / 'w.txt'}"):
        class_weights(str(tmp_path / "w.txt"), torch.tensor([0, 1]), ["cat", "dog"])


def test_an_unreadable_class_weight_file_is_one_line_naming_it(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root) was an OSError the CLI printed as a traceback."""
    weights = tmp_path / "w.txt"
    weights.write_text("cat 1\ndog 2\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ClassWeightError, match=f"cannot read the class-weight file {weights}: Permission denied"):
        class_weights(str(weights), torch.tensor([0, 1]), ["cat", "dog"])


def test_a_test_folder_without_class_folders_is_refused_before_any_decoding(run, tmp_path, monkeypatch, capsys):
    """--test given one class's folder (its images directly inside): refused from the file listing, before
    the train folder's images, or the test folder's, are decoded."""
    run_dir, shapes = run

    def no_decoding(*a, **k):
        raise AssertionError("images decoded before the class folders were checked")

    monkeypatch.setattr(linear_eval_module, "load_configured", no_decoding)
    assert linear_eval_main(["--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--train",
                             str(shapes / "train"), "--test", str(shapes / "test" / "circle"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "linear evaluation needs one sub-folder per class" in err and "image list" not in err
    listed = tmp_path / "test.txt"  # a list of the test images: files, no classes
    listed.write_text("".join(f"{f}\n" for f in sorted((shapes / "test").rglob("*.png"))))
    assert linear_eval_main(["--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--train",
                             str(shapes / "train"), "--test", str(listed), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{listed}: an image list carries no classes: linear evaluation needs one sub-folder" in err


def test_a_failing_baseline_keeps_the_pretrained_figures_in_the_json(run, tmp_path, monkeypatch):
    """--random-init scores the untrained twin after the pretrained encoder: when that second pass fails
    (memory, Ctrl-C, a diverged probe), the pretrained figures are already in --json."""
    run_dir, shapes = run
    score = linear_eval_module.score_encoder

    def failing_baseline(name, *args, **kwargs):
        if name == "random_init":
            raise MemoryError("out of memory while extracting the baseline's features")
        return score(name, *args, **kwargs)
    monkeypatch.setattr(linear_eval_module, "score_encoder", failing_baseline)
    report = tmp_path / "r.json"
    with pytest.raises(MemoryError):
        evaluate(run_dir / "checkpoints" / "last.pt", shapes, "--random-init", "--json", str(report),
                 "--out", str(tmp_path / "eval"))
    saved = json.loads(report.read_text())
    assert 0 <= saved["pretrained"]["linear"]["top1"] <= 1 and "random_init" not in saved


def test_the_json_names_its_inputs_and_figures_by_absolute_path(run, tmp_path, monkeypatch):
    """Relative paths on the command line are written absolute, as meta.json does: the JSON is read from
    elsewhere than where it was run."""
    run_dir, shapes = run
    monkeypatch.chdir(shapes.parent)
    args = ["--checkpoint", "run/checkpoints/last.pt", "--train", "shapes/train", "--test", "shapes/test", "--epochs",
            "1", "--knn-k", "3", "--workers", "0", "--no-progress", "--out", os.path.relpath(tmp_path / "ev"),
            "--json", str(tmp_path / "ev.json")]
    assert linear_eval_main(args) == 0
    got = json.loads((tmp_path / "ev.json").read_text())
    assert got["checkpoint"] == str((run_dir / "checkpoints" / "last.pt").resolve())
    assert (got["train"], got["test"]) == (str((shapes / "train").resolve()), str((shapes / "test").resolve()))
    assert Path(got["figures"]).is_absolute() and Path(got["figures"]).parent == (tmp_path / "ev" / "figures").resolve()
