"""The sweep carves a stratified, seeded validation split, chooses on it, and scores the test folder once for
the chosen setting."""
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import simxent.sweep as sweep_module
from simxent.config import ConfigError
from simxent.data import DataError
from simxent.demo import make_shapes
from simxent.linear_eval import ProbeOptions
from simxent.train import TrainingError
from simxent.sweep import (SweepOptions, allocate, carve_validation, combinations, parse_grid, stratified_split,
                           sweep)
from tests.conftest import write_image


def test_grid_parsing():
    assert parse_grid(["loss.temperature=0.1,0.5", "optim.name=sgd,adamw"]) == {
        "loss.temperature": [0.1, 0.5], "optim.name": ["sgd", "adamw"]}
    # a comma inside brackets belongs to a list value, not to the grid
    assert parse_grid(["augment.crop_scale=[0.2,1.0],[0.08, 1.0]"]) == {
        "augment.crop_scale": [[0.2, 1.0], [0.08, 1.0]]}
    with pytest.raises(ConfigError, match="expected key=value1"):
        parse_grid(["loss.temperature"])
    # each setting trains into its own folder: a repeat would train twice into one
    with pytest.raises(ConfigError, match=r"--grid loss.temperature: value 0.1 given twice \(each setting is "
                                          r"one run"):
        parse_grid(["loss.temperature=0.1,0.5,0.10"])
    with pytest.raises(ConfigError, match=r"--grid augment.crop_scale: value \[0.2,1.0\] given twice"):
        parse_grid(["augment.crop_scale=[0.2,1.0],[0.2, 1.0]"])
    with pytest.raises(ConfigError, match=r"--grid optim.lr: the key given twice"):
        parse_grid(["optim.lr=0.1", "optim.lr=0.2"])
    with pytest.raises(ConfigError, match=r"--grid augment.crop_scale: value \[0.2,1.0\] given twice"):
        parse_grid(["augment.crop_scale=[0.2,1],[0.2,1.0]"])  # the config reads both as (0.2, 1.0)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=8), data=st.data())
def test_allocate_is_proportional_to_within_one(counts, data):
    total = data.draw(st.integers(0, sum(counts)))
    shares = allocate(counts, total)
    assert sum(shares) == total
    for share, n in zip(shares, counts):
        assert abs(share - total * n / sum(counts)) < 1  # the exact share, from the formula


def labels_of(counts):
    return [c for c, n in enumerate(counts) for _ in range(n)]


@pytest.mark.parametrize("subset", [0, 120])
def test_split_is_stratified_disjoint_and_seeded(subset):
    counts = [37, 50, 13, 100, 21]
    labels = labels_of(counts)
    train, val = stratified_split(labels, 0.1, seed=3, subset=subset)
    assert not set(train) & set(val)
    kept = subset or len(labels)
    assert len(train) + len(val) == kept and len(val) == round(0.1 * kept)
    if not subset:
        assert sorted(train + val) == list(range(len(labels)))
    per_class_val, per_class_kept = Counter(labels[i] for i in val), Counter(labels[i] for i in train + val)
    for c, n in enumerate(counts):
        assert abs(per_class_kept[c] - kept * n / len(labels)) < 1
        assert abs(per_class_val[c] - len(val) * per_class_kept[c] / kept) < 1
    assert stratified_split(labels, 0.1, seed=3, subset=subset) == (train, val)
    assert stratified_split(labels, 0.1, seed=4, subset=subset)[1] != val


def test_carve_links_the_originals(tmp_path):
    src = tmp_path / "train"
    for c, n in (("a", 12), ("b", 8)):
        for i in range(n):
            write_image(src / c / f"{i}.png", seed=i)
    split = carve_validation(src, tmp_path / "split", SweepOptions(val_fraction=0.25, split_seed=1))
    assert split["val_per_class"] == [3, 2] and split["train_per_class"] == [9, 6]
    parts = {name: sorted((tmp_path / "split" / name).rglob("*.png")) for name in ("train", "val")}
    assert all(p.is_symlink() for ps in parts.values() for p in ps)  # nothing copied
    real = {name: {os.path.realpath(p) for p in ps} for name, ps in parts.items()}
    assert not real["train"] & real["val"]
    assert real["train"] | real["val"] == {os.path.realpath(p) for p in src.rglob("*.png")}
    for name, ps in parts.items():  # each link keeps its class folder and name
        assert all(p.relative_to(tmp_path / "split" / name) == Path(os.path.realpath(p)).relative_to(src.resolve())
                   for p in ps)
    with pytest.raises(ConfigError, match="no image of class 'b'"):  # 1 validation image, and a has more
        carve_validation(src, tmp_path / "bad", SweepOptions(val_fraction=0.05))
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        carve_validation(tmp_path / "flat", tmp_path / "bad", SweepOptions())
    with pytest.raises(DataError, match="^--train: image folder not found: .*missing"):
        carve_validation(tmp_path / "missing", tmp_path / "bad", SweepOptions())


BASE = ["model.backbone=convnet", "model.head_hidden=16", "model.head_out=8", "data.image_size=16",
        "data.workers=0", "train.batch_size=8", "train.epochs=1", "optim.name=sgd", "optim.lr=0.1"]


def test_a_sweep_checks_its_test_folder_before_anything_trains(tmp_path):
    """--test is scored after every run has trained: a missing folder, or one with other classes, is found
    first, not hours later."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    out, grid = tmp_path / "sweep", {"loss.temperature": [0.1]}
    with pytest.raises(DataError, match=r"^--test: image folder not found: .*tst"):
        sweep(None, grid, str(shapes / "train"), str(tmp_path / "tst"), out, SweepOptions(val_fraction=0.25), BASE)
    shutil.copytree(shapes / "test", tmp_path / "other")
    shutil.rmtree(tmp_path / "other" / "ring")
    with pytest.raises(ConfigError, match=r"classes of .*other differ .*only in train: \['ring'\]"):
        sweep(None, grid, str(shapes / "train"), str(tmp_path / "other"), out, SweepOptions(val_fraction=0.25), BASE)
    assert not (out / "temperature=0.1").exists()


def test_a_run_stopped_by_a_signal_stops_the_sweep_before_it_is_compared(tmp_path, monkeypatch, caplog):
    """Ctrl-C stops the run in progress with a checkpoint (its summary says stopped_by_signal): the sweep
    stops there too, instead of training the next setting and choosing among runs of unequal length."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    real, trained = sweep_module.pretrain, []

    def stopped(cfg, progress=True):
        trained.append(cfg.out)
        return {**real(cfg, progress=progress), "stopped_by_signal": True}

    monkeypatch.setattr(sweep_module, "pretrain", stopped)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        sweep(None, {"loss.temperature": [0.1, 0.2]}, str(shapes / "train"), str(shapes / "test"), out,
              SweepOptions(val_fraction=0.25), BASE, ProbeOptions(epochs=1, knn_k=3), progress=False)
    assert trained == [str(out / "temperature=0.1" / "seed=0")] and not (out / "results.json").exists()
    assert "the same command with train.resume=auto goes on from there" in caplog.text


def test_sweep_chooses_on_validation_and_scores_test_once(tmp_path, monkeypatch):
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=4, size=16)
    with pytest.raises(ConfigError, match="did you mean 'loss.temperature'"):  # checked before any run
        sweep(None, {"loss.temprature": [0.1]}, str(shapes / "train"), str(shapes / "test"), tmp_path / "bad",
              overrides=BASE)
    scored = []
    real_linear_eval = sweep_module.linear_eval

    def spy(checkpoint, train_dir, eval_dir, *args, **kwargs):
        scored.append((Path(checkpoint).parents[1], Path(train_dir), Path(eval_dir)))
        return real_linear_eval(checkpoint, train_dir, eval_dir, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "linear_eval", spy)
    out = tmp_path / "sweep"
    # a list value too: it reaches the config as a list, and the tables, hparams and plot as text
    results = sweep(None, {"loss.temperature": [0.1, 0.5], "augment.crop_scale": [[0.5, 1.0]]},
                    str(shapes / "train"), str(shapes / "test"), out, SweepOptions(seeds=2, val_fraction=0.25),
                    BASE, ProbeOptions(epochs=2, knn_k=5), progress=False)
    runs = results["runs"]
    assert [(r["loss.temperature"], r["seed"]) for r in runs] == [(0.1, 0), (0.1, 1), (0.5, 0), (0.5, 1)]
    assert all(r["augment.crop_scale"] == "[0.5,1.0]" for r in runs)
    assert all(r["steps"] == 30 // 8 for r in runs)  # 40 images, 10 held out: one epoch of the 30 others
    run = out / "temperature=0.1_crop_scale=[0.5,1.0]" / "seed=1"
    config = (run / "config.yaml").read_text()
    assert "crop_scale:\n  - 0.5\n  - 1.0" in config and "seed: 1" in config and str(out / "split" / "train") in config
    # the choice: the best mean validation kNN top-1 over the two seeds, recomputed here from the runs
    mean = {t: sum(r["val_knn_top1"] for r in runs if r["loss.temperature"] == t) / 2 for t in (0.1, 0.5)}
    best = max(mean, key=mean.get)  # the first in grid order on a tie, as the sweep does
    assert results["chosen"]["setting"]["loss.temperature"] == best
    # every run is scored on the validation part; the test folder only for the chosen setting's two runs
    assert [s for s in scored if s[2] == out / "split" / "val"] == [
        (Path(r["run"]), out / "split" / "train", out / "split" / "val") for r in runs]
    tested = [s[0] for s in scored if s[2] == shapes / "test"]
    assert tested == [Path(r["run"]) for r in runs if r["loss.temperature"] == best]
    assert len(scored) == 6
    test_knn = [json.loads((t / "test_eval.json").read_text())["pretrained"]["knn"]["top1"] for t in tested]
    assert [t["knn_top1"] for t in results["chosen"]["test"]] == test_knn
    assert results["chosen"]["test_mean"]["knn_top1"] == pytest.approx(sum(test_knn) / 2)
    assert json.loads((out / "results.json").read_text()) == results
    md = (out / "results.md").read_text()
    assert f"Chosen: loss.temperature={best}, augment.crop_scale=[0.5,1.0], by mean validation knn_top1" in md
    assert "30 train / 10 validation image files" in md
    assert list((out / "hparams").rglob("events.out.tfevents.*"))
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_again_into_its_out_refuses_another_split_while_its_runs_are_there(tmp_path):
    """With train.resume=auto a second sweep into the same out reuses its runs: fine with the same split, but
    runs trained on a 75 % train part must not be scored on a validation part they partly trained on."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    out, args = tmp_path / "sweep", (str(shapes / "train"), str(shapes / "test"))
    grid, overrides = {"loss.temperature": [0.1]}, [*BASE, "train.resume=auto"]
    first = sweep(None, grid, *args, out, SweepOptions(val_fraction=0.25), overrides, ProbeOptions(epochs=1, knn_k=3),
                  progress=False)
    again = sweep(None, grid, *args, out, SweepOptions(val_fraction=0.25), overrides, ProbeOptions(epochs=1, knn_k=3),
                  progress=False)
    assert again["runs"][0]["val_knn_top1"] == first["runs"][0]["val_knn_top1"]
    for attempt in range(2):  # refused again: the first refusal left the split as it was
        with pytest.raises(ConfigError, match=rf"--out {out} holds runs trained on another split of .*validation "
                                              r"fraction 0.25, split seed 0.*30 train images"):
            sweep(None, grid, *args, out, SweepOptions(val_fraction=0.5), overrides,
                  ProbeOptions(epochs=1, knn_k=3), progress=False)
    assert json.loads((out / "split" / "split.json").read_text())["val_fraction"] == 0.25
    assert len(list((out / "split" / "val").rglob("*.png"))) == 10
    # The same split reached through a link to the folder is the same split.
    (tmp_path / "link").symlink_to(shapes / "train", target_is_directory=True)
    again = sweep(None, grid, str(tmp_path / "link"), args[1], out, SweepOptions(val_fraction=0.25), overrides,
                  ProbeOptions(epochs=1, knn_k=3), progress=False)
    assert again["runs"][0]["val_knn_top1"] == first["runs"][0]["val_knn_top1"]
    # A copy holds the same names (the same digest of the parts) but may hold other images: refused.
    shutil.copytree(shapes / "train", tmp_path / "copy")
    refusal = (f"--out {out} holds runs trained on a split of {shapes / 'train'}, not of this --train "
               f"({tmp_path / 'copy'})")
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        sweep(None, grid, str(tmp_path / "copy"), args[1], out, SweepOptions(val_fraction=0.25), overrides,
              ProbeOptions(epochs=1, knn_k=3), progress=False)


def test_a_sweep_again_into_its_out_asks_for_resume_and_then_trains_only_the_new_setting(tmp_path):
    """Without train.resume=auto a second sweep into the same out is refused before anything trains, with
    the sweep's own advice; with it, the earlier run is reused as it is and only the added value trains."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    out, args = tmp_path / "sweep", (str(shapes / "train"), str(shapes / "test"))
    options, probe = SweepOptions(val_fraction=0.25), ProbeOptions(epochs=1, knn_k=3)
    first = sweep(None, {"loss.temperature": [0.1]}, *args, out, options, BASE, probe, progress=False)
    checkpoint = Path(first["runs"][0]["run"]) / "checkpoints" / "last.pt"
    written = checkpoint.stat().st_mtime_ns
    grid = {"loss.temperature": [0.1, 0.2]}
    with pytest.raises(ConfigError, match=r"--out: .*temperature=0.1.* holds a run of an earlier sweep \(1 of this "
                                          r"sweep's 2 runs are there\): add train.resume=auto"):
        sweep(None, grid, *args, out, options, BASE, probe, progress=False)
    assert not (out / "temperature=0.2").exists()
    again = sweep(None, grid, *args, out, options, [*BASE, "train.resume=auto"], probe, progress=False)
    assert [r["loss.temperature"] for r in again["runs"]] == [0.1, 0.2]
    assert again["runs"][0]["val_knn_top1"] == first["runs"][0]["val_knn_top1"]
    assert checkpoint.stat().st_mtime_ns == written  # reused, not trained again


def test_sweep_plot_averages_runs_that_share_a_value():
    from simxent.figures import sweep_plots

    rows = [{"optim.name": n, "loss.temperature": t, "knn_top1": k, "linear_top1": k + 0.1}
            for n, t, k in (("sgd", 0.1, 0.2), ("sgd", 0.5, 0.4), ("lars", 0.1, 0.6), ("lars", 0.5, 0.8))]
    fig = sweep_plots(rows, ["optim.name", "loss.temperature"])
    by_name, by_t = (ax.get_lines()[0].get_ydata() for ax in fig.axes[:2])
    assert list(by_name) == pytest.approx([0.7, 0.3])  # lars, sgd (sorted), each averaged over both temperatures
    assert list(by_t) == pytest.approx([0.4, 0.6])


def test_one_at_a_time_varies_each_key_alone_from_the_base():
    grid = {"optim.lr": [0.002, 0.004, 0.001], "train.batch_size": [256, 128], "loss.temperature": [0.2]}
    assert combinations(grid, one_at_a_time=True) == [
        {"optim.lr": 0.002, "train.batch_size": 256, "loss.temperature": 0.2},
        {"optim.lr": 0.004, "train.batch_size": 256, "loss.temperature": 0.2},
        {"optim.lr": 0.001, "train.batch_size": 256, "loss.temperature": 0.2},
        {"optim.lr": 0.002, "train.batch_size": 128, "loss.temperature": 0.2}]
    product = combinations(grid)
    assert len(product) == 6 and len({tuple(c.values()) for c in product}) == 6
    assert all(c in product for c in combinations(grid, one_at_a_time=True))


def test_one_at_a_time_plot_shows_each_key_at_the_others_base():
    from simxent.figures import sweep_plots

    rows = [{"optim.lr": lr, "train.batch_size": b, "knn_top1": k, "linear_top1": k}
            for lr, b, k in ((0.002, 256, 0.5), (0.004, 256, 0.6), (0.002, 128, 0.3))]
    fig = sweep_plots(rows, ["optim.lr", "train.batch_size"], base={"optim.lr": 0.002, "train.batch_size": 256})
    by_lr, by_batch = (ax.get_lines()[0] for ax in fig.axes[:2])
    assert list(by_lr.get_xdata()) == [0.002, 0.004] and list(by_lr.get_ydata()) == pytest.approx([0.5, 0.6])
    assert list(by_batch.get_xdata()) == [128, 256] and list(by_batch.get_ydata()) == pytest.approx([0.3, 0.5])


def test_script_takes_overrides_after_the_options(tmp_path, monkeypatch, load_script):
    script = load_script("sweep")
    seen = {}

    def fake_sweep(config, grid, train, test, out, opts, overrides, probe, progress):
        seen.update(config=config, grid=grid, overrides=list(overrides), opts=opts)
        (Path(out) / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.md").write_text("table\n")
        return {}

    monkeypatch.setattr(script, "sweep", fake_sweep)
    assert script.main(["configs/cpu.yaml", "--train", "a", "--test", "b", "--seeds", "3", "loss.temperature=0.1",
                        "--grid", "augment.crop_scale=[0.2,1.0]", "--out", str(tmp_path), "optim.lr=0.01",
                        "--val-fraction", "0.2", "--subset", "100", "--one-at-a-time"]) == 0
    assert seen == {"config": "configs/cpu.yaml", "grid": {"augment.crop_scale": [[0.2, 1.0]]},
                    "overrides": ["loss.temperature=0.1", "optim.lr=0.01"],
                    "opts": SweepOptions(seeds=3, val_fraction=0.2, subset=100, one_at_a_time=True)}


def test_script_refuses_a_bad_fraction_in_one_line(tmp_path, capsys, load_script):
    script = load_script("sweep")
    assert script.main(["--grid", "loss.temperature=0.1", "--train", str(tmp_path), "--test", str(tmp_path),
                        "--val-fraction", "1.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--val-fraction must be between 0 and 1" in err


def test_one_seed_has_no_spread_and_two_have_the_sample_sd():
    import statistics

    from simxent.sweep import choose, markdown_table, summarise

    rows = [{"k": 1, "val_knn_top1": 0.5, "val_linear_top1": 0.6},
            {"k": 2, "val_knn_top1": 0.5, "val_linear_top1": 0.6},
            {"k": 2, "val_knn_top1": 0.7, "val_linear_top1": 0.9}]
    one, two = summarise(rows, ["k"])
    assert one["seeds"] == 1 and one["val_knn_top1_sd"] is None and one["val_linear_top1_sd"] is None
    assert two["val_knn_top1_sd"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert markdown_table([one], ["k", "val_knn_top1_sd"])[-1] == "| 1 | - |"
    # Settings of one seed beside settings of two (grid values that label alike): the spread pools the latter.
    chosen = choose([one, two], "knn_top1")
    assert chosen["setting"] is two and chosen["noise_margin"] == pytest.approx(2 * two["val_knn_top1_sd"])


@pytest.mark.parametrize("given", ["override", "grid"])
@pytest.mark.parametrize("key,value,option", [("data.train", "shapes/train", "--train"), ("train.seed", "3", "--seeds"),
                                              ("out", "elsewhere", "--out"), ("train.max_time", "60", "--minutes")])
def test_what_the_sweep_sets_is_refused_as_an_override_or_a_grid_key(tmp_path, given, key, value, option):
    """data.train given by the user would pretrain on the validation part too, train.seed would make the seeds
    one run repeated, out would be ignored, and train.max_time would cut an equal-steps budget."""
    overrides, grid = [*BASE], {"loss.temperature": [0.1]}
    if given == "override":
        overrides.append(f"{key}={value}")
    else:
        grid[key] = [value]
    where = "an override" if given == "override" else "--grid"
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} \({where}\): the sweep sets it in every run; "
                                          rf"use {option}$"):
        sweep(None, grid, str(tmp_path / "train"), str(tmp_path / "test"), tmp_path / "sweep",
              SweepOptions(val_fraction=0.25, seeds=2), overrides)
    assert not (tmp_path / "sweep").exists()


def test_a_train_seed_grid_names_each_runs_seed_with_one_seed_per_setting(tmp_path):
    runs = sweep_module.plan_runs(None, {"train.seed": [0, 1]}, tmp_path, SweepOptions(), BASE)
    assert [(combo, cfg.train.seed) for combo, _, cfg in runs] == [({"train.seed": 0}, 0), ({"train.seed": 1}, 1)]


def test_a_test_folder_sharing_images_with_train_or_a_bad_probe_is_refused_before_training(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    out, grid = tmp_path / "sweep", {"loss.temperature": [0.1]}
    with pytest.raises(ConfigError, match=r"^--test .*shapes/train shares 40 of its 40 images with --train"):
        sweep(None, grid, str(shapes / "train"), str(shapes / "train"), out, SweepOptions(val_fraction=0.25), BASE)
    with pytest.raises(ConfigError, match=r"^ProbeOptions\.epochs must be an integer >= 1, got 0"):
        sweep(None, grid, str(shapes / "train"), str(shapes / "test"), out, SweepOptions(val_fraction=0.25), BASE,
              ProbeOptions(epochs=0))
    assert not (out / "temperature=0.1").exists()


def test_a_resumed_sweep_refuses_runs_trained_with_other_settings(tmp_path, monkeypatch):
    """train.resume=auto reuses a finished run as it is: with another optim.lr its scores would be reported
    under an lr it never trained with. More epochs (continuing it) and other monitoring are fine."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    out, args = tmp_path / "sweep", (str(shapes / "train"), str(shapes / "test"))
    options, probe, grid = SweepOptions(val_fraction=0.25), ProbeOptions(epochs=1, knn_k=3), {"loss.temperature": [0.1]}
    sweep(None, grid, *args, out, options, [*BASE, "train.resume=auto"], probe, progress=False)
    with pytest.raises(ConfigError, match=r"^--out: .*temperature=0.1/seed=0 was trained with optim.lr=0.1, this "
                                          r"sweep gives it 0.05 \(1 setting\(s\) differ\)"):
        sweep(None, grid, *args, out, options, [*BASE, "train.resume=auto", "optim.lr=0.05"], probe, progress=False)
    # The same sweep by an absolute --out (its data.train and out are spelt otherwise) is the same sweep.
    monkeypatch.chdir(tmp_path)
    again = sweep(None, grid, *args, Path("sweep"), options, [*BASE, "train.resume=auto"], probe, progress=False)
    assert len(again["runs"]) == 1
    again = sweep(None, grid, *args, out, options, [*BASE, "train.resume=auto", "train.log_every=1"], probe,
                  progress=False)
    assert len(again["runs"]) == 1
    # Any setting of what the run learns, not only the recipe's: its model's view batches, its decoding.
    for changed in ("model.view_batches=separate", "data.decode_size=32"):
        with pytest.raises(ConfigError, match=f"was trained with {changed.split('=')[0]}="):
            sweep(None, grid, *args, out, options, [*BASE, "train.resume=auto", changed], probe, progress=False)


@pytest.mark.parametrize("overrides, grid, said", [
    ([], {"loss.temperature": [0.1], "train.resume": ["auto"]},
     "--grid train.resume: it says how runs start, not what they learn; give it as an override, before --grid"),
    (["train.resume=runs/x/last.pt"], {"loss.temperature": [0.1]},
     "train.resume=runs/x/last.pt: a sweep resumes each run from its own folder; give train.resume=auto"),
])
def test_run_control_keys_in_the_grid_or_a_shared_checkpoint_are_refused(tmp_path, overrides, grid, said):
    """An override written after --grid's values is read as a grid key: the runs would go to new folders and
    train again; one checkpoint resumed by every run would score them all alike."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=1, size=16)
    with pytest.raises(ConfigError, match=re.escape(said)):
        sweep(None, grid, str(shapes / "train"), str(shapes / "test"), tmp_path / "sweep", SweepOptions(),
              [*BASE, *overrides], progress=False)


def test_runs_are_scored_with_the_cache_folder_their_config_names(tmp_path):
    """data.cache_dir moved off a small home disk: the validation and test folders' decodes go there too, not
    to the default cache."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    mine = tmp_path / "mine"
    sweep(None, {"loss.temperature": [0.1]}, str(shapes / "train"), str(shapes / "test"), tmp_path / "sweep",
          SweepOptions(val_fraction=0.25), [*BASE, f"data.cache_dir={mine}"], ProbeOptions(epochs=1, knn_k=3),
          progress=False)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # the default (SIMXENT_CACHE of every test)
    assert len(list(mine.rglob("*.npy"))) >= 3  # pretraining's train part; the probe's train part, val and test


def test_a_diverging_setting_is_left_out_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Too high an lr for one setting: its runs are rows without scores, the other settings train, are scored
    and chosen from; when every setting diverges, the sweep says so instead of choosing."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    args, real = (str(shapes / "train"), str(shapes / "test")), sweep_module.pretrain
    unstable = {"0.2"}

    def pretrain(cfg, progress):
        if cfg.out.split("temperature=")[1].split("/")[0] in unstable:
            raise TrainingError("loss or gradients were non-finite for 5 steps in a row")
        return real(cfg, progress=progress)

    monkeypatch.setattr(sweep_module, "pretrain", pretrain)
    grid, options = {"loss.temperature": [0.1, 0.2, 0.5]}, SweepOptions(val_fraction=0.25, seeds=2)
    results = sweep(None, grid, *args, tmp_path / "sweep", options, BASE, ProbeOptions(epochs=1, knn_k=3),
                    progress=False)
    diverged = [r["loss.temperature"] for r in results["runs"] if r["diverged"]]
    assert diverged == [0.2, 0.2] and results["chosen"]["setting"]["loss.temperature"] in (0.1, 0.5)
    assert [s["val_knn_top1_mean"] is None for s in results["settings"]] == [False, True, False]
    assert len(results["chosen"]["test"]) == 2 and (tmp_path / "sweep" / "sweep.png").is_file()
    unstable.update({"0.1", "0.5"})
    with pytest.raises(TrainingError, match="every setting of the sweep diverged"):
        sweep(None, grid, *args, tmp_path / "all", options, BASE, ProbeOptions(epochs=1, knn_k=3), progress=False)


def test_an_extended_sweep_says_when_the_test_folder_was_scored_for_another_setting(tmp_path, monkeypatch):
    """Extended with a better value, the sweep scores the test folder for a second setting: results.md says so,
    once per setting however often the sweep is run again. A budget other than its runs' is refused."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    out, args = tmp_path / "sweep", (str(shapes / "train"), str(shapes / "test"))
    val = {"0.1": 0.5, "0.2": 0.7}  # validation kNN by temperature: 0.2 wins once it is swept

    def scores(cfg, train_dir, eval_dir, probe, name, progress):
        t = Path(cfg.out).parent.name.split("=")[1]
        return {"knn_top1": val[t] if name == "val" else 0.6, "linear_top1": 0.6}

    monkeypatch.setattr(sweep_module, "evaluate_run", scores)
    overrides, options = [*BASE, "train.resume=auto"], SweepOptions(val_fraction=0.25)
    first = sweep(None, {"loss.temperature": [0.1]}, *args, out, options, overrides, progress=False)
    assert first["tested_before"] == [] and "Earlier sweeps" not in (out / "results.md").read_text()
    for _ in range(2):
        again = sweep(None, {"loss.temperature": [0.1, 0.2]}, *args, out, options, overrides, progress=False)
        assert again["chosen"]["setting"]["loss.temperature"] == 0.2
        assert ("Earlier sweeps into this --out also scored the test folder, for: loss.temperature=0.1. It has "
                "been looked at for 2 settings") in (out / "results.md").read_text()
    assert again["tested_before"] == [{"loss.temperature": 0.1}, {"loss.temperature": 0.2}]
    with pytest.raises(ConfigError, match=r"was trained with train.epochs=1, this sweep gives it 2"):
        sweep(None, {"loss.temperature": [0.1]}, *args, out, options, [*overrides, "train.epochs=2"], progress=False)


def test_an_out_inside_the_train_or_test_folder_or_a_tiny_subset_is_refused_before_anything(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    with pytest.raises(ConfigError, match=r"^--subset 5 leaves fewer than two images for each of the 5 classes"):
        sweep(None, {"loss.temperature": [0.1]}, str(shapes / "train"), str(shapes / "test"), tmp_path / "s",
              SweepOptions(val_fraction=0.25, subset=5), BASE)
    for folder in ("train", "test"):
        with pytest.raises(ConfigError, match=rf"^--out .*shapes/{folder}/sweep is inside --{folder} "):
            sweep(None, {"loss.temperature": [0.1]}, str(shapes / "train"), str(shapes / "test"),
                  shapes / folder / "sweep", SweepOptions(val_fraction=0.25), BASE)
        assert not (shapes / folder / "sweep").exists()
