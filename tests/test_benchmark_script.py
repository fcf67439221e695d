"""Helpers of scripts/benchmark.py, against FLOP counts written from the layer's formula."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def test_counted_flops_of_a_linear_layer_follow_its_formula(load_script):
    counted_flops = load_script("benchmark").counted_flops
    batch, d_in, d_out = 6, 5, 7
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(batch, d_in)
    assert counted_flops(lambda: layer(x)) == 2 * d_in * d_out * batch
    # Backward: dL/dW = g^T x (one product of the same size); dL/dx = g W only when x needs a gradient.
    assert counted_flops(lambda: layer(x).sum().backward()) == 2 * (2 * d_in * d_out * batch)
    x.requires_grad_()
    assert counted_flops(lambda: layer(x).sum().backward()) == 3 * (2 * d_in * d_out * batch)


def test_counted_flops_of_a_convolution_follow_its_formula(load_script):
    counted_flops = load_script("benchmark").counted_flops
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    # Every output pixel of every output channel: one multiply-add per input channel and kernel tap.
    assert counted_flops(lambda: conv(x)) == 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)


def test_encoder_forward_flops_are_the_convnet_and_head_formula(load_script):
    """The benchmark's forward pass of the convnet + head at 16 px: each 3x3 convolution's
    2 * (2B * H_out * W_out * c_out) * (c_in * 9), then the head's two Linear layers, counted by hand."""
    from simxent.config import load_config
    from simxent.models import CONVNETS

    script = load_script("benchmark")
    cfg = load_config("cpu", ["data.image_size=16", "model.head_hidden=32", "model.head_out=16"])
    batch, side, c_in, expected = 3, 16, 3, 0
    for c_out, stride in zip(CONVNETS[cfg.model.backbone], (1, 2, 2, 2)):
        side //= stride
        expected += 2 * (2 * batch * side * side * c_out) * (c_in * 9)
        c_in = c_out
    expected += 2 * (2 * batch) * (c_in * 32 + 32 * 16)
    passes = script.encoder_passes(cfg, torch.device("cpu"), None, batch, channels_last=True, compile=False)
    assert script.counted_flops(passes["forward"]) == expected


def test_encoder_rows_relate_time_flop_and_ceiling(monkeypatch, one_thread, load_script):
    """Each variant gives a forward and a forward+backward row; TFLOP/s are the counted FLOP over the time,
    their share is over the ceiling of the row's precision, images/s are B over the time."""
    from simxent.config import load_config

    script = load_script("benchmark")
    monkeypatch.setattr(script, "STEP_VARIANTS", (script.StepVariant("a", batch=2),
                                                  script.StepVariant("b", batch=2, channels_last=False, float32=True)))
    cfg = load_config("cpu", ["data.image_size=8", "augment.view_ratio=1", "model.head_hidden=8", "model.head_out=4",
                             "train.precision=fp32"])
    rows = script.encoder_rows("convnet", cfg, torch.device("cpu"), None, {"float32": 2.0})
    assert [(r["variant"], r["pass"]) for r in rows] == [("a", "forward+backward"), ("a", "forward"),
                                                         ("b", "forward+backward"), ("b", "forward")]
    passes = script.encoder_passes(cfg, torch.device("cpu"), None, 2, channels_last=True, compile=False)
    for row in rows:
        assert row["gflop"] * 1e9 == script.counted_flops(passes[row["pass"]])
        assert row["tflops"] * 1e12 == pytest.approx(row["gflop"] * 1e9 / (row["ms"] / 1e3))
        assert row["share_of_ceiling"] == pytest.approx(row["tflops"] / 2.0)
        assert row["images_per_s"] == pytest.approx(2 / (row["ms"] / 1e3))


def test_op_profile_counts_each_op_per_step_and_shares_sum_to_one(one_thread, load_script):
    """Two products and a ReLU per step, over 3 profiled steps: each operator's calls per step, rows largest
    first, the rest as one row, shares adding up to the whole. Nothing depends on which op takes longer (a
    preempted ReLU may)."""
    script = load_script("benchmark")
    a = torch.randn(256, 256)

    def step():
        torch.relu(torch.mm(torch.mm(a, a), a))

    rows = script.op_profile(step, torch.device("cpu"), steps=3, top=50)  # more rows than ops: every op listed
    by_op = {r["op"]: r for r in rows}
    assert by_op["aten::mm"]["calls_per_step"] == 2 and by_op["aten::relu"]["calls_per_step"] == 1
    ms = [r["ms_per_step"] for r in rows[:-1]]
    assert ms == sorted(ms, reverse=True)
    assert rows[-1] == {"op": "(every other op)", "calls_per_step": 0, "ms_per_step": 0, "share": 0.0}
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    top = script.op_profile(step, torch.device("cpu"), steps=3, top=1)
    assert len(top) == 2 and top[1]["op"] == "(every other op)" and top[1]["calls_per_step"] >= 2
    assert sum(r["share"] for r in top) == pytest.approx(1.0)


def test_quality_decodes_inside_its_time_and_applies_the_overrides(tmp_path, monkeypatch, one_thread, load_script):
    """The quality run decodes into its own fresh cache (so the minutes include decoding), takes the overrides
    after the preset, and scores the pretrained encoder beside an untrained one on DATA/test."""
    import simxent.train
    from simxent.demo import CLASSES, make_shapes

    script = load_script("benchmark")
    data = make_shapes(tmp_path / "shapes", train_per_class=6, test_per_class=3, size=16)
    seen = []
    real = simxent.train.pretrain

    def spy(cfg, **kwargs):
        seen.append(cfg)
        summary = real(cfg, **kwargs)
        seen.append(sorted(p.suffix for p in Path(cfg.data.cache_dir).rglob("*.npy")))
        return summary

    monkeypatch.setattr(simxent.train, "pretrain", spy)
    overrides = ("data.image_size=16", "data.workers=0", "train.batch_size=8", "train.epochs=1",
                 "model.head_hidden=16", "train.precision=fp32", "optim.lr=0.003")
    [row] = script.bench_quality(None, None, data, minutes=5, overrides=overrides)
    cfg, cached = seen
    assert cfg.optim.lr == 0.003 and cfg.train.max_time == 300 and cfg.train.batch_size == 8
    assert Path(cfg.data.cache_dir).parent == Path(cfg.out) and cached == [".npy"]
    assert row["preset"] == "cpu " + " ".join(overrides)
    assert row["images"] == row["steps"] * 8 == 6 * len(CLASSES) // 8 * 8  # one epoch of the train folder
    assert all(0 <= row[k] <= 1 for k in ("knn_top1", "knn_top1_random_init", "linear_top1"))


def test_the_bare_step_runs_the_presets_views(load_script):
    """The pipeline's floor times the views the preset trains on: two at 3/4 of 32 px, two multi-crop at half
    that; a preset without multi-crop gets one batch of two views at data.image_size."""
    from simxent.config import load_config

    script = load_script("benchmark")
    views = script.preset_views(load_config("cpu"), torch.device("cpu"), batch=3)
    assert [tuple(v.shape) for v in views] == [(6, 3, 24, 24), (6, 3, 12, 12)]
    views = script.preset_views(load_config("cifar10"), torch.device("cpu"), batch=3)
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)]


def test_convs_rows_follow_the_cpu_preset_convnet(one_thread, load_script):
    """One row per dtype, convolution and size: the 24 px views (3/4 of 32), the 12 px multi-crop views and
    the 32 px evaluation size through the convnet's strides, output positions by the convolution's size
    formula, and the path model.matmul_convs takes in training (products on outputs of at most 16 in bf16,
    9 in float32)."""
    from simxent.config import load_config
    from simxent.models import CONVNETS

    rows = load_script("benchmark").bench_convs(torch.device("cpu"), None, batch=2)
    expected = []
    for dtype, limit in (("bfloat16", 16), ("float32", 9)):
        for size in (24, 12, 32):
            side, c_in = size, 3
            for c_out, stride in zip(CONVNETS[load_config("cpu").model.backbone], (1, 2, 2, 2)):
                out = (side + 2 - 3) // stride + 1
                expected.append((dtype, size, f"{c_in}->{c_out}/{stride}", f"{side}x{side}", out * out,
                                 out * out <= limit))
                side, c_in = out, c_out
    assert [(r["dtype"], r["view_px"], r["conv"], r["input"], r["output_positions"], r["matmul_convs"])
            for r in rows] == expected
    # bf16: the last convolution at every size (3x3, 2x2, 4x4 outputs) and the third at 12 px (3x3);
    # float32: the same but the 4x4 at 32 px
    assert sum(r["matmul_convs"] for r in rows) == 4 + 3
    assert all(r["onednn_ms"] > 0 and r["matmul_ms"] > 0 for r in rows)


def test_pipeline_refuses_an_unknown_flag_before_any_work(load_script):
    """A mistyped flag (here ``onednm``) stops the command with the entry and the flags it knows, rather
    than timing a loop the user did not ask for."""
    script = load_script("benchmark")
    with pytest.raises(SystemExit, match=r"cpu:128:onednm: expected preset:batch\[:stream\]\[:compile\]\[:onednn\]"
                                         r"\[:fp32\]\[:pairs\]; unknown flags \['onednm'\]"):
        script.bench_pipeline(torch.device("cpu"), None, "no-such-folder", 1.0, "cpu:128:onednm", 0)


def test_a_streamed_loop_of_the_cpu_preset_is_timed_with_pairs_of_views(load_script):
    """Streaming makes two full-size views per image: the cpu preset's multi-crop views are refused for it,
    by name, and the ``pairs`` flag times its loop without them."""
    from simxent.config import ConfigError

    script = load_script("benchmark")
    with pytest.raises(ConfigError, match="augment.small_views=0"):
        script.pipeline_config("cpu:128:stream", "data", 0)
    cfg = script.pipeline_config("cpu:128:stream:pairs:fp32", "data", 3)
    assert (cfg.data.stream, cfg.augment.small_views, cfg.train.precision) == (True, 0, "fp32")
    assert cfg.train.batch_size == 128
    assert (cfg.data.workers, cfg.data.train, cfg.train.bn_recalibration) == (3, "data/train", 0)
    cached = script.pipeline_config("cpu:256", "data", 0)
    assert (cached.data.stream, cached.augment.small_views, cached.model.matmul_convs) == (False, 2, True)


@pytest.mark.parametrize("args, said", [
    (["--only", "loss,pipeline", "--pipeline", "cpu:128:onednm"], "--pipeline cpu:128:onednm: expected preset:batch"),
    (["--only", "loss,pipeline", "--pipeline", "cpu:128,cpu:128:stream"], "set augment.small_views=0"),
    (["--only", "loss,quality", "--simxent-overrides", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["--only", "loss,ceiling", "--ceiling-encoders", "resnet81"], "--ceiling-encoders: resnet81 is not one of"),
])
def test_every_sections_options_are_checked_before_the_first_section(args, said, monkeypatch, capsys, load_script):
    script = load_script("benchmark")
    monkeypatch.setattr(script, "bench_loss", lambda *a: pytest.fail("a section ran before the options were checked"))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *args])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_a_failing_section_keeps_the_results_of_those_before_it(tmp_path, monkeypatch, load_script):
    script = load_script("benchmark")
    monkeypatch.setattr(script, "bench_loss", lambda *a: [{"N": 256, "speedup": 1.5}])
    monkeypatch.setattr(script, "bench_augment", lambda *a: 1 / 0)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--only", "loss,augment", "--out", str(tmp_path / "r")])
    with pytest.raises(ZeroDivisionError):
        script.main()
    assert json.loads((tmp_path / "r.json").read_text())["sections"] == {"loss": [{"N": 256, "speedup": 1.5}]}
    assert "| 256 | 1.5 |" in (tmp_path / "r.md").read_text()


def test_norms_rows_follow_the_cpu_preset_convnet(monkeypatch, one_thread, load_script):
    """One row per BatchNorm + ReLU and training size: the 24 px views and the 12 px multi-crop views
    through the convnet's strides (24, 12, 6, 3 and 12, 6, 3, 2). torch.compile is left out here (its
    inductor build takes seconds per shape): the compiled module is then a copy of the eager one, so both
    times are of the same work."""
    from simxent.config import load_config
    from simxent.models import CONVNETS

    script = load_script("benchmark")
    monkeypatch.setattr(script.torch, "compile", lambda module, **_: module)
    rows = script.bench_norms(torch.device("cpu"), None, batch=2)
    expected = []
    for size in (24, 12):
        side = size
        for width, stride in zip(CONVNETS[load_config("cpu").model.backbone], (1, 2, 2, 2)):
            side = (side - 1) // stride + 1
            expected.append((size, width, f"{side}x{side}"))
    assert [(r["view_px"], r["channels"], r["map"]) for r in rows] == expected
    assert all(r["eager_ms"] > 0 and r["compiled_ms"] > 0 and r["compile_s"] > 0 for r in rows)


def test_a_reader_that_leaves_ends_the_benchmark_quietly():
    """``benchmark.py | head``: the benchmark ends at its next line, as ls does, without a traceback."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--only", "loss"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()  # before its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == -signal.SIGPIPE and "Traceback" not in err, err


def test_markdown_aligns_rows_of_different_keys_and_says_an_empty_section(load_script):
    """A streamed pipeline row has a column a cached one lacks: each value stays under its own header."""
    script = load_script("benchmark")
    text = script.markdown({"sections": {"pipeline": [{"preset": "cpu", "loop": 2.0},
                                                      {"data_images_per_s": 2763.0, "preset": "imagenet", "loop": 5.5}],
                                         "lightly": []}})
    assert "| preset | loop | data_images_per_s |\n|---|---|---|\n| cpu | 2 |  |\n| imagenet | 5.5 | 2763 |" in text
    assert "### lightly\n\n(no rows)" in text


def test_the_loops_wall_rate_counts_the_time_between_its_logged_intervals(tmp_path, monkeypatch, load_script):
    """The median of the logged rates leaves out what happens between epochs (the epoch-end checkpoint); the
    wall rate is the images of the steps after the first logged interval over the wall time they took."""
    import simxent.train
    from torch.utils.tensorboard import SummaryWriter

    from simxent.config import load_config

    def fake_pretrain(cfg, progress):
        with SummaryWriter(str(Path(cfg.out) / "tb")) as w:
            for step, rate, t in ((4, 10.0, 100.0), (8, 20.0, 101.0), (12, 30.0, 102.0), (16, 40.0, 105.0)):
                w.add_scalar("train/images_per_s", rate, step, walltime=t)

    monkeypatch.setattr(simxent.train, "pretrain", fake_pretrain)
    script = load_script("benchmark")
    median, intervals, wall = script.loop_images_per_s(load_config(None, ["train.batch_size=8"]), 1.0)
    assert (median, intervals) == (30.0, 3)
    assert wall == pytest.approx((16 - 8) * 8 / (105.0 - 101.0))
