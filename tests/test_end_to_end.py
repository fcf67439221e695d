"""Pretrain on a small generated folder, then evaluate: what a user runs, through the real commands."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simxent.augment import ViewAugment
from simxent.checkpoint import encoder_digest, load_checkpoint, load_encoder
from simxent.cli import linear_eval_main, pretrain_main
from simxent.config import load_config
from simxent.demo import make_shapes
from simxent.models import SimCLR
from simxent.train import KnnBank, knn_monitor, load_data, pretrain
from tests.conftest import TINY_RUN, next_second, write_image

SCALARS = {"train/loss", "train/lr", "train/temperature", "train/pos_sim", "train/neg_sim", "train/top1",
           "train/alignment", "train/uniformity", "train/images_per_s", "val/knn_top1"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=6, size=16)


def tiny(shapes, out, *more):
    return [*TINY_RUN, f"data.train={shapes / 'train'}", f"data.val={shapes / 'test'}", "train.epochs=2",
            "train.log_every=1", "optim.warmup_epochs=1", "eval.knn_k=5", f"out={out}", *more]


def scalars(run: Path) -> dict:
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_pretrain_then_linear_eval(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny(shapes, run)
    assert pretrain_main([*args[:2], "--no-progress", *args[2:]]) == 0  # flags may sit among the overrides
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"encoder", "head", "optimizer", "position", "rng", "config", "scaler", "temperature"} <= set(state)
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    assert state["position"] == {"epoch": 2, "step": 0, "global_step": 10}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16
    logged = scalars(run)
    assert SCALARS <= set(logged)
    assert [s for s, _ in logged["train/loss"]] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in logged["train/loss"])
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "train/view_pairs" in acc.Tags()["images"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epoch"] == 2 and len(summary["knn_top1"]) == 2

    report = tmp_path / "eval.json"
    assert linear_eval_main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--train", str(shapes / "train"),
                             "--test", str(shapes / "test"), "--random-init", "--epochs", "5", "--knn-k", "5",
                             "--class-weight", "balanced", "--label-smoothing", "0.1", "--json", str(report),
                             "--no-progress"]) == 0
    results = json.loads(report.read_text())
    epoch_one = next(p for p in (run / "checkpoints").glob("*.pt") if load_checkpoint(p)["position"]["epoch"] == 1)
    assert results["encoder_digest"] == encoder_digest(load_encoder(run / "checkpoints" / "last.pt"))
    assert results["encoder_digest"] != encoder_digest(load_encoder(epoch_one))  # names the weights scored
    for name in ("pretrained", "random_init"):
        for scorer in ("linear", "knn"):
            r = results[name][scorer]
            # Every test image counted once, under its own class (6 per class); the scores read off the matrix.
            cm = torch.tensor(r["confusion"])
            assert cm.sum(1).tolist() == [6] * 5
            assert r["top1"] == pytest.approx(cm.trace().item() / 30)
            assert r["per_class"] == pytest.approx(dict(zip(results["classes"], (cm.diag() / 6).tolist())))
            assert r["top5"] is None  # five classes: the true one is always among the top five
        assert results[name]["knn"]["k"] == 5
        # The reported probe is the one whose last epoch the curves recorded.
        assert results[name]["probe_history"]["test_accuracy"][-1] == pytest.approx(results[name]["linear"]["top1"])
    assert results["class_weight"] == pytest.approx({c: 1.0 for c in results["classes"]})
    assert "pretrained" in capsys.readouterr().out
    (evaluation,) = (run / "linear_eval" / "tb").iterdir()  # this evaluation's TensorBoard run
    probe = EventAccumulator(str(evaluation), size_guidance={"images": 0})
    probe.Reload()
    assert {f"pretrained/probe/{k}" for k in ("train_ce", "test_ce", "train_objective", "test_accuracy")} <= set(
        probe.Tags()["scalars"])
    assert "pretrained/probe/confusion" in probe.Tags()["images"]
    for name in ("pretrained", "random_init"):  # the final scores too, as the JSON has them
        for scorer in ("linear", "knn"):
            (logged,) = probe.Scalars(f"{name}/{scorer}/top1")
            assert logged.value == pytest.approx(results[name][scorer]["top1"]) and logged.step == 5
    assert (probe.Scalars("pretrained/linear/balanced_accuracy")[0].value
            == pytest.approx(results["pretrained"]["linear"]["balanced_accuracy"]))
    assert {"pretrained/probe/reliability", "pretrained/probe/per_class", "pretrained/probe/probe_curves"} <= set(
        probe.Tags()["images"])
    linear = results["pretrained"]["linear"]
    assert 0 <= linear["calibration"]["ece"] <= 1 and sum(linear["calibration"]["count"]) == 30
    assert set(linear["per_class_loss"]) == set(results["classes"])
    history = results["pretrained"]["probe_history"]
    assert set(history) == {"epoch", "train_ce", "test_ce", "train_objective", "train_accuracy", "test_accuracy"}
    assert history["epoch"] == [1, 2, 3, 4, 5]  # epochs trained: the last is where the final scores are logged
    assert [e.step for e in probe.Scalars("pretrained/probe/test_accuracy")] == history["epoch"]
    # Label smoothing makes the objective a different number from the plain train CE, every epoch.
    assert all(abs(o - ce) > 1e-3 for o, ce in zip(history["train_objective"], history["train_ce"]))
    figures = Path(results["figures"])  # the evaluation's own folder, named as its TensorBoard run
    assert figures.parent == run / "linear_eval" / "figures" and (run / "linear_eval" / "tb" / figures.name).is_dir()
    for name in ("pretrained", "random_init"):
        for kind in ("probe_curves", "confusion", "reliability", "per_class", "knn_confusion"):
            png = figures / f"{name}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for kind in ("probe/probe_curves", "probe/confusion", "knn/confusion"):  # once each, the PNG file's pixels
        (image,) = probe.Images(f"pretrained/{kind}")
        png = figures / f"pretrained_{kind.replace('probe/', '').replace('/', '_')}.png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")),
                              np.asarray(Image.open(png).convert("RGB"))), kind

    # Classes that differ in colour are told apart by any encoder, pretrained for two epochs or not; images and
    # labels out of step, or test features taken from the wrong images, would score near chance (0.25).
    colours = colour_folder(tmp_path / "colours")
    report = tmp_path / "colours.json"
    assert linear_eval_main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--train", str(colours / "train"),
                             "--test", str(colours / "test"), "--epochs", "20", "--knn-k", "5", "--json",
                             str(report), "--no-progress"]) == 0
    again = json.loads(report.read_text())
    assert again["pretrained"]["linear"]["top1"] >= 0.9 and again["pretrained"]["knn"]["top1"] >= 0.9
    # A second evaluation of the same checkpoint writes beside the first, never over or among its figures.
    assert Path(again["figures"]) != figures and sorted(p.name for p in Path(again["figures"]).iterdir()) == sorted(
        f"pretrained_{kind}.png" for kind in ("probe_curves", "confusion", "reliability", "per_class", "knn_confusion"))
    assert (figures / "random_init_confusion.png").is_file()


def colour_folder(root: Path, size: int = 16) -> Path:
    """Four classes of noisy flat colours, 8 training and 4 test images each."""
    rng = np.random.default_rng(0)
    for name, rgb in (("red", (200, 40, 40)), ("green", (40, 180, 60)), ("blue", (40, 60, 200)), ("grey", (128,) * 3)):
        for split, count in (("train", 8), ("test", 4)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noisy = np.clip(np.array(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(root / split / name / f"{i}.png")
    return root


def test_pretraining_shows_similarity_distributions_and_the_projector(shapes, tmp_path):
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "eval.projector=12")), progress=False)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"train/pos_sim_distribution", "train/neg_sim_distribution"} <= set(acc.Tags()["histograms"])
    assert len(acc.Histograms("train/pos_sim_distribution")) == 10  # one per logged step
    history = json.loads((run / "similarities.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 11))
    assert all(-1 <= q <= 1 for h in history for q in h["pos"] + h["neg"])
    assert (run / "figures" / "similarities.png").read_bytes()[:4] == b"\x89PNG"
    # The projector: 12 labelled points, their class names, and a sprite of thumbnails.
    metadata = next((run / "tb").rglob("metadata.tsv")).read_text().split()
    assert len(metadata) == 12 and set(metadata) <= {"circle", "square", "triangle", "cross", "ring"}
    assert next((run / "tb").rglob("sprite.png")).stat().st_size > 0
    assert "embeddings" in (run / "tb" / "projector_config.pbtxt").read_text()


def test_resume_continues_to_the_same_weights(shapes, tmp_path):
    """Stop after the first step, resume, and end where an uninterrupted run ends, with one curve in TensorBoard."""
    # On the CPU: a bitwise comparison needs deterministic kernels, which CUDA convolution backward is not.
    full = pretrain(load_config(None, tiny(shapes, tmp_path / "full", "eval.every=0", "train.device=cpu")),
                    progress=False)
    cut = pretrain(load_config(None, tiny(shapes, tmp_path / "cut", "eval.every=0", "train.device=cpu",
                                          "train.max_time=0.001")), progress=False)
    assert cut["stopped_by_max_time"] and cut["global_step"] == 1
    next_second()
    pretrain(load_config(None, tiny(shapes, tmp_path / "cut", "eval.every=0", "train.device=cpu",
                                    "train.resume=auto")), progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert full["global_step"] == 10 and b["position"]["global_step"] == 10
    for part in ("encoder", "head"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6)
    steps = [s for s, _ in scalars(tmp_path / "cut")["train/loss"]]
    assert steps == list(range(1, 11))
    texts = EventAccumulator(str(tmp_path / "cut" / "tb"), size_guidance={"tensors": 0})
    texts.Reload()
    assert [e.step for e in texts.Tensors("config/text_summary")] == [0, 1]  # each session's config at its step


def test_max_time_stops_cleanly_with_a_checkpoint(shapes, tmp_path):
    summary = pretrain(load_config(None, tiny(shapes, tmp_path / "r", "train.max_time=0.001", "train.epochs=50")),
                       progress=False)
    assert summary["stopped_by_max_time"] and summary["global_step"] == 1
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["position"]["step"] == 1


def test_user_errors_exit_2_with_a_message(shapes, tmp_path, capsys):
    assert pretrain_main(["train.batchsize=3"]) == 2
    assert "did you mean 'train.batch_size'" in capsys.readouterr().err
    assert pretrain_main([f"data.train={tmp_path / 'missing'}"]) == 2
    assert "data.train: image folder not found" in capsys.readouterr().err
    assert pretrain_main(tiny(shapes, tmp_path / "r", f"data.val={tmp_path / 'no_val'}")) == 2
    assert "data.val: image folder not found" in capsys.readouterr().err
    assert pretrain_main(tiny(shapes, tmp_path / "r", "train.batch_size=4096")) == 2
    assert "exceeds the 80 readable images" in capsys.readouterr().err
    # An unlabelled train folder: kNN is leave-one-out within data.val, which one image cannot do. Said before
    # training, not as a traceback at the first epoch's end.
    first = sorted((shapes / "train").iterdir())[0]
    shutil.copytree(first, tmp_path / "flat")
    (tmp_path / "one" / first.name).mkdir(parents=True)
    shutil.copy(next(first.iterdir()), tmp_path / "one" / first.name)
    assert pretrain_main(tiny(shapes, tmp_path / "r1", f"data.train={tmp_path / 'flat'}",
                              f"data.val={tmp_path / 'one'}")) == 2
    assert "(leave-one-out) needs at least 2 readable images" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "checkpoints").exists()
    assert linear_eval_main(["--checkpoint", str(tmp_path / "nope.pt"), "--train", str(shapes / "train"),
                             "--test", str(shapes / "test")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    pretrain(load_config(None, tiny(shapes, tmp_path / "done", "train.epochs=1", "eval.every=0")), progress=False)
    assert linear_eval_main(["--checkpoint", str(tmp_path / "done"), "--train", str(shapes / "train"),
                             "--test", str(shapes / "test")]) == 2
    assert (f"{tmp_path / 'done'} is a folder, not a checkpoint file: a run folder's last checkpoint is "
            f"{tmp_path / 'done' / 'checkpoints' / 'last.pt'}") in capsys.readouterr().err
    assert pretrain_main(tiny(shapes, tmp_path / "r2", f"train.resume={tmp_path / 'done'}")) == 2
    assert f"train.resume: {tmp_path / 'done'} is a folder, not a checkpoint file" in capsys.readouterr().err
    # its checkpoints folder: the file inside it, not checkpoints/checkpoints/last.pt
    assert pretrain_main(tiny(shapes, tmp_path / "r2", f"train.resume={tmp_path / 'done' / 'checkpoints'}")) == 2
    assert f"give a file such as {tmp_path / 'done' / 'checkpoints' / 'last.pt'}\n" in capsys.readouterr().err
    assert linear_eval_main(["--checkpoint", str(tmp_path / "done" / "checkpoints"), "--train", str(shapes / "train"),
                             "--test", str(shapes / "test")]) == 2
    assert f"last checkpoint is {tmp_path / 'done' / 'checkpoints' / 'last.pt'}\n" in capsys.readouterr().err


def test_folders_with_different_classes_are_refused_before_work(shapes, tmp_path, capsys, caplog):
    other = make_shapes(tmp_path / "other", train_per_class=2, test_per_class=1, size=16)
    (other / "test" / "ring").rename(other / "test" / "donut")
    (other / "test" / "ring").mkdir()  # an empty class folder is no class: said as such
    run = tmp_path / "run"
    assert pretrain_main([*tiny(shapes, run, "train.epochs=1", f"data.val={other / 'test'}")]) == 2
    err = capsys.readouterr().err
    assert "classes of" in err and f"({other / 'test' / 'ring'}: no images)" in err
    assert not (run / "checkpoints").exists()
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", "eval.every=0")), progress=False)
    assert linear_eval_main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--train", str(shapes / "train"),
                             "--test", str(other / "test"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "only in train: ['ring']" in err and "only in test: ['donut']" in err
    assert f"({other / 'test' / 'ring'}: no images)" in err
    assert linear_eval_main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--train", str(shapes / "train"),
                             "--test", str(shapes / "test" / ".." / "train"), "--no-progress"]) == 2
    assert "shares 80 of its 80 images with" in capsys.readouterr().err
    assert linear_eval_main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--train", str(shapes / "train"),
                             "--test", str(tmp_path / "no_test"), "--no-progress"]) == 2
    assert "--test: image folder not found" in capsys.readouterr().err
    # A copy of the training folder (cp -r): other files, the same pixels. Refused; one copied image is said.
    shutil.copytree(shapes / "train", tmp_path / "copy")
    evaluate = ["--checkpoint", str(run / "checkpoints" / "last.pt"), "--train", str(shapes / "train"), "--epochs",
                "1", "--knn-k", "3", "--no-progress", "--test"]
    assert linear_eval_main([*evaluate, str(tmp_path / "copy")]) == 2
    assert "80 of the 80 images of" in capsys.readouterr().err
    shutil.copytree(shapes / "test", tmp_path / "mixed")
    planted = sorted((shapes / "train").rglob("*.png"))[0]
    shutil.copy(planted, tmp_path / "mixed" / planted.parent.name / "planted.png")
    with caplog.at_level("WARNING", logger="simxent"):
        assert linear_eval_main([*evaluate, str(tmp_path / "mixed")]) == 0
    assert "1 of the 31 images of" in caplog.text and "planted.png" in caplog.text


def noise_folder(root: Path, classes: int, per_class: int, size: int = 16) -> Path:
    """Random-noise images under arbitrary class names: nothing for kNN to find but an image's own copy."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_knn_monitoring_never_searches_a_bank_holding_the_query_itself(tmp_path, caplog):
    folder = noise_folder(tmp_path / "noise", classes=2, per_class=20)
    cfg = load_config(None, [*TINY_RUN, f"data.train={folder}", f"data.val={folder / 'c0' / '..'}",
                             "eval.knn_k=1"])
    train, val, bank = load_data(cfg, progress=False)
    assert bank is None and "kNN is leave-one-out within data.val" in caplog.text
    torch.manual_seed(0)
    model, augment, cpu = SimCLR(cfg.model), ViewAugment(cfg.augment, 16), torch.device("cpu")
    everything = KnnBank(train, torch.ones(len(train), dtype=torch.bool))
    # Searching a bank that holds the queries scores 1 on noise; leave-one-out scores about chance.
    assert knn_monitor(model, everything, val, augment, cfg, cpu, None) == 1.0
    assert knn_monitor(model, bank, val, augment, cfg, cpu, None) < 0.8  # 0.475 when written

    # A val folder sharing some files with train (through symlinks) keeps only train's other images in the bank.
    shared = tmp_path / "val"
    linked = []
    for c in ("c0", "c1"):
        (shared / c).mkdir(parents=True)
        for i in range(5):
            (shared / c / f"link{i}.png").symlink_to(folder / c / f"{i}.png")
            linked.append(str(folder / c / f"{i}.png"))
        Image.new("RGB", (16, 16), (40, 80, 120)).save(shared / c / "own.png")
    cfg.data.val = str(shared)
    train, val, bank = load_data(cfg, progress=False)
    assert sorted(f for f, keep in zip(bank.data.files, bank.rows.tolist()) if not keep) == sorted(linked)
    assert int(bank.rows.sum()) == 30 and "shares 10 images with data.train" in caplog.text


def test_binary_and_multilabel_probes(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", "eval.every=0")), progress=False)
    ckpt = str(run / "checkpoints" / "last.pt")
    two = tmp_path / "two"
    for split in ("train", "test"):
        (two / split).mkdir(parents=True)
        for c in ("circle", "square"):
            (two / split / c).symlink_to(shapes / split / c, target_is_directory=True)
    report = tmp_path / "binary.json"
    assert linear_eval_main(["--checkpoint", ckpt, "--train", str(two / "train"), "--test", str(two / "test"),
                             "--objective", "binary", "--positive-class", "circle", "--class-weight", "balanced",
                             "--epochs", "3", "--knn-k", "5", "--json", str(report), "--no-progress"]) == 0
    r = json.loads(report.read_text())
    table = capsys.readouterr().out.splitlines()  # the README lists balanced accuracy for binary probes
    assert "linear balanced acc." in table[0] and f"{r['pretrained']['linear']['balanced_accuracy']:.4f}" in table[1]
    assert r["targets"] == ["circle"] and r["class_weight"] == {"circle": pytest.approx(1.0)}
    assert 0 <= r["pretrained"]["linear"]["roc_auc"] <= 1 and "f1" in r["pretrained"]["linear"]
    per_class = r["pretrained"]["linear"]["per_class_loss"]  # by folder: the negative class, then the positive
    assert list(per_class) == ["square", "circle"]
    assert [per_class[c]["images"] for c in per_class] == [len(list((two / "test" / c).iterdir())) for c in per_class]
    linear = r["pretrained"]["linear"]  # the probe's confusion, rows by true outcome: counts, accuracy and F1
    assert linear["confusion_classes"] == ["square", "circle"]
    assert r["pretrained"]["knn"]["confusion_classes"] == r["classes"] == ["circle", "square"]  # the folder's order
    y_test = [linear["confusion_classes"].index(c) for c in r["classes"] for _ in (two / "test" / c).iterdir()]
    cm = np.array(linear["confusion"])
    assert cm.sum(1).tolist() == np.bincount(y_test).tolist()
    assert linear["accuracy"] == pytest.approx(np.trace(cm) / len(y_test))
    assert linear["f1"] == pytest.approx(2 * cm[1, 1] / (2 * cm[1, 1] + cm[0, 1] + cm[1, 0]))
    assert linear_eval_main(["--checkpoint", ckpt, "--train", str(shapes / "train"), "--test", str(shapes / "test"),
                             "--objective", "binary", "--no-progress"]) == 2
    assert "exactly 2 class folders" in capsys.readouterr().err

    # multi-label: "round" for circles and rings, "straight" for squares, triangles and crosses, "ring" too
    def write_csv(root, path):
        rows = []
        for f in sorted(root.rglob("*.png")):
            shape = f.parent.name
            labels = (["round"] if shape in ("circle", "ring") else ["straight"]) + (["ring"] if shape == "ring" else [])
            rows.append(f"{f.relative_to(root).as_posix()},{';'.join(labels)}")
        path.write_text("\n".join(rows) + "\n")
    write_csv(shapes / "train", tmp_path / "train.csv")
    write_csv(shapes / "test", tmp_path / "test.csv")
    report = tmp_path / "multilabel.json"
    assert linear_eval_main(["--checkpoint", ckpt, "--train", str(shapes / "train"), "--test", str(shapes / "test"),
                             "--objective", "multilabel", "--train-labels", str(tmp_path / "train.csv"),
                             "--test-labels", str(tmp_path / "test.csv"), "--epochs", "3", "--json", str(report),
                             "--no-progress"]) == 0
    r = json.loads(report.read_text())
    assert r["targets"] == r["classes"] == ["ring", "round", "straight"]  # the labels, not the folders' names
    assert set(r["pretrained"]["linear"]["per_label_ap"]) == {"ring", "round", "straight"}
    assert 0 < r["pretrained"]["linear"]["mAP"] <= 1 and "knn" not in r["pretrained"]
    (tmp_path / "test.csv").write_text("\n".join((tmp_path / "test.csv").read_text().splitlines()[1:]) + "\n")
    assert linear_eval_main(["--checkpoint", ckpt, "--train", str(shapes / "train"), "--test", str(shapes / "test"),
                             "--objective", "multilabel", "--train-labels", str(tmp_path / "train.csv"),
                             "--test-labels", str(tmp_path / "test.csv"), "--no-progress"]) == 2
    assert "no labels for 1 image(s)" in capsys.readouterr().err


def test_streamed_training_equals_cached_training(shapes, tmp_path):
    """data.stream=true decodes in workers every epoch; with the same seed it trains the very same model."""
    cached = pretrain(load_config(None, tiny(shapes, tmp_path / "cached", "train.epochs=1", "eval.every=0")),
                      progress=False)
    streamed = pretrain(load_config(None, tiny(shapes, tmp_path / "streamed", "train.epochs=1", "eval.every=0",
                                               "data.stream=true", "data.workers=2")), progress=False)
    assert streamed["global_step"] == cached["global_step"] == 5
    a = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.pt")["encoder"]
    b = load_checkpoint(tmp_path / "streamed" / "checkpoints" / "last.pt")["encoder"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_compiled_training_follows_the_eager_run(shapes, tmp_path):
    """train.compile=true (encoder, head and colour ops compiled) changes the speed, not the training: same
    seed, the same losses step by step and the same weights as eager, up to float rounding (fp32). A small
    learning rate, since at lr 0.1 this tiny run amplifies rounding: eager on one thread and on two differ
    by 1e-3 by its fifth step."""
    runs = {}
    for compiled in ("false", "true"):
        run = tmp_path / compiled
        pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", "eval.every=0", "train.precision=fp32",
                                        "optim.lr=0.001", f"train.compile={compiled}")), progress=False)
        runs[compiled] = ([v for _, v in scalars(run)["train/loss"]],
                          load_checkpoint(run / "checkpoints" / "last.pt")["encoder"])
    (eager_loss, eager_w), (compiled_loss, compiled_w) = runs["false"], runs["true"]
    assert len(eager_loss) == 5
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=0)
    for name in eager_w:
        torch.testing.assert_close(compiled_w[name], eager_w[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("decoupled", [False, True], ids=["nt-xent", "decoupled"])
def test_multi_crop_supervised_pretraining_resumes_exactly(shapes, tmp_path, monkeypatch, decoupled):
    """Three full-size and two small views per image, positives by class: the step hands the loss all five
    views' projections, each image's label and ``loss.decoupled``, logs as a two-view run does, and a run
    stopped after one step and resumed ends at the uninterrupted run's weights."""
    import simxent.train

    calls = []
    real = simxent.train.multi_view_nt_xent

    def spy(z, n_views, temperature, labels=None, **kw):
        calls.append((z.shape[0], n_views, None if labels is None else labels.tolist(), kw["decoupled"]))
        return real(z, n_views, temperature, labels=labels, **kw)

    monkeypatch.setattr(simxent.train, "multi_view_nt_xent", spy)
    multi = ("augment.views=3", "augment.small_views=2", "loss.positives=labels", "eval.every=0", "train.device=cpu",
             "train.epochs=1", f"loss.decoupled={str(decoupled).lower()}")
    full = pretrain(load_config(None, tiny(shapes, tmp_path / "full", *multi)), progress=False)
    assert full["global_step"] == 5 and torch.isfinite(torch.tensor(full["last_loss"]))
    assert all(rows == 5 * 16 and v == 5 and len(y) == 16 and set(y) <= set(range(5)) and d == decoupled
               for rows, v, y, d in calls)
    logged = scalars(tmp_path / "full")
    assert SCALARS - {"val/knn_top1"} <= set(logged)
    cut = pretrain(load_config(None, tiny(shapes, tmp_path / "cut", *multi, "train.max_time=0.001")), progress=False)
    assert cut["global_step"] == 1
    pretrain(load_config(None, tiny(shapes, tmp_path / "cut", *multi, "train.resume=auto")), progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for part in ("encoder", "head"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["pairs", "full_pairs"])
def test_pairwise_multi_crop_pretraining_hands_the_loss_its_pairs(shapes, tmp_path, monkeypatch, mode):
    """loss.multi_view=pairs / full_pairs: each step's loss is the pairwise NT-Xent of all four views
    (two full-size, two small), with the full-size ones named for full_pairs, and the run completes its
    five steps with a finite loss."""
    import simxent.train

    calls = []
    real = simxent.train.pairwise_nt_xent

    def spy(z, n_views, temperature, n_full=None, **kw):
        calls.append((z.shape[0], n_views, n_full))
        return real(z, n_views, temperature, n_full, **kw)

    monkeypatch.setattr(simxent.train, "pairwise_nt_xent", spy)
    summary = pretrain(load_config(None, tiny(shapes, tmp_path, "augment.small_views=2", "eval.every=0",
                                              "train.epochs=1", f"loss.multi_view={mode}")), progress=False)
    assert summary["global_step"] == 5 and torch.isfinite(torch.tensor(summary["last_loss"]))
    assert calls == [(4 * 16, 4, 2 if mode == "full_pairs" else None)] * 5
    assert f"4 views per image, contrasted as loss.multi_view={mode}" in (tmp_path / "train.log").read_text()


def test_a_resolution_schedule_grows_the_views_and_resumes_exactly(shapes, tmp_path, monkeypatch):
    """augment.view_ratio_start=0.5 at 16 px, 10 steps (5 per epoch): each batch's views are sized by the
    schedule's progress at its own step, p = k / 10 for batch k (drawn during the step before; they lagged a
    step, but for an epoch's first), 8 -> 12 -> 16 px. A run resumed from the checkpoint after step 3, whose
    next batch was drawn at p = 0.3, trains the same sizes and ends at the uninterrupted weights."""
    from simxent.models import ConvNet

    sizes, real = [], ConvNet.forward

    def spy(self, x):
        if self.training:
            sizes.append(x.shape[-1])
        return real(self, x)

    monkeypatch.setattr(ConvNet, "forward", spy)
    grow = ("augment.view_ratio_start=0.5", "eval.every=0", "train.precision=fp32", "train.checkpoint_every=1",
            "train.keep_checkpoints=10")
    full = pretrain(load_config(None, tiny(shapes, tmp_path / "full", *grow)), progress=False)
    full_sizes = [8] * 3 + [12] * 5 + [16] * 2
    assert full["global_step"] == 10 and sizes == full_sizes
    assert [v for _, v in scalars(tmp_path / "full")["train/view_size"]] == full_sizes  # what TensorBoard shows
    by_step = {load_checkpoint(p)["position"]["global_step"]: p for p in (tmp_path / "full" / "checkpoints").glob(
        "step-*.pt")}
    after_3 = by_step[3]
    assert load_checkpoint(after_3)["ahead_progress"] == pytest.approx(0.3)
    assert load_checkpoint(by_step[5])["ahead_progress"] is None  # an epoch's end: nothing drawn ahead
    sizes.clear()
    pretrain(load_config(None, tiny(shapes, tmp_path / "resumed", *grow, f"train.resume={after_3}")), progress=False)
    assert sizes == full_sizes[3:]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for part in ("encoder", "head"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=1e-6)


def test_supervised_positives_need_a_labelled_train_folder(tmp_path, capsys):
    flat = tmp_path / "flat"
    for i in range(20):
        write_image(flat / f"{i}.png", seed=i)
    run = tmp_path / "run"
    assert pretrain_main([*TINY_RUN, f"data.train={flat}", "loss.positives=labels", f"out={run}"]) == 2
    err = capsys.readouterr().err
    assert "loss.positives=labels: data.train" in err and "one sub-folder per" in err
    assert not (run / "checkpoints").exists()
    one = tmp_path / "one"  # one class: every other view a positive, no negative, a constant loss
    for i in range(20):
        write_image(one / "cat" / f"{i}.png", seed=i)
    assert pretrain_main([*TINY_RUN, f"data.train={one}", "loss.positives=labels", f"out={run}"]) == 2
    assert "sub-folder per class, at least two" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_a_stop_mid_epoch_names_its_epoch_and_step_as_the_other_lines_do(shapes, tmp_path, caplog):
    """Progress lines count epochs from 1 ("epoch 1/2 step 1/5"): the kNN of a run stopped after its first
    step is "epoch 1 step 1" (not "epoch 0"), an epoch's end "epoch 1", and the resume says how much was done."""
    args = tiny(shapes, tmp_path, "train.epochs=1")
    with caplog.at_level("INFO", logger="simxent"):
        pretrain(load_config(None, [*args, "train.max_time=0.001"]), progress=False)
        assert "epoch 1 step 1: kNN top-1" in caplog.text and "epoch 0" not in caplog.text
        caplog.clear()
        pretrain(load_config(None, [*args, "train.resume=auto"]), progress=False)
    assert "after 1 step of 16 images of the first epoch (global step 1)" in caplog.text
    assert "epoch 1: kNN top-1" in caplog.text


def test_a_validation_folder_unread_with_eval_every_0_is_said(shapes, tmp_path, caplog):
    """eval.every=0 reads no data.val (no kNN monitoring, no projector): a data.val given anyway is named."""
    with caplog.at_level("WARNING", logger="simxent"):
        summary = pretrain(load_config(None, tiny(shapes, tmp_path / "run", "eval.every=0", "train.epochs=1")),
                           progress=False)
    assert summary["knn_top1"] == [] and f"data.val={shapes / 'test'} is not read with eval.every=0" in caplog.text


def test_batchnorm_statistics_are_re_estimated_over_the_training_images_at_the_schedules_end(tmp_path, caplog):
    """train.bn_recalibration above the folder's size, in one batch: the final checkpoint's first BatchNorm
    holds the mean and unbiased variance of its input over every training image as evaluation encodes it (the
    PNGs read here with PIL, normalised), not training's average over augmented views."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    cfg = load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=2", "eval.every=0",
                             "train.precision=fp32", "train.bn_recalibration=1000", "eval.batch_size=1000",
                             f"out={tmp_path / 'run'}"])
    with caplog.at_level("INFO", logger="simxent"):
        pretrain(cfg, progress=False)
    assert "BatchNorm statistics re-estimated over 40 training images at 16 px" in caplog.text
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((shapes / "train").rglob("*.png"))])
    assert_first_batchnorm_holds_the_statistics_of(tmp_path / "run", pixels, cfg)


def assert_first_batchnorm_holds_the_statistics_of(run, pixels: np.ndarray, cfg) -> None:
    """The run's final encoder: its first BatchNorm's running mean and variance are the mean and unbiased
    variance of that layer's input over the uint8 NHWC ``pixels``, normalised as the run normalises."""
    encoder = load_encoder(run / "checkpoints" / "last.pt")
    bn = next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg.augment.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
    seen = []
    bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].double()))
    with torch.no_grad():
        encoder(x)
    torch.testing.assert_close(bn.running_mean.double(), seen[0].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), seen[0].var((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_batchnorm_re_estimation_takes_images_as_evaluation_decodes_them(tmp_path):
    """A folder of images larger than the view is held padded for training crops (the photo top-left, black
    around it): the statistics come from the images decoded again as evaluation decodes them."""
    from simxent.data import decode_eval

    folder = tmp_path / "photos"
    for i in range(20):
        write_image(folder / f"{i}.png", size=(30, 22), seed=i)
    cfg = load_config(None, [*TINY_RUN, f"data.train={folder}", "train.epochs=1", "eval.every=0",
                             "train.precision=fp32", "train.bn_recalibration=1000", "eval.batch_size=1000",
                             f"out={tmp_path / 'run'}"])
    pretrain(cfg, progress=False)
    pixels = np.stack([decode_eval(p, 16, cfg.eval.crop_ratio) for p in sorted(folder.glob("*.png"))])
    assert_first_batchnorm_holds_the_statistics_of(tmp_path / "run", pixels, cfg)


def test_batchnorm_re_estimation_never_leaves_a_lone_image_in_a_batch():
    """5 images in batches of at most 4: 3 and 2, not 4 and 1 (a layer on a 1x1 map has no variance over
    one image, and torch refuses it)."""
    from simxent.augment import Normalize
    from simxent.evaluate import reestimate_batchnorm

    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.BatchNorm2d(4))
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    assert reestimate_batchnorm(encoder, images, Normalize((0.5,) * 3, (0.25,) * 3), torch.device("cpu"),
                                batch_size=4, channels_last=False) == 1
    assert encoder[2].num_batches_tracked == 2 and torch.isfinite(encoder[2].running_var).all()


def test_a_re_estimation_out_of_memory_keeps_the_epoch_and_trainings_statistics(tmp_path, caplog, monkeypatch):
    """Out of memory in the re-estimation's second batch (its first has already moved the statistics): the run
    still saves its last epoch (train.checkpoint_every=0 leaves no other checkpoint of it), with BatchNorm
    statistics exactly as a run without re-estimation leaves them, and says why."""
    import simxent.evaluate

    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    base = [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=2", "eval.every=0", "train.precision=fp32",
            "train.checkpoint_every=0", "eval.batch_size=8"]
    pretrain(load_config(None, [*base, "train.bn_recalibration=0", f"out={tmp_path / 'kept'}"]), progress=False)
    inputs = simxent.evaluate.encoder_inputs

    def one_batch_then_out_of_memory(*args, **kwargs):
        batches = inputs(*args, **kwargs)
        yield next(batches)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(simxent.evaluate, "encoder_inputs", one_batch_then_out_of_memory)
    with caplog.at_level("WARNING", logger="simxent"):
        summary = pretrain(load_config(None, [*base, "train.bn_recalibration=40", f"out={tmp_path / 'oom'}"]),
                           progress=False)
    assert "train.bn_recalibration: out of memory at eval.batch_size=8" in caplog.text
    assert summary["global_step"] == load_checkpoint(tmp_path / "kept" / "checkpoints" / "last.pt")["position"][
        "global_step"]
    kept, oom = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["encoder"] for run in ("kept", "oom"))
    assert kept.keys() == oom.keys() and any("running_var" in k for k in kept)
    for key in kept:
        torch.testing.assert_close(oom[key], kept[key], rtol=0, atol=0, msg=key)


def test_batchnorm_statistics_are_kept_at_a_deadline_that_only_cuts_the_schedule(tmp_path, caplog):
    """train.budget_schedule=false: train.max_time cuts the epochs' schedule, which a resumed run goes on with;
    the statistics are re-estimated only at its end."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    base = [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=50", "eval.every=0",
            "train.bn_recalibration=100", "train.max_time=3"]
    for budget, said in (("false", False), ("true", True)):
        caplog.clear()
        with caplog.at_level("INFO", logger="simxent"):
            pretrain(load_config(None, [*base, f"train.budget_schedule={budget}", f"out={tmp_path / budget}"]),
                     progress=False)
        assert ("BatchNorm statistics re-estimated" in caplog.text) is said, budget
