"""What a pretraining run tells its user: log lines beside progress bars, plain lines off a terminal, the
warnings of small folders, the console summary, and TensorBoard's config, hparams and confusion matrix."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tqdm import tqdm

import simxent.train
from simxent import figures
from simxent.cli import pretrain_main
from simxent.config import ConfigError, load_config
from simxent.demo import make_shapes
from simxent.monitor import Monitor
from simxent.runtime import setup_logging
from simxent.train import load_data
from tests.conftest import TINY_RUN, write_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=6, size=16)


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_a_log_line_clears_the_bar_instead_of_joining_it(monkeypatch, tmp_path):
    """With a bar drawn on stderr, a log message starts on a line of its own (the bar is cleared first)."""
    class FakeTerminal(list):
        def write(self, s):
            self.append(s)

        def flush(self):
            pass

        def isatty(self):
            return True

    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    setup_logging(tmp_path / "train.log")
    bar = tqdm(total=10, desc="epoch 1/1", file=sys.stderr, mininterval=0)
    bar.update(3)
    logging.getLogger("simxent").info("train.max_time reached")
    bar.close()
    text = "".join(err)
    before = text[: text.index("INFO train.max_time reached")]
    # What precedes the message on its line, after the last carriage return or newline: its timestamp only.
    assert re.fullmatch(r"\d\d:\d\d:\d\d ", re.split(r"[\r\n]", before)[-1])
    assert "3/10" in before  # the bar was drawn before the message came


def test_stderr_to_a_file_gets_plain_lines_and_no_bars(shapes, tmp_path):
    """Redirected stderr (a log file) holds no carriage-return bar fragments, and a line of progress per
    logged step at most every 30 s: here the first logged step and the last."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    args = [*TINY_RUN, f"data.train={shapes / 'train'}", f"data.val={shapes / 'test'}", "train.epochs=2",
            "train.log_every=2", "eval.knn_k=5", f"out={run}"]
    with open(err, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "simxent", "pretrain", *args], stderr=f, stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    text = err.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "it/s" not in text and "step/s" not in text
    lines = re.findall(r"INFO epoch (\d)/2 step (\d)/5 \(global step (\d+)\): loss [\d.]+, \d+ images/s", text)
    assert [(int(e), int(s), int(g)) for e, s, g in lines] == [(1, 2, 2), (2, 5, 10)]
    assert "kNN top-1" in text


def test_plain_lines_come_every_logged_step_once_the_interval_passes(shapes, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(simxent.train.PlainProgress, "every_s", 0.0)
    cfg = load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=1", "train.log_every=2",
                             "eval.every=0", f"out={tmp_path / 'run'}"])
    with caplog.at_level(logging.INFO, logger="simxent"):
        simxent.train.pretrain(cfg, progress=True)  # pytest's stderr is no terminal: plain lines, no bars
    steps = re.findall(r"epoch 1/1 step (\d)/5", caplog.text)
    assert steps == ["2", "4", "5"]  # every train.log_every steps, and the last


def test_short_run_small_folder_summary_and_tensorboard(shapes, tmp_path, capsys, caplog):
    """80 images at batch 32: two steps per epoch leave 16 images (20 %) out, which is said; log_every=100
    is longer than the run, yet the final step is logged; the console gets a few lines, not the JSON; the
    event files hold the config text and the run's hparams with its final loss and kNN."""
    run = tmp_path / "run"
    args = [*TINY_RUN, f"data.train={shapes / 'train'}", f"data.val={shapes / 'test'}", "train.epochs=2",
            "train.batch_size=32", "train.log_every=100", "eval.knn_k=5", f"out={run}", "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="simxent"):
        assert pretrain_main(args) == 0
    assert "train.batch_size=32" in caplog.text and "leaves out a random 16 (20%)" in caplog.text
    summary = json.loads((run / "summary.json").read_text())
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) <= 6 and not any(line.startswith(("{", "}")) for line in out)
    assert out[0] == f"checkpoint: {run / 'checkpoints' / 'last.pt'}"
    assert f"final loss: {summary['last_loss']:.4f}" in out
    assert f"kNN top-1: {summary['knn_top1'][-1]['top1']:.4f} (epoch 2)" in out
    # Stopped inside its second epoch, as the log says it: "epoch 2 step 1", not the epochs done.
    assert pretrain_main([*args[:-2], f"out={tmp_path / 'cut'}", "train.max_time=0.001", "--no-progress"]) == 0
    knn = json.loads((tmp_path / "cut" / "summary.json").read_text())["knn_top1"][-1]
    assert (knn["epoch"], knn["epoch_step"]) == (0, 1)
    assert f"kNN top-1: {knn['top1']:.4f} (epoch 1 step 1)" in capsys.readouterr().out
    assert any(str(run / "summary.json") in line for line in out)

    acc = events(run)
    assert [e.step for e in acc.Scalars("train/loss")] == [4]  # the final step, though log_every=100
    assert acc.Scalars("final/loss")[0].value == pytest.approx(summary["last_loss"])
    assert acc.Scalars("final/knn_top1")[0].value == pytest.approx(summary["knn_top1"][-1]["top1"])
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "batch_size: 32" in config and f'train: "{shapes / "train"}"' in config
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.batch_size"].number_value == 32
    assert start.hparams["model.backbone"].string_value == "convnet"
    assert start.hparams["augment.crop_scale"].string_value == "[0.08, 1.0]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"final/loss", "final/knn_top1"}


def test_val_classes_that_differ_are_listed(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    for root, names in ((train, ("cat", "dog", "owl")), (val, ("cat", "dog", "emu"))):
        for c in names:
            for i in range(2):
                write_image(root / c / f"{i}.png", seed=i)
    cfg = load_config(None, [*TINY_RUN, f"data.train={train}", f"data.val={val}", "train.batch_size=2"])
    with pytest.raises(ConfigError, match=re.escape("only in data.train: ['owl']; only in data.val: ['emu']")):
        load_data(cfg, progress=False)


def test_train_sub_folders_sharing_no_name_with_the_val_classes_are_not_classes(tmp_path, caplog):
    """An unlabelled training folder kept in parts (part1/, part2/) beside a labelled data.val: kNN is
    leave-one-out within data.val, said in a warning, not refused as "classes that differ"."""
    train, val = tmp_path / "train", tmp_path / "val"
    for root, names in ((train, ("part1", "part2")), (val, ("cat", "dog"))):
        for c in names:
            for i in range(2):
                write_image(root / c / f"{i}.png", seed=i)
    cfg = load_config(None, [*TINY_RUN, f"data.train={train}", f"data.val={val}", "train.batch_size=2"])
    with caplog.at_level(logging.WARNING, logger="simxent"):
        _, loaded_val, bank = load_data(cfg, progress=False)
    assert bank is None and len(loaded_val) == 4
    assert "share no name with the classes of data.val" in caplog.text


@pytest.mark.parametrize("n, columns", [(16, 8), (6, 4), (3, 8), (2, 2)])
def test_view_pairs_are_tiled_as_torchvisions_make_grid_tiles_them(n, columns):
    from torchvision.utils import make_grid

    from simxent.monitor import tile
    images = torch.rand(n, 3, 5, 7)
    assert torch.equal(tile(images, columns), make_grid(images, nrow=columns, padding=1))


def test_confusion_matrix_image_has_class_names_on_both_axes(tmp_path, monkeypatch):
    drawn = []
    monitor = Monitor(tmp_path / "tb")
    original = figures.render

    def spy(figure):
        ax = figure.axes[0]
        drawn.append(([t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()],
                      ax.get_xlabel(), ax.get_ylabel()))
        return original(figure)

    monkeypatch.setattr(figures, "render", spy)
    classes = ["cat", "dog", "owl"]
    monitor.confusion("probe/confusion", torch.tensor([[5, 1, 0], [0, 6, 0], [2, 0, 4]]), classes)
    monitor.close()
    assert drawn == [(classes, classes, "predicted", "true")]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    image = acc.Images("probe/confusion")[0]
    assert image.width > 100 and image.height > 100


def test_a_projector_at_a_step_already_written_is_replaced_without_tensorboards_warning(tmp_path, capsys):
    """A run resumed from an older checkpoint can end at a step its superseded branch ended at: the projector
    folder of that step is replaced (TensorBoard would print a warning on stdout and write into it)."""
    import csv

    monitor = Monitor(tmp_path / "tb")
    for names in (["a", "b"], ["c", "d"]):
        monitor.embedding(torch.rand(2, 4), names, torch.rand(2, 3, 8, 8), step=120)
    monitor.close()
    assert "Embedding dir exists" not in capsys.readouterr().out
    (metadata,) = (tmp_path / "tb").rglob("00120/val/metadata.tsv")
    assert [row[0] for row in csv.reader(metadata.open(), delimiter="\t")] == ["c", "d"]



def test_a_resumed_runs_projector_still_lists_the_earlier_sessions_embeddings(tmp_path):
    """add_embedding lists only its own session's embeddings: a resumed run's earlier ones, still on disk, stay
    listed, each once, also when the new session replaces one at the same step."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    def session(*steps):
        monitor = Monitor(tmp_path / "tb")
        for step in steps:
            monitor.embedding(torch.rand(2, 4), ["a", "b"], torch.rand(2, 3, 8, 8), step=step)
        monitor.close()
    session(5)
    session(10)
    session(10, 15)
    config = text_format.Parse((tmp_path / "tb" / "projector_config.pbtxt").read_text(), ProjectorConfig())
    listed = [e.tensor_path for e in config.embeddings]
    assert sorted(listed) == ["00005/val/tensors.tsv", "00010/val/tensors.tsv", "00015/val/tensors.tsv"]
