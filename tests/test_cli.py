"""The commands' argument handling: help with every key, --version, --print-config, other tools' habits,
``python -m simxent``, and the presets found by name from an installed wheel, outside the repository."""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import simxent
from simxent import cli
from simxent.config import Config, load_config, to_dict
from simxent.linear_eval import ProbeOptions

REPO = Path(__file__).resolve().parents[1]


def _flat(tree, prefix=""):
    for k, v in tree.items():
        yield from _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


@pytest.mark.parametrize("command,prog", [(cli.pretrain_main, "simxent-pretrain"),
                                          (cli.linear_eval_main, "simxent-linear-eval"),
                                          (cli.demo_main, "simxent-demo"),
                                          (cli.cache_main, "simxent-cache")])
def test_version_on_every_command(command, prog, capsys):
    with pytest.raises(SystemExit) as e:
        command(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"{prog} {simxent.__version__}\n"


def test_pretrain_help_lists_every_key_with_its_default_and_meaning(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.pretrain_main(["--help"])
    out = capsys.readouterr().out
    listing = out[out.index("\nout: "):]
    flat = dict(_flat(to_dict(Config())))
    key_lines = [line for line in listing.splitlines() if line.startswith(("out:", "  "))]
    assert [line.split(":")[0].strip() for line in key_lines] == [k.split(".")[-1] for k in flat]
    assert all(line.split("  # ")[1].strip() for line in key_lines)  # a meaning on every line
    (tmp_path / "defaults.yaml").write_text(listing)  # the listed defaults are the defaults
    assert load_config(tmp_path / "defaults.yaml") == Config()
    for name in ("cpu", "cifar10", "imagenet", "demo"):
        assert name in out


def test_linear_eval_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.linear_eval_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    out = out[out.index("options:"):]
    d = ProbeOptions()
    for option, value in [("--epochs", d.epochs), ("--lr", d.lr), ("--weight-decay", d.weight_decay),
                          ("--probe-batch-size", d.batch_size), ("--label-smoothing", d.label_smoothing),
                          ("--knn-k", d.knn_k), ("--knn-temperature", d.knn_temperature), ("--seed", d.seed),
                          ("--class-weight", d.class_weight), ("--workers", 2), ("--device", "auto")]:
        help_text = out[out.index(f"{option} "):]
        assert f"(default: {value})" in help_text[:400], option


def test_print_config_is_the_resolved_config_and_runs_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "pretrain", lambda *a, **k: pytest.fail("--print-config must not train"))
    args = ["cpu", "train.epochs=3", "out=010", "data.train=photos #2"]
    assert cli.pretrain_main([*args, "--print-config"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "printed.yaml") == load_config(args[0], args[1:])


def test_a_config_file_in_a_sweep_run_folder_is_a_config_not_an_override(capsys, tmp_path):
    """A sweep names its run folders key=value: their config.yaml, given back to simxent-pretrain, is a file."""
    saved = tmp_path / "temperature=0.1" / "seed=0" / "config.yaml"
    saved.parent.mkdir(parents=True)
    cli.pretrain_main(["cpu", "loss.temperature=0.1", "--print-config"])
    saved.write_text(capsys.readouterr().out)
    assert cli.pretrain_main([str(saved), "train.epochs=3", "--print-config"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "printed.yaml") == load_config("cpu", ["loss.temperature=0.1", "train.epochs=3"])


@pytest.mark.parametrize("args,message", [
    (["+model.foo=1"], "simxent: error: override '+model.foo=1': simxent takes no Hydra '+' prefix"),
    (["data.train", "data/train"], "'data.train' is a config key: write data.train=data/train (key=value, no space)"),
    (["cpu", "train.epochs"], "'train.epochs' is a config key: write train.epochs=VALUE"),
    (["--data.train=x"], "'--data.train=x': config keys take no leading dashes; write data.train=x"),
    (["--train.epochs", "3"], "'--train.epochs': config keys take no leading dashes; write train.epochs=VALUE"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["cpu", "--epochs=1", "out=runs/x"], "'--epochs=1': config keys take no leading dashes; write train.epochs=1"),
    (["a.yaml", "b.yaml"], "one config file or preset name at most"),
    (["cpu", "out="], "simxent: error: override 'out=': empty path; give a folder (out=DIR)"),
])
def test_other_tools_habits_get_simxent_spelling(args, message, capsys):
    try:
        status = cli.pretrain_main([*args, "--print-config"])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2 and message in capsys.readouterr().err


def test_python_m_simxent_dispatches(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"simxent {simxent.__version__}\n"
    assert cli.main([]) == 2 and "usage: python -m simxent" in capsys.readouterr().err
    assert cli.main(["pretrian"]) == 2 and "unknown command 'pretrian'" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "simxent", "pretrain", "demo", "data.train=x",
                          "--print-config"], capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert 'train: "x"' in run.stdout and "batch_size: 128" in run.stdout
    # A convnet's config is read without torchvision, whose import loads torch._dynamo: seconds per command.
    assert "simxent.cli" in run.stderr and " torchvision" not in run.stderr


def test_wheel_ships_the_presets_and_finds_them_by_name_outside_the_repository(tmp_path):
    """Build a wheel from a copy of the sources, install it into a fresh venv that borrows this environment's
    dependencies (a .pth line, so no network), and resolve presets by name from another folder."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((REPO / name).read_bytes())
    import shutil
    shutil.copytree(REPO / "simxent", src / "simxent", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("simxent-*.whl"))
    assert {f"simxent/configs/{n}.yaml" for n in ("cpu", "cifar10", "imagenet", "demo")} <= set(
        zipfile.ZipFile(wheel).namelist())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "borrowed.pth").write_text("\n".join(borrowed) + "\n")  # plain paths: no editable simxent
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, env=env)
    away = tmp_path / "elsewhere"
    away.mkdir()
    check = ("import simxent, simxent.config as c; assert simxent.__file__.startswith(%r), simxent.__file__; "
             "print(c.preset_names()); cfg = c.load_config('demo', ['data.train=shapes']); "
             "print(cfg.model.backbone, cfg.train.batch_size, cfg.data.train)" % site)
    run = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=env, cwd=away)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["['cifar10', 'cpu', 'demo', 'imagenet']", "convnet 128 shapes"]
    run = subprocess.run([str(venv / "bin" / "simxent-pretrain"), "cpu", "data.train=x", "--print-config"],
                         capture_output=True, text=True, env=env, cwd=away)
    assert run.returncode == 0 and "backbone: \"convnet_slim\"" in run.stdout, run.stderr


def test_the_console_summary_of_a_run_without_a_loss():
    """A resume with nothing left to train from a checkpoint that carries no loss (written before checkpoints
    held the run's history), or a run whose every step was skipped: summary.json says null, the console '-'."""
    from simxent.cli import format_summary

    summary = {"checkpoint": "r/checkpoints/last.pt", "epoch": 2, "global_step": 10, "seconds": 3.0,
               "stopped_by_max_time": True, "stopped_by_signal": False, "last_loss": None, "knn_top1": []}
    assert "final loss: -" in format_summary(summary, Path("r")).splitlines()
    assert "final loss: 1.2346" in format_summary({**summary, "last_loss": 1.23456}, Path("r"))
    assert format_summary(summary, Path("runs/odd dir")).endswith("tensorboard --logdir 'runs/odd dir/tb'")


def test_a_reader_that_leaves_early_ends_the_output_quietly():
    """``simxent-search --duplicates 0.9 | head -1``: the pipe closes under a long output. Every command ends
    then as ls does, status 141 (128 + SIGPIPE) and nothing on stderr, not a BrokenPipeError traceback."""
    code = ("import sys; from simxent.cli import report_user_errors, show\n"
            "sys.exit(report_user_errors(lambda: [show(f'pair {i}') for i in range(10 ** 6)] and 0))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"pair 0\n"
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == b""

    def worker_gone():  # a broken pipe that is not stdout's is an error, not the end of the output
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        cli.report_user_errors(worker_gone)


def test_a_reader_that_leaves_a_stdout_without_a_file_descriptor_ends_quietly_too(monkeypatch):
    """Called from Python with stdout replaced (a notebook's, a StringIO): no descriptor to point at
    /dev/null, and still status 141 rather than an UnsupportedOperation traceback."""
    class LeftReader(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", LeftReader())
    assert cli.report_user_errors(lambda: cli.show("pair 0") or 0) == 141


def test_an_error_is_one_write_of_one_line(monkeypatch):
    """Under torchrun both processes may report the same error at once: each line must reach stderr in one
    write, or the two lines join (``... processessimxent: error: ...``)."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", Recorder())

    def refused():
        raise cli.ConfigError("train.batch_size=127 (the global batch) must divide by the 2 processes")

    assert cli.report_user_errors(refused) == 2
    assert writes == ["simxent: error: train.batch_size=127 (the global batch) must divide by the 2 processes\n"]


@pytest.mark.parametrize("command, args", [
    ("linear_eval", ["--checkpoint", "c.pt", "--train", "tr", "--test", "te"]),
    ("embed", ["--checkpoint", "c.pt", "--images", "im", "--out", "o"]),
    ("search", ["--index", "ix", "q.png"]),
    ("demo", []),
    ("cache", ["list"])])
def test_one_process_commands_refuse_torchrun(monkeypatch, capsys, tmp_path, command, args):
    """Under torchrun every process evaluated and wrote the same files: two TensorBoard runs and figure
    folders, one JSON written twice."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert getattr(cli, f"{command}_main")(args) == 2
    assert f"simxent-{command.replace('_', '-')} runs in one process: start it without torchrun, with WORLD_SIZE " \
           f"unset (it is 2;" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("minutes", ["0", "-1", "inf"])
def test_the_demos_minutes_must_be_a_positive_time(tmp_path, capsys, minutes):
    """--minutes 0 became train.max_time=0, no limit: the demo preset's 30 epochs; -1 was refused naming
    train.max_time, a key the user never set."""
    args = ["--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "run"), "--minutes", minutes]
    assert cli.demo_main(args) == 2
    assert f"--minutes must be a number of minutes > 0, got {float(minutes):g}" in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists() and not (tmp_path / "run").exists()


def test_the_demo_scores_the_run_it_trained_and_leaves_a_users_run_alone(tmp_path, capsys):
    """An out= override moves the demo's run: the probe scores that run's checkpoint (not --out's). A folder
    holding a run on other images is refused before anything is replaced."""
    from simxent.demo import make_shapes
    from tests.conftest import TINY_RUN

    data = tmp_path / "shapes"
    make_shapes(data, train_per_class=16, test_per_class=4, size=16)
    tiny = [*TINY_RUN, "train.epochs=1", "eval.every=0"]
    moved = tmp_path / "moved"
    assert cli.demo_main(["--data", str(data), "--out", str(tmp_path / "unused"), *tiny, f"out={moved}"]) == 0
    assert json.loads((moved / "linear_eval.json").read_text())["checkpoint"] == str(moved / "checkpoints" / "last.pt")
    assert not (tmp_path / "unused").exists()
    mine = tmp_path / "mine"
    assert cli.pretrain_main([*tiny, f"data.train={data / 'test'}", f"out={mine}", "--no-progress"]) == 0
    kept = (mine / "checkpoints" / "last.pt").read_bytes()
    assert cli.demo_main(["--data", str(data), "--out", str(mine), *tiny]) == 2
    assert f"--out {mine} holds a run that is not the demo's (trained on {data / 'test'})" in capsys.readouterr().err
    assert (mine / "checkpoints" / "last.pt").read_bytes() == kept
    assert cli.demo_main(["--data", str(data), "--out", str(moved), *tiny]) == 0  # its own earlier run: replaced
