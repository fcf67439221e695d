"""The sweep runs every combination as a normal run and tabulates what it measured."""
import json

import pytest

from simxent.config import ConfigError
from simxent.demo import make_shapes
from simxent.linear_eval import ProbeOptions
from simxent.sweep import parse_grid, sweep


def test_grid_parsing():
    assert parse_grid(["loss.temperature=0.1,0.5", "optim.name=sgd,adamw"]) == {
        "loss.temperature": [0.1, 0.5], "optim.name": ["sgd", "adamw"]}
    # a comma inside brackets belongs to a list value, not to the grid
    assert parse_grid(["augment.crop_scale=[0.2,1.0],[0.08, 1.0]"]) == {
        "augment.crop_scale": [[0.2, 1.0], [0.08, 1.0]]}
    with pytest.raises(ConfigError, match="expected key=value1"):
        parse_grid(["loss.temperature"])


def test_sweep_runs_each_combination(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=4, size=16)
    base = ["model.backbone=convnet", "model.head_hidden=16", "model.head_out=8", "data.image_size=16",
            "data.workers=0", "train.batch_size=8", "train.epochs=1", "train.max_time=0"]
    with pytest.raises(ConfigError, match="did you mean 'loss.temperature'"):  # checked before any run
        sweep(None, {"loss.temprature": [0.1]}, str(shapes / "train"), str(shapes / "test"), tmp_path / "bad", 0,
              base)
    # a list value too: it reaches the config as a list, and the tables, hparams and plot as text
    rows = sweep(None, {"loss.temperature": [0.1, 0.5], "augment.crop_scale": [[0.5, 1.0]]}, str(shapes / "train"),
                 str(shapes / "test"), tmp_path / "sweep", 0, base, ProbeOptions(epochs=2, knn_k=5), progress=False)
    assert [r["loss.temperature"] for r in rows] == [0.1, 0.5]
    assert [r["augment.crop_scale"] for r in rows] == ["[0.5,1.0]"] * 2
    assert all(r["steps"] == 5 for r in rows)
    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["knn_top1"] for r in saved] == [r["knn_top1"] for r in rows]
    run = tmp_path / "sweep" / "temperature=0.1_crop_scale=[0.5,1.0]"
    assert (run / "checkpoints" / "last.pt").exists()
    assert "crop_scale:\n  - 0.5\n  - 1.0" in (run / "config.yaml").read_text()
    assert "loss.temperature" in (tmp_path / "sweep" / "results.md").read_text()
    assert list((tmp_path / "sweep" / "hparams").rglob("events.out.tfevents.*"))
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_plot_averages_runs_that_share_a_value():
    from simxent.figures import sweep_plots

    rows = [{"optim.name": n, "loss.temperature": t, "knn_top1": k, "linear_top1": k + 0.1}
            for n, t, k in (("sgd", 0.1, 0.2), ("sgd", 0.5, 0.4), ("lars", 0.1, 0.6), ("lars", 0.5, 0.8))]
    fig = sweep_plots(rows, ["optim.name", "loss.temperature"])
    by_name, by_t = (ax.get_lines()[0].get_ydata() for ax in fig.axes[:2])
    assert list(by_name) == pytest.approx([0.7, 0.3])  # lars, sgd (sorted), each averaged over both temperatures
    assert list(by_t) == pytest.approx([0.4, 0.6])


def test_script_takes_overrides_after_the_options(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sweep_script", Path(__file__).parents[1] / "scripts" / "sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = {}

    def fake_sweep(config, grid, train, test, out, minutes, overrides, probe, progress):
        seen.update(config=config, grid=grid, overrides=list(overrides), minutes=minutes)
        (Path(out) / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.md").write_text("table\n")
        return [{}]

    monkeypatch.setattr(script, "sweep", fake_sweep)
    assert script.main(["configs/cpu.yaml", "--train", "a", "--test", "b", "--minutes", "3", "loss.temperature=0.1",
                        "--grid", "augment.crop_scale=[0.2,1.0]", "--out", str(tmp_path), "optim.lr=0.01"]) == 0
    assert seen == {"config": "configs/cpu.yaml", "grid": {"augment.crop_scale": [[0.2, 1.0]]},
                    "overrides": ["loss.temperature=0.1", "optim.lr=0.01"], "minutes": 3.0}
