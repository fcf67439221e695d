"""Nothing lost: killed runs resume exactly, preemption checkpoints, bad images and bad numbers are survived."""
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import simxent.train
from simxent.checkpoint import load_checkpoint, newest_valid_checkpoint, save_checkpoint, step_file_name
from simxent.config import ConfigError, load_config
from simxent.data import DataError, decode, load_folder
from simxent.demo import make_shapes
from simxent.train import TrainingError, pretrain
from tests.conftest import TINY_RUN, next_second

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=4, size=16)


def tiny(shapes, out, *more):
    return [*TINY_RUN, f"data.train={shapes / 'train'}", "train.log_every=1", "eval.every=0", "train.precision=fp32",
            f"out={out}", *more]


PRETRAIN = [str(ROOT / "scripts" / "pretrain.py"), "--no-progress"]  # the command line's pretraining


def launch(args, command=PRETRAIN, group=False):
    """The run as a child process; ``group``: in a process group of its own, which a signal can reach whole."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *command, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)


def run_to_the_end(args, command=PRETRAIN) -> None:
    proc = launch(args, command)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def wait_for_step(path: Path, step: int, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if load_checkpoint(path)["position"]["global_step"] >= step:
                return
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step}")


def kill_then_resume(args, run: Path, steps: int, command=PRETRAIN) -> dict:
    """Start the run ``args`` (``out=run``, ``steps`` steps in all), SIGKILL it at a random step, resume it
    with ``train.resume=auto`` to the end; returns its last checkpoint."""
    kill_at = random.Random(os.getpid()).randint(3, steps * 2 // 3)
    proc = launch(args, command)
    wait_for_step(run / "checkpoints" / "last.pt", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["position"]["global_step"]
    assert killed_at < steps, "the run finished before it was killed"
    resumed = launch([*args, "train.resume=auto"], command)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err
    return load_checkpoint(run / "checkpoints" / "last.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    """The encoder and head of two checkpoints agree to float32 round-off."""
    for part in ("encoder", "head"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=1e-6, msg=lambda m: f"{part}.{key}: {m}")


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(shapes, tmp_path):
    run = tmp_path / "killed"
    args = tiny(shapes, run, "train.epochs=12", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    reference = tmp_path / "reference"  # the same command, uninterrupted (same threads, same kernels)
    uninterrupted = launch([*args, f"out={reference}"])  # beside the killed run: one thread each
    try:
        b = kill_then_resume(args, run, 60)
        _, err = uninterrupted.communicate(timeout=300)
    finally:  # a failure above leaves no run training beside the rest of the suite
        uninterrupted.kill()
        uninterrupted.wait()
    assert uninterrupted.returncode == 0, err
    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    assert b["position"] == a["position"] == {"epoch": 12, "step": 0, "global_step": 60}
    assert_same_weights(a, b)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 61))  # one curve, no step twice
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 3


def test_sigterm_checkpoints_and_exits_cleanly(shapes, tmp_path):
    """SIGTERM to the run's whole process group, as torchrun, SLURM and docker send it, while DataLoader
    workers stream the images: the workers leave the signal to the run, which finishes its step and
    checkpoints (a worker killed by it took the run down with a RuntimeError and no checkpoint)."""
    run = tmp_path / "run"
    proc = launch(tiny(shapes, run, "train.epochs=500", "data.stream=true", "data.workers=1"), group=True)
    wait_for_step(run / "checkpoints" / "last.pt", 5, proc)  # epoch ends write checkpoints
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["epoch"] < 500
    assert load_checkpoint(run / "checkpoints" / "last.pt")["position"]["global_step"] == summary["global_step"]


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(shapes, tmp_path):
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=2")), progress=False)
    folder = run / "checkpoints"
    assert newest_valid_checkpoint(folder) == folder / "last.pt"
    newest = sorted(folder.glob("step-*.pt"))[-1]
    for path in (folder / "last.pt", newest):  # a torn write of both names
        broken = path.with_suffix(".broken")
        broken.write_bytes(path.read_bytes()[:64])
        os.replace(broken, path)
    fallback = newest_valid_checkpoint(folder)
    assert fallback == sorted(folder.glob("step-*.pt"))[-2]
    assert load_checkpoint(fallback)["position"]["global_step"] == 5


def test_a_step_file_newer_than_last_pt_is_resumed(shapes, tmp_path):
    """A stop (a second Ctrl-C, a power cut) after a step file was written whole but before last.pt was moved
    to it: train.resume=auto takes the newer step file, and a torn one falls back to last.pt."""
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=2")), progress=False)
    folder = run / "checkpoints"
    newest = sorted(folder.glob("step-*.pt"))[-1]
    state = load_checkpoint(newest)
    later = folder / step_file_name(12, state["run_id"])
    save_checkpoint({**state, "position": {**state["position"], "global_step": 12}}, later)
    assert newest_valid_checkpoint(folder, state["run_id"]) == later
    later.write_bytes(later.read_bytes()[:64])
    assert newest_valid_checkpoint(folder, state["run_id"]) == folder / "last.pt"


def refuse_hard_links(monkeypatch) -> None:
    """As exFAT, a virtual machine's shared folder or some FUSE mounts do."""
    def refused(src, dst, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
    monkeypatch.setattr(os, "link", refused)


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(shapes, tmp_path, monkeypatch, hard_links):
    """A run resumed from its step 4 starts a new branch: the old branch's later checkpoints are moved aside
    (kept, named), so rotation keeps the new branch's files and a torn last.pt falls back to the new branch.
    Where the filesystem has no hard links, last.pt is a copy of the newest step file, and all goes alike
    (the run used to stop on the refused link, and lose the epoch it trained meanwhile)."""
    if not hard_links:
        refuse_hard_links(monkeypatch)
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "train.checkpoint_every=2",
                                    "train.keep_checkpoints=10")), progress=False)
    folder = run / "checkpoints"
    newest = sorted(folder.glob("step-*.pt"))[-1]
    assert os.path.samefile(folder / "last.pt", newest) is hard_links
    assert (folder / "last.pt").read_bytes() == newest.read_bytes()
    step = lambda p: int(p.name.split("-")[1])  # noqa: E731
    assert [step(p) for p in sorted(folder.glob("step-*.pt"))] == [2, 4, 5, 6, 8, 10]
    older = sorted(folder.glob("step-*.pt"))[1]
    listing = sorted(p.name for p in folder.iterdir())
    epoch_end = sorted(folder.glob("step-*.pt"))[2]  # a resume that trains nothing writes, and moves, nothing
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", f"train.resume={epoch_end}")), progress=False)
    assert sorted(p.name for p in folder.iterdir()) == listing
    next_second()
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", f"train.resume={older}",
                                    "train.keep_checkpoints=2")), progress=False)
    assert [step(p) for p in sorted(folder.glob("step-*.pt"))] == [4, 5]
    (aside,) = folder.glob("superseded-after-step-4-*")
    assert sorted(p.name for p in aside.iterdir()) == ["last.pt"] + sorted(
        p.name for p in aside.glob("step-*.pt")) and [step(p) for p in sorted(aside.glob("step-*.pt"))] == [5, 6, 8, 10]
    assert load_checkpoint(aside / "last.pt")["position"]["global_step"] == 10
    (folder / "torn").write_bytes(b"torn")  # a new file under the name: last.pt is a hard link to step 5
    os.replace(folder / "torn", folder / "last.pt")
    assert load_checkpoint(newest_valid_checkpoint(folder))["position"]["global_step"] == 5

    # Resumed from the set-aside branch's step 8, that branch is the top level's again: the new branch's step
    # 5 goes aside, and the old branch's steps 5 to 8 come back, so that every step file there is one line.
    old_five = load_checkpoint(sorted(aside.glob("step-*.pt"))[0])["encoder"]
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", f"train.resume={sorted(aside.glob('step-*.pt'))[2]}",
                                    "train.checkpoint_every=2", "train.keep_checkpoints=10")), progress=False)
    assert [step(p) for p in sorted(folder.glob("step-*.pt"))] == [4, 5, 6, 8, 10]
    five = load_checkpoint(sorted(folder.glob("step-*.pt"))[1])["encoder"]
    assert all(torch.equal(five[k], old_five[k]) for k in five)
    (rest,) = folder.glob("superseded-after-step-8-*")  # what stays of that branch comes after its step 8
    assert not aside.exists() and [step(p) for p in rest.glob("step-*.pt")] == [10]
    (newer,) = folder.glob("superseded-after-step-4-*")
    assert [step(p) for p in newer.glob("step-*.pt")] == [5]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(shapes, tmp_path, monkeypatch):
    """Dead at its third step, before any checkpoint: train.resume=auto starts the folder's own run again
    from step 0 (not "the folder holds another run"), and TensorBoard shows every step once."""
    run = tmp_path / "run"
    real = simxent.train.step_loss
    calls = {"n": 0}

    def dies_at_the_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(simxent.train, "step_loss", dies_at_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(load_config(None, tiny(shapes, run, "train.epochs=1")), progress=False)
    assert not list((run / "checkpoints").glob("*.pt")) and list((run / "tb").rglob("events.out.tfevents.*"))
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "best by hand.pt").write_bytes(b"mine")  # a user's file is not a run's checkpoint
    monkeypatch.setattr(simxent.train, "step_loss", real)
    next_second()
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", "train.resume=auto")), progress=False)
    assert summary["global_step"] == 5
    # Said before train.log could open (out was not yet claimed), and written into it once it did.
    assert "WARNING no checkpoint of run" in (run / "train.log").read_text()
    logging.getLogger("simxent.train").warning("after the run")  # the run's log file is closed with the run
    assert "after the run" not in (run / "train.log").read_text()
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    # Checkpoints that exist but none of which loads are no restart: the run stops, its files untouched.
    for path in (run / "checkpoints").glob("*.pt"):
        if path.name != "best by hand.pt":
            path.write_bytes(path.read_bytes()[:64])
    torn = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")}
    with pytest.raises(ConfigError, match="train.resume=auto: no checkpoint in .* loads"):
        pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "train.resume=auto")), progress=False)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")} == torn


def test_a_resume_says_when_it_finds_no_run_or_other_training_images(shapes, tmp_path, caplog):
    """train.resume=auto into a folder without a run (a misspelt out) starts from step 0 and says so, on
    stderr and in train.log, from the command line's first run in its process (said before train.log opens);
    a run resumed over a folder that has lost images goes on over what it finds, with both counts said."""
    train = tmp_path / "train"
    shutil.copytree(shapes / "train", train)
    run, args = tmp_path / "run", [f"data.train={train}", "train.resume=auto"]
    proc = launch(tiny(shapes, run, *args, "train.epochs=1"))
    _, err = proc.communicate(timeout=300)
    said = f"train.resume=auto: {run} holds no checkpoint to resume: training starts from step 0"
    assert proc.returncode == 0 and said in err and said in (run / "train.log").read_text(), err
    with caplog.at_level(logging.WARNING, logger="simxent"):
        pretrain(load_config(None, tiny(shapes, run, *args, "train.epochs=2")), progress=False)
        assert "data.train holds" not in caplog.text and "holds no checkpoint" not in caplog.text
        for path in sorted(train.rglob("*.png"))[::2]:
            path.unlink()
        n = len(list(train.rglob("*.png")))
        next_second()
        summary = pretrain(load_config(None, tiny(shapes, run, *args, "train.epochs=3")), progress=False)
    assert summary["epoch"] == 3
    assert (f"data.train holds {n} training images now and {2 * n} when this run was checkpointed: the run goes on "
            f"over the images it finds ({n // 16} steps per epoch)") in caplog.text


def test_a_run_killed_while_finishing_gets_its_end_from_the_resume(shapes, tmp_path, monkeypatch):
    """Killed inside finish, after its last checkpoint and before summary.json: the resume trains nothing, and
    writes the run's end (the final scalars) that the killed session did not."""
    run = tmp_path / "run"
    real = simxent.train.final_metrics

    def killed(*args):
        raise RuntimeError("killed while finishing")

    monkeypatch.setattr(simxent.train, "final_metrics", killed)
    with pytest.raises(RuntimeError, match="killed while finishing"):
        pretrain(load_config(None, tiny(shapes, run, "train.epochs=1")), progress=False)
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(simxent.train, "final_metrics", real)
    next_second()
    assert pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", "train.resume=auto")),
                    progress=False)["global_step"] == 5
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("final/loss")] == [5]


def test_the_summary_of_a_resumed_run_covers_all_its_sessions(shapes, tmp_path, caplog):
    """One epoch, then resumed for a second, then resumed with nothing left to train (and another lr):
    summary.json keeps the kNN of every epoch, adds up the sessions' seconds (the last adds none), and keeps
    the last loss (strict JSON); config.yaml stays the config that trained the run."""
    run = tmp_path / "run"
    args = ["train.epochs=1", f"data.val={shapes / 'test'}", "eval.every=1"]
    first = pretrain(load_config(None, tiny(shapes, run, *args)), progress=False)
    second = pretrain(load_config(None, tiny(shapes, run, *args[1:], "train.epochs=2", "train.resume=auto")),
                      progress=False)
    assert [k["epoch"] for k in second["knn_top1"]] == [1, 2] and second["knn_top1"][0] == first["knn_top1"][0]
    assert second["seconds"] > first["seconds"]
    trained_by = (run / "config.yaml").read_text()
    with caplog.at_level(logging.WARNING, logger="simxent"):
        again = pretrain(load_config(None, tiny(shapes, run, *args[1:], "train.epochs=2", "train.resume=auto",
                                                "optim.lr=0.5")), progress=False)
    assert "has trained its train.epochs=2, so nothing is trained" in caplog.text
    assert (run / "config.yaml").read_text() == trained_by and "lr: 0.5" not in trained_by
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    # One per session that trained. Sorted: sessions started within one second of each other have event files
    # whose names differ only in the writer's counter, which sorts as text (".10" before ".9").
    assert sorted(e.step for e in events.Scalars("final/loss")) == [5, 10]
    written = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert written["knn_top1"] == second["knn_top1"] == again["knn_top1"]
    assert written["last_loss"] == second["last_loss"] is not None and written["global_step"] == 10
    assert written["seconds"] == again["seconds"] == second["seconds"]


def test_non_finite_loss_is_skipped_then_stops_without_overwriting(shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=1")), progress=False)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    real = simxent.train.step_loss
    calls = {"n": 0}

    def sometimes_nan(*args):
        loss, z1, z2 = real(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (2, 4, 5) else loss), z1, z2

    monkeypatch.setattr(simxent.train, "step_loss", sometimes_nan)
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "train.resume=auto")), progress=False)
    assert summary["skipped_steps"] == 3 and summary["global_step"] == 5 + 2  # steps 2, 4 and 5 of 5 skipped
    assert summary["epoch"] == 2
    monkeypatch.setattr(simxent.train, "step_loss", lambda *a: (real(*a)[0] * float("nan"),) + real(*a)[1:])
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row"):
        pretrain(load_config(None, tiny(shapes, tmp_path / "r2", "train.epochs=1", "train.max_bad_steps=3")),
                 progress=False)
    assert not (tmp_path / "r2" / "checkpoints").exists()
    assert "ERROR stopped by TrainingError: loss or gradients were non-finite for 3 steps in a row" in (
        tmp_path / "r2" / "train.log").read_text()  # why a run in the background ended, in its own log
    assert (run / "checkpoints" / "last.pt").read_bytes() != before  # the good run's checkpoint moved on


def test_a_skipped_step_leaves_no_trace_in_the_batchnorm_statistics(shapes, tmp_path, monkeypatch):
    """A batch whose forward overflows (an inf pixel) moves every BatchNorm's running statistics to NaN
    before its loss is found non-finite. The skipped step must put them back: the run then checkpoints
    exactly the model of a run whose third loss was made NaN after an ordinary forward."""
    real = simxent.train.step_loss
    finals = {}
    for how in ("inf_input", "nan_loss"):
        calls, entering = {"n": 0}, {}

        def third_step_bad(model, views, *rest):
            calls["n"] += 1
            entering[calls["n"]] = [b.clone() for b in model.buffers()]
            bad = calls["n"] == 3
            if bad and how == "inf_input":
                views = [v * float("inf") for v in views] if isinstance(views, list) else views * float("inf")
            loss, z1, z2 = real(model, views, *rest)
            return (loss * float("nan") if bad else loss), z1, z2

        monkeypatch.setattr(simxent.train, "step_loss", third_step_bad)
        summary = pretrain(load_config(None, tiny(shapes, tmp_path / how, "train.epochs=1")), progress=False)
        assert summary["skipped_steps"] == 1 and summary["global_step"] == 4
        finals[how] = load_checkpoint(tmp_path / how / "checkpoints" / "last.pt")
        # The fourth step starts from the buffers the third found, which two applied steps had moved.
        assert all(torch.equal(a, b) for a, b in zip(entering[4], entering[3]))
        assert not all(torch.equal(a, b) for a, b in zip(entering[3], entering[1]))
    stats = [k for k in finals["inf_input"]["encoder"] if "running_" in k]
    assert stats
    for part in ("encoder", "head"):
        for key, value in finals["inf_input"][part].items():
            assert torch.isfinite(value).all() if value.is_floating_point() else True, key
            torch.testing.assert_close(value, finals["nan_loss"][part][key], rtol=0, atol=0)


def test_stopping_after_non_finite_steps_keeps_the_good_steps_before_them(shapes, tmp_path, monkeypatch):
    """Steps 3 to 5 of 5 non-finite with train.max_bad_steps=3: the run stops, but its two good steps are
    checkpointed (positioned after the skipped batches), and a resumed run goes on from them."""
    real = simxent.train.step_loss
    calls = {"n": 0}

    def nan_from_the_third(*args):
        loss, z1, z2 = real(*args)
        calls["n"] += 1
        return (loss * float("nan") if 3 <= calls["n"] <= 5 else loss), z1, z2

    monkeypatch.setattr(simxent.train, "step_loss", nan_from_the_third)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite for 3 steps in a row.*holds the last good step \(2\)"):
        pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "train.max_bad_steps=3")), progress=False)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["position"] == {"epoch": 0, "step": 5, "global_step": 2}
    monkeypatch.setattr(simxent.train, "step_loss", real)
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "train.resume=auto")), progress=False)
    assert summary["global_step"] == 2 + 5 and summary["epoch"] == 2


def test_skipped_steps_do_not_checkpoint_again(shapes, tmp_path, monkeypatch):
    """train.checkpoint_every=2 with batches 3 and 4 of 5 non-finite: applied steps 1, 2 and 3 (batch 5).
    The checkpoint after step 2 is written once, not again after each skipped batch that leaves the run at
    step 2; then the epoch's end."""
    real, calls, saved = simxent.train.step_loss, {"n": 0}, []
    real_save = simxent.train.save

    def nan_at_three_and_four(*args):
        loss, z1, z2 = real(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), z1, z2

    def counting_save(run, ahead):
        saved.append(run.pos.global_step)
        real_save(run, ahead)

    monkeypatch.setattr(simxent.train, "step_loss", nan_at_three_and_four)
    monkeypatch.setattr(simxent.train, "save", counting_save)
    summary = pretrain(load_config(None, tiny(shapes, tmp_path / "run", "train.epochs=1",
                                              "train.checkpoint_every=2")), progress=False)
    assert summary["skipped_steps"] == 2 and summary["global_step"] == 3 and saved == [2, 3]


def test_non_finite_gradient_under_a_finite_loss_is_skipped(shapes, tmp_path, monkeypatch):
    real = simxent.train.step_loss
    calls = {"n": 0}

    def nan_gradient_once(*args):
        loss, z1, z2 = real(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss + (z1 - z1.detach()).abs().sqrt().sum()  # adds exactly 0; its gradient is 0 * inf = NaN
        return loss, z1, z2

    monkeypatch.setattr(simxent.train, "step_loss", nan_gradient_once)
    summary = pretrain(load_config(None, tiny(shapes, tmp_path / "run", "train.epochs=1")), progress=False)
    assert summary["skipped_steps"] == 1 and summary["global_step"] == 4  # 5 batches, the third skipped
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["encoder"].values() if v.is_floating_point())


def hostile_folder(root: Path) -> dict:
    """Every kind of file a scraped folder holds; returns which names must be skipped and which kept."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    good = {}

    def rgb(w=24, h=16):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    for i in range(6):
        rgb().save(root / f"plain{i}.png")
    buf = io.BytesIO()
    rgb(64, 64).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    png = io.BytesIO()
    rgb().save(png, "PNG")
    data = bytearray(png.getvalue())
    data[33 - 4] ^= 0xFF  # the IHDR chunk's CRC
    (root / "bad_crc.png").write_bytes(bytes(data))
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "sixteen_bit.png")
    rgb().convert("CMYK").save(root / "cmyk.jpg")
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    palette.save(root / "palette_transparent.png", transparency=0)
    photo = rgb(30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo.save(root / "exif_rotated.jpg", exif=exif)
    rgb(1, 1).save(root / "one_pixel.png")
    Image.new("1", (20000, 10000)).save(root / "bomb.png")  # 2e8 pixels, beyond PIL's limit
    os.symlink(root / "does_not_exist.jpg", root / "dangling.jpg")  # unreadable, whoever runs the test
    (root / "loop").mkdir()
    os.symlink(root / "loop", root / "loop" / "again")
    skipped = {"truncated.jpg", "zero.jpg", "text.jpg", "bad_crc.png", "bomb.png", "dangling.jpg"}
    kept = {f"plain{i}.png" for i in range(6)} | {"sixteen_bit.png", "cmyk.jpg", "palette_transparent.png",
                                                  "exif_rotated.jpg", "one_pixel.png"}
    return {"skipped": skipped, "kept": kept, **good}


def test_bad_images_of_the_validation_folder_are_listed_with_trainings(shapes, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(shapes / "test", val)
    (val / "circle" / "zz.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "train").mkdir()
    shutil.copytree(shapes / "train" / "circle", tmp_path / "train" / "circle")
    shutil.copytree(shapes / "train" / "square", tmp_path / "train" / "square")
    (tmp_path / "train" / "square" / "bad.png").write_bytes(b"")
    classes = ["circle", "square"]
    for c in set(p.name for p in val.iterdir()) - set(classes):
        shutil.rmtree(val / c)
    summary = pretrain(load_config(None, tiny(tmp_path, tmp_path / "run", "train.epochs=1", f"data.val={val}",
                                              "eval.every=1", "eval.knn_k=5")), progress=False)
    assert summary["knn_top1"] and sorted(Path(r["file"]).name for r in summary["skipped_images"]) == [
        "bad.png", "zz.jpg"]
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()]
    assert listed == summary["skipped_images"]


def test_hostile_images_are_skipped_by_name_and_the_rest_trains(tmp_path):
    folder = tmp_path / "scraped"
    expect = hostile_folder(folder)
    data = load_folder(folder, 16, workers=2, progress=False)
    assert {Path(f).name for f in data.skipped} == expect["skipped"]
    assert {Path(f).name for f in data.files} == expect["kept"]
    summary = pretrain(load_config(None, ["model.backbone=convnet", "model.head_hidden=16", "model.head_out=8",
                                          "data.image_size=16", f"data.train={folder}", "train.batch_size=4",
                                          "train.epochs=1", "eval.every=0", f"out={tmp_path / 'run'}"]),
                       progress=False)
    # Why each file was skipped, in the words of the error PIL or the OS raised on opening it.
    reasons = {Path(f).name: r for f, r in data.reasons.items()}
    assert set(reasons) == expect["skipped"]
    for name, words in (("truncated.jpg", "OSError: image file is truncated"),
                        ("text.jpg", "UnidentifiedImageError: cannot identify image file"),
                        ("zero.jpg", "cannot identify image file"), ("bomb.png", "decompression bomb"),
                        ("dangling.jpg", "FileNotFoundError"), ("bad_crc.png", "Error")):
        assert words in reasons[name] and str(folder) not in reasons[name], (name, reasons[name])
    assert {Path(r["file"]).name: r["reason"] for r in summary["skipped_images"]} == reasons
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()]
    assert {Path(r["file"]).name: r["reason"] for r in listed} == reasons
    # EXIF orientation is applied: the stored 30x10 photo decodes as its 10x30 upright view.
    with Image.open(folder / "exif_rotated.jpg") as im:
        upright = im.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.png")
    assert np.abs(decode(folder / "exif_rotated.jpg", 10).astype(int) - decode(tmp_path / "upright.png", 10)).mean() < 2
    with pytest.raises(DataError, match=r"cannot read image .*(truncated|zero|text|bad_crc|bomb|dangling)") as e:
        load_folder(folder, 16, workers=2, cache=False, on_bad_image="error", progress=False)
    assert "\n" not in str(e.value)  # one line, not the decoding worker's traceback
