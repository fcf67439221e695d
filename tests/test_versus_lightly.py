"""The benchmark's ``lightly`` section without lightly: its table and last line from made-up results, how
lightly_peer.py's snapshots are scored, simxent's equal-epochs points, and that the kNN which scores every
encoder is the training monitor's. lightly_peer.py itself runs only where a Python with lightly exists."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_RUN, write_image
from simxent.config import load_config
from simxent.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
linear_eval_module = importlib.import_module("simxent.linear_eval")  # simxent.linear_eval is the function
train_module = importlib.import_module("simxent.train")


@pytest.fixture
def versus(load_script):
    return load_script("versus_lightly")


@pytest.fixture
def split_folder(tmp_path):
    """data/train (24 images per class) and data/test (8 per class), two classes, 16 px."""
    root = tmp_path / "data"
    for split, n, offset in (("train", 24, 0), ("test", 8, 1000)):
        for c in "ab":
            for i in range(n):
                write_image(root / split / c / f"{i}.png", seed=offset + 100 * (c == "b") + i)
    return root


def fake_side(marks, rates, knn):
    points = [{"mark": m, "step": 10 * m, "epochs": m / 4, "images_per_s": r} for m, r in zip(marks, rates)]
    scores = [{"knn_top1": k, "linear_top1": k + 0.05} for k in knn]
    return points, scores


def test_table_and_last_line_from_made_up_results(versus, monkeypatch, load_script):
    (lp, ls), (sp, ss) = fake_side([2, 5, 10], [100.0, 110.0, 120.0], [0.30, 0.40, 0.50]), \
        fake_side([2, 5, 10], [200.0, 210.0, 220.0], [0.45, 0.55, 0.60])
    rows = versus.versus_rows({"lightly": lp, "simxent": sp}, {"lightly": ls, "simxent": ss}, "minutes")
    assert rows[1] == {"minutes": 5, "lightly_images_per_s": 110.0, "lightly_epochs": 1.25, "lightly_knn_top1": 0.40,
                       "lightly_linear_top1": pytest.approx(0.45), "simxent_images_per_s": 210.0,
                       "simxent_epochs": 1.25, "simxent_knn_top1": 0.55, "simxent_linear_top1": pytest.approx(0.60)}
    benchmark = load_script("benchmark")
    text = benchmark.markdown({"sections": {"lightly": rows}})
    lines = text.strip().splitlines()
    assert lines[0] == "### lightly"
    assert lines[2] == ("| minutes | lightly_images_per_s | lightly_epochs | lightly_knn_top1 | lightly_linear_top1 | "
                        "simxent_images_per_s | simxent_epochs | simxent_knn_top1 | simxent_linear_top1 |")
    assert lines[4] == "| 2 | 100 | 0.5 | 0.3 | 0.35 | 200 | 0.5 | 0.45 | 0.5 |"
    assert lines[-1] == "First mark reaching lightly's kNN top-1 at 10 min (0.5000): lightly 10 min, simxent 5 min."
    rows = [{"epoch": e, **{k: v for k, v in r.items() if k != "minutes"}} for e, r in zip((1, 2, 3), rows)]
    assert versus.reaching_line(rows) == ("First epoch reaching lightly's kNN top-1 at epoch 3 (0.5000): lightly "
                                          "epoch 3, simxent epoch 2.")


def test_rows_keep_only_marks_both_sides_reached(versus):
    lp, ls = fake_side([1, 2], [1.0, 2.0], [0.1, 0.2])
    sp, ss = fake_side([1, 2, 3], [1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    rows = versus.versus_rows({"lightly": lp, "simxent": sp}, {"lightly": ls, "simxent": ss}, "epoch")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert versus.reaching_line([]) == "No mark was reached by both sides."


@pytest.mark.parametrize("lightly_knn, simxent_knn, first", [
    ([0.3, 0.4, 0.5], [0.2, 0.5, 0.6], {"lightly": 10, "simxent": 5}),  # equal to the target counts
    ([0.3, 0.4, 0.5], [0.2, 0.3, 0.49], {"lightly": 10, "simxent": None}),  # never
    ([0.6, 0.4, 0.5], [0.5, 0.1, 0.1], {"lightly": 2, "simxent": 2}),  # lightly was higher earlier
])
def test_first_mark_reaching_lightlys_last_knn(versus, lightly_knn, simxent_knn, first):
    rows = [{"minutes": m, "lightly_knn_top1": a, "simxent_knn_top1": b}
            for m, a, b in zip((2, 5, 10), lightly_knn, simxent_knn)]
    assert versus.first_reaching(rows) == {"key": "minutes", "target": lightly_knn[-1], "at": 10, **first}
    if first["simxent"] is None:
        assert versus.reaching_line(rows).endswith("simxent not reached.")


def reference_features(encoder, folder: Path) -> torch.Tensor:
    """Features of every image of ``folder/<class>/`` in sorted order, decoded with PIL and normalised
    with ImageNet's mean and std, in float32."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = torch.stack([torch.tensor(np.array(Image.open(f).convert("RGB"))).float() / 255
                     for f in sorted(folder.rglob("*.png"))])
    with torch.no_grad():
        return encoder.eval()(((x - mean) / std).permute(0, 3, 1, 2))


def test_a_state_dict_saved_like_lightly_peer_is_scored_with_the_cpu_presets_encoder(split_folder, tmp_path,
                                                                                     monkeypatch, load_script):
    from simxent.cli import linear_eval_main
    from simxent.config import load_config

    peer = load_script("lightly_peer")
    torch.manual_seed(3)
    encoder, model = peer.cpu_preset_model(16)
    with torch.no_grad():  # weights and statistics no fresh convnet has, so that a load that failed is seen
        for p in [t for t in encoder.state_dict().values() if t.is_floating_point()]:
            p.mul_(1 + 0.5 * torch.rand_like(p))
    peer.save_encoder(encoder, tmp_path / "epoch-1.pt")
    seen = {}

    def knn_spy(bank, bank_labels, query, *args):
        seen.update(bank=bank, query=query)
        return knn_scores(bank, bank_labels, query, *args)

    knn_scores = linear_eval_module.knn_scores
    monkeypatch.setattr(linear_eval_module, "knn_scores", knn_spy)
    out = tmp_path / "eval.json"
    name = load_config("cpu").model.backbone  # what the peer trains and versus_lightly.score names
    assert linear_eval_main(["--backbone", name, "--checkpoint", str(tmp_path / "epoch-1.pt"), "--image-size",
                             "16", "--precision", "fp32", "--train", str(split_folder / "train"), "--test",
                             str(split_folder / "test"), "--epochs", "2", "--json", str(out), "--out",
                             str(tmp_path / "eval"), "--no-progress"]) == 0
    # The kNN bank and queries are the saved encoder's features of the train and test images (files in
    # sorted order), ImageNet-normalised.
    torch.testing.assert_close(seen["bank"], reference_features(encoder, split_folder / "train"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["query"], reference_features(encoder, split_folder / "test"), rtol=1e-4, atol=1e-4)
    results = json.loads(out.read_text())
    assert results["backbone"] == name == "convnet_slim" and results["image_size"] == 16
    assert {"knn", "linear"} <= results["pretrained"].keys()


def test_the_monitors_knn_is_linear_evals_on_the_same_checkpoint(split_folder, tmp_path, monkeypatch):
    calls = []

    def spy(module):
        real = module.knn_scores

        def knn(*args, **kwargs):
            calls.append((args, kwargs, real(*args, **kwargs)))
            return calls[-1][2]
        monkeypatch.setattr(module, "knn_scores", knn)

    spy(train_module)
    spy(linear_eval_module)
    cfg = load_config("cpu", TINY_RUN + [f"data.train={split_folder / 'train'}", f"data.val={split_folder / 'test'}",
                                         f"out={tmp_path / 'run'}", "train.epochs=1", "eval.every=1",
                                         "eval.projector=0"])
    summary = pretrain(cfg, progress=False)
    results = linear_eval_module.linear_eval(summary["checkpoint"], split_folder / "train", split_folder / "test",
                                             linear_eval_module.ProbeOptions(epochs=1), progress=False,
                                             out=tmp_path / "eval")
    (monitor_args, monitor_kw, monitor_scores), (eval_args, eval_kw, eval_scores) = calls
    assert monitor_args[3:] == eval_args[3:] == (2, 200, 0.1)  # classes, k, temperature
    for ours, theirs in zip(monitor_args[:3], eval_args[:3]):  # bank, its labels, queries
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(monitor_scores, eval_scores, rtol=0, atol=0)
    assert summary["knn_top1"][-1]["top1"] == results["pretrained"]["knn"]["top1"]


def test_simxent_side_at_equal_epochs_gives_a_point_per_epoch(versus, split_folder, tmp_path):
    v = versus.Versus(split_folder, tmp_path / "work", image_size=16, epochs=2, simxent_overrides=tuple(TINY_RUN))
    cfg = versus.simxent_config(v, tmp_path / "run")
    assert (cfg.train.epochs, cfg.train.keep_checkpoints, cfg.train.max_time, cfg.optim.lr) == (2, 2, 0, 0.1)
    timed = versus.simxent_config(v, tmp_path / "run", minutes=1.5)
    assert (timed.train.max_time, timed.train.budget_schedule, timed.eval.every) == (90, True, 0)
    points = versus.run_simxent_epochs(v)
    assert [(p["mark"], p["step"], p["epochs"]) for p in points] == [(1, 3, 1.0), (2, 6, 2.0)]  # 48 images / 16
    assert 0 < points[0]["seconds"] < points[1]["seconds"]
    assert [p["checkpoint"].parent for p in points] == [tmp_path / "work" / "simxent-2epochs" / "checkpoints"] * 2


def lightly_python():
    """A Python that imports lightly: this one, or the benchmark's venv ($SIMXENT_LIGHTLY_VENV or the default)."""
    if importlib.util.find_spec("lightly"):
        return Path(sys.executable)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import versus_lightly
    finally:
        sys.path.pop(0)
    venv = Path(os.environ.get("SIMXENT_LIGHTLY_VENV", versus_lightly.DEFAULT_VENV))
    return versus_lightly.venv_python(venv) if versus_lightly.has_lightly(versus_lightly.venv_python(venv)) else None


def test_lightly_peer_trains_an_epoch_and_saves_a_scorable_encoder(tmp_path, monkeypatch, load_script):
    python = lightly_python()
    if python is None:
        pytest.skip("lightly is not installed here (set SIMXENT_LIGHTLY_VENV to a venv that has it)")
    for i in range(260):  # one batch of 256, the rest dropped
        write_image(tmp_path / "train" / "ab"[i % 2] / f"{i}.png", seed=i)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([str(python), str(ROOT / "scripts" / "lightly_peer.py"), "--train", str(tmp_path / "train"),
                    "--out", str(tmp_path / "out"), "--image-size", "16", "--epochs", "1"], check=True, env=env)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["steps_per_epoch"] == 1 and progress["marks"] == []
    assert [(e["epoch"], e["step"], e["file"]) for e in progress["epochs"]] == [(1.0, 1, "epoch-1.pt")]
    trained = torch.load(tmp_path / "out" / "epoch-1.pt", weights_only=True)
    peer = load_script("lightly_peer")
    torch.manual_seed(0)  # the script's seed: its encoder before the step
    initial = peer.cpu_preset_model(16)[0].state_dict()
    assert trained.keys() == initial.keys()
    assert not torch.equal(trained["features.0.0.weight"], initial["features.0.0.weight"])  # a step was taken
