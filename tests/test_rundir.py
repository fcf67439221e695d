"""The run folder: one run at a time, one run per folder, resumable only with a model that fits, no
temporary files left by dead writers, a full disk or an unusable folder reported in one line."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import simxent.checkpoint
import simxent.data
import simxent.train

from simxent.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_rotating
from simxent.cli import pretrain_main
from simxent.demo import make_shapes
from simxent.rundir import clear_run
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=4, size=16)


def tiny(shapes, out, *more):
    return ["--no-progress", *TINY_RUN, f"data.train={shapes / 'train'}", "eval.every=0", "train.precision=fp32",
            f"out={out}", "train.epochs=1", *more]


def run(args, capsys):
    """pretrain_main's exit status and what it printed to stderr."""
    status = pretrain_main(args)
    return status, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("simxent: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_second_run_in_a_busy_folder_stops_naming_the_holder(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny(shapes, out, "train.epochs=500")
    first = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args], cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        status, err = run(tiny(shapes, out, "train.resume=auto"), capsys)
        assert status == 2 and f"in use by another run (pid {first.pid} on " in error_line(err)
        status, err = run(tiny(shapes, out, "train.overwrite=true"), capsys)  # overwriting a live run: no
        assert status == 2 and "in use by another run" in error_line(err)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead run's lock: resuming it needs no clean-up.
    status, err = run(tiny(shapes, out, "train.resume=auto", "train.epochs=2"), capsys)
    assert status == 0, err
    assert "resumed from" in err


def test_a_folder_on_a_filesystem_without_locks_trains_unlocked_and_says_so(shapes, tmp_path, capsys, monkeypatch):
    """flock refused with ENOLCK (NFS without its lock manager) stopped every run with a traceback naming
    neither out nor the reason."""
    import fcntl

    real = fcntl.flock

    def no_locks(fd, op):
        if op & fcntl.LOCK_EX and op & fcntl.LOCK_NB:  # the run's lock; the writers' locks degrade on their own
            raise OSError(errno.ENOLCK, "No locks available")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    status, err = run(tiny(shapes, out, "train.epochs=1"), capsys)
    assert status == 0, err
    assert f"out: {out} cannot be locked (No locks available): the run goes on" in err
    assert (out / "checkpoints" / "last.pt").is_file()


def test_a_forked_worker_never_holds_the_run_lock(tmp_path):
    """DataLoader and decoding workers are forked while the run holds its lock: killed, the run's workers
    lived on for seconds, each with a copy of the lock, and a restart at once was refused, naming the dead
    run. The lock is the run's own: released, it is free while the forked child still runs."""
    import multiprocessing
    from simxent.config import ConfigError
    from simxent.rundir import run_lock
    fork = multiprocessing.get_context("fork")
    running = fork.Event()

    def worker():
        running.set()
        time.sleep(60)
    with run_lock(tmp_path):
        child = fork.Process(target=worker)
        child.start()
        assert running.wait(30)
    try:
        with run_lock(tmp_path):
            pass
    except ConfigError as e:
        pytest.fail(f"the forked child holds the lock: {e}")
    finally:
        child.kill()
        child.join()


def test_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny(shapes, out), capsys)[0] == 0
    first = load_checkpoint(out / "checkpoints" / "last.pt")["run_id"]
    (out / "notes.txt").write_text("mine")
    status, err = run(tiny(shapes, out), capsys)
    assert status == 2 and f"holds run {first}" in error_line(err) and "train.overwrite=true" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["run_id"] == first  # untouched
    assert run(tiny(shapes, out, "train.overwrite=true", "train.keep_checkpoints=1"), capsys)[0] == 0
    second = load_checkpoint(out / "checkpoints" / "last.pt")["run_id"]
    assert second != first
    assert [p.name for p in (out / "checkpoints").glob("step-*.pt")] == [f"step-000000005-{second}.pt"]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # the old run's curve is gone
    assert (out / "notes.txt").read_text() == "mine"  # overwrite clears a run's files, nothing else


def test_overwrite_deletes_nothing_when_the_new_runs_data_or_model_fail(shapes, tmp_path, capsys):
    """train.overwrite=true cleared the old run, then stopped on a setting that fails on the data or the
    model: the run was lost for a typo. The claim that clears waits until both are built; train.log then
    holds what was said before it."""
    out, empty = tmp_path / "run", tmp_path / "empty"
    assert run(tiny(shapes, out), capsys)[0] == 0
    (empty / "nothing").mkdir(parents=True)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".simxent.lock"}
    for setting, said in ((f"data.train={empty}", "no images found"), ("train.batch_size=100", "train.batch_size"),
                          ("model.backbone=convnext_tiny", "convnext_tiny")):
        status, err = run(tiny(shapes, out, "train.overwrite=true", setting), capsys)
        assert status == 2 and said in error_line(err) and "cleared" not in err, err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.name != ".simxent.lock"} == before
    status, err = run(tiny(shapes, out, "train.overwrite=true", "optim.warmup_epochs=10"), capsys)
    assert status == 0 and "cleared the previous run" in err, err
    log = (out / "train.log").read_text()  # said while the data and model were built, then the clearing
    assert log.index("warm-up is cut") < log.index("cleared the previous run") < log.index("training images at")


def test_overwrite_keeps_the_users_files_inside_the_runs_folders(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny(shapes, out, "train.keep_checkpoints=2", "train.epochs=2"), capsys)[0] == 0
    first = load_checkpoint(out / "checkpoints" / "last.pt")["run_id"]
    mine = {out / "checkpoints" / "best by hand.pt": b"weights", out / "tb" / "notes" / "read me.txt": b"notes",
            out / "figures" / "poster.png": b"png", out / "linear_eval" / "paper.tex": b"tex"}
    for path, data in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    old_events = list((out / "tb").glob("events.out.tfevents.*"))
    assert old_events and (out / "figures" / "similarities.png").exists()
    status, err = run(tiny(shapes, out, "train.overwrite=true", "train.keep_checkpoints=1"), capsys)
    assert status == 0, err
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert "kept 4 file(s) of yours inside its checkpoints, tb, figures, linear_eval folders" in err
    assert not any(path.exists() for path in old_events)
    assert not list((out / "checkpoints").glob(f"step-*-{first}.pt"))
    assert load_checkpoint(out / "checkpoints" / "last.pt")["run_id"] != first


def test_resume_and_rotation_only_touch_files_of_their_own_run(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny(shapes, out, "train.epochs=2", "train.keep_checkpoints=2"), capsys)[0] == 0
    folder = out / "checkpoints"
    own = load_checkpoint(folder / "last.pt")
    # Another run's file with a higher step, named the way an older simxent named step files.
    save_checkpoint({**own, "run_id": "another0run", "position": {"epoch": 99, "step": 0, "global_step": 999}},
                    folder / "step-000000999.pt")
    torn = folder / "torn"  # last.pt torn (a new file: last.pt is a hard link to the newest step file)
    torn.write_bytes((folder / "last.pt").read_bytes()[:64])
    os.replace(torn, folder / "last.pt")  # resume=auto falls back to the step files
    status, err = run(tiny(shapes, out, "train.epochs=3", "train.resume=auto", "train.keep_checkpoints=2"), capsys)
    assert status == 0, err
    state = load_checkpoint(folder / "last.pt")
    assert state["run_id"] == own["run_id"] and state["position"]["global_step"] == 15  # resumed at 10, not 999
    assert (folder / "step-000000999.pt").exists()  # rotation never deletes another run's file
    assert sorted(p.name for p in folder.glob(f"step-*-{own['run_id']}.pt")) == [
        f"step-000000010-{own['run_id']}.pt", f"step-000000015-{own['run_id']}.pt"]


def test_concurrent_rotating_saves_never_collide(tmp_path):
    """Two writers (two run ids) saving into one folder at once: unique temporary names, no crash, and each
    run keeps its own newest files."""
    errors = []

    def writer(run_id):
        try:
            for step in range(150):
                save_rotating({"x": torch.tensor([step])}, tmp_path, step, keep=2, run_id=run_id)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(r,)) for r in ("aaaa", "bbbb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for r in ("aaaa", "bbbb"):
        assert sorted(p.name for p in tmp_path.glob(f"step-*-{r}.pt")) == [f"step-000000148-{r}.pt",
                                                                            f"step-000000149-{r}.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["x"].item() == 149
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_with_a_model_that_does_not_fit_is_one_line(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny(shapes, out), capsys)[0] == 0
    for change, message in (("model.backbone=resnet18", "model.backbone=\"convnet\", this run has \"resnet18\""),
                            ("model.head_out=8", "model.head_out=16, this run has 8"),
                            ("data.image_size=24", "data.image_size=16, this run has 24")):
        status, err = run(tiny(shapes, out, "train.resume=auto", "train.epochs=2", change), capsys)
        assert status == 2 and "was trained with " + message in error_line(err), err
        assert "Traceback" not in err
    # A checkpoint whose config says one head size and whose tensors hold another: caught at load_state_dict.
    path = out / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["config"]["model"]["head_out"] = 8
    save_checkpoint(state, tmp_path / "odd.pt")
    status, err = run(tiny(shapes, tmp_path / "other", f"train.resume={tmp_path / 'odd.pt'}", "model.head_out=8",
                           "train.epochs=2"), capsys)
    assert status == 2 and "does not fit this run's head: size mismatch" in error_line(err), err


def _leave_a_torn_checkpoint(path: Path) -> None:
    """A process that dies (SIGKILL) in the middle of writing ``path``."""
    code = ("import os, signal, torch; from simxent.checkpoint import save_checkpoint\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"save_checkpoint({{'x': torch.zeros(1000)}}, {str(path)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_temporary_checkpoints_of_dead_writers_are_removed_at_start(shapes, tmp_path, capsys):
    from simxent.files import temp_path

    folder = tmp_path / "run" / "checkpoints"
    _leave_a_torn_checkpoint(folder / "step-000000007-dead.pt")
    left = list(folder.glob(".*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size > 0
    live = temp_path(folder / "step-000000001-live.pt")  # named after this (living) process
    live.write_bytes(b"being written")
    status, err = run(tiny(shapes, tmp_path / "run"), capsys)
    assert status == 0, err
    assert not left[0].exists() and live.exists()


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(shapes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(tiny(shapes, out), capsys)[0] == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()

    fallocate = os.posix_fallocate

    def full(fd, offset, length):  # the disk fills when a checkpoint reserves its bytes
        if ".pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full)
    status, err = run(tiny(shapes, out, "train.resume=auto", "train.epochs=2"), capsys)
    line = error_line(err)
    assert status == 2 and "no space left to write checkpoint" in line and "MB needed" in line
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        save_checkpoint({"x": torch.ones(3)}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists() and not list(tmp_path.glob(".c.pt.*"))


def test_a_failed_checkpoint_write_stops_the_run_at_the_next_one_once_that_is_written(shapes, tmp_path,
                                                                                       monkeypatch):
    """The write of step 2 fails once (an I/O error on a network mount): the run trains on to its next
    checkpoint, step 4, writes it, and only then stops with the error, so steps 3 and 4 are not lost (the
    run used to stop at step 4 before writing anything)."""
    from simxent.config import load_config
    from simxent.train import pretrain

    real, calls = simxent.checkpoint.save_checkpoint, []

    def fails_once(state, path):
        calls.append(path.name)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error", str(path))
        real(state, path)

    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", fails_once)
    out = tmp_path / "run"
    cfg = load_config(None, tiny(shapes, out, "train.checkpoint_every=2")[1:])
    with pytest.raises(OSError, match="Input/output error"):
        pretrain(cfg, progress=False)
    assert [name.split("-")[1] for name in calls] == ["000000002", "000000004"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["global_step"] == 4


def test_unusable_out_or_cache_folder_is_one_line(shapes, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, message in ((tiny(shapes, a_file), f"out: {a_file} exists and is not a folder"),
                          (tiny(shapes, a_file / "run"), f"out: cannot create the folder {a_file / 'run'}"),
                          (tiny(shapes, tmp_path / "r", f"data.cache_dir={a_file}"),
                           f"data.cache_dir: {a_file} exists and is not a folder")):
        status, err = run(args, capsys)
        assert status == 2 and message in error_line(err), err
        assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_out_is_one_line(shapes, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status, err = run(tiny(shapes, locked), capsys)
    assert status == 2 and "is not writable" in error_line(err)


def test_skipped_images_are_listed_one_json_record_per_line(shapes, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for f in (shapes / "train" / "circle").iterdir():
        os.symlink(f, folder / f.name)
    odd = ["bad\nname.png", "broken.png"]
    for name in odd:
        (folder / name).write_bytes(b"not an image")
    out = tmp_path / "run"
    status, err = run(tiny(shapes, out, f"data.train={folder}", "train.batch_size=4"), capsys)
    assert status == 0, err
    lines = (out / "skipped_images.txt").read_text().splitlines()
    assert sorted(Path(json.loads(line)["file"]).name for line in lines) == sorted(odd)


def test_training_goes_on_while_an_epochs_checkpoint_is_written(shapes, tmp_path, capsys, monkeypatch):
    """Each epoch's checkpoint is written on a thread: the next epoch's first step runs before it lands, and
    the run returns only once the last one is on disk."""
    steps, waited, real_save, real_step = [], [], simxent.checkpoint.save_checkpoint, simxent.train.step_loss

    def slow_disk(state, path):
        if not waited:  # the first epoch's end: a write in the training thread would wait the whole timeout
            at = len(steps)
            deadline = time.monotonic() + 30
            while len(steps) == at and time.monotonic() < deadline:
                time.sleep(0.01)
            waited.append(len(steps) > at)
        real_save(state, path)

    def counted_step(*args):
        steps.append(1)
        return real_step(*args)

    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", slow_disk)
    monkeypatch.setattr(simxent.train, "step_loss", counted_step)
    out = tmp_path / "run"
    assert run(tiny(shapes, out, "train.epochs=2"), capsys)[0] == 0
    assert waited == [True]
    summary = json.loads((out / "summary.json").read_text())
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["global_step"] == summary["global_step"]


def test_a_streamed_epoch_forks_its_workers_only_once_the_checkpoint_has_landed(shapes, tmp_path, capsys,
                                                                                 monkeypatch):
    """A child forked beside the writer's thread would inherit any lock that thread held, held for ever."""
    writing, real_save, real_start = [], simxent.checkpoint.save_checkpoint, simxent.data.start_workers

    def slow_disk(state, path):
        time.sleep(0.5)
        real_save(state, path)

    def forked(loader):
        writing.append(any(t.name == "simxent-checkpoint" for t in threading.enumerate()))
        return real_start(loader)

    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", slow_disk)
    monkeypatch.setattr(simxent.data, "start_workers", forked)
    out = tmp_path / "run"
    assert run(tiny(shapes, out, "train.epochs=2", "data.stream=true", "data.workers=1"), capsys)[0] == 0
    assert writing == [False, False]


def test_a_failure_while_writing_the_summary_leaves_the_previous_one_whole(shapes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(tiny(shapes, out), capsys)[0] == 0
    before = (out / "summary.json").read_text()
    fsync = os.fsync

    def disk_fills_at_the_flush(fd):  # the written bytes do not fit when they reach the disk
        if "summary.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write raises it: no file name
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_fills_at_the_flush)
    status, err = run(tiny(shapes, out, "train.resume=auto", "train.epochs=2"), capsys)
    assert status == 2 and f"No space left on device writing {out / 'summary.json'}: free" in error_line(err)
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in out.iterdir() if "summary" in p.name) == ["summary.json"]


def test_a_second_ctrl_c_stops_at_once_in_one_line_and_the_last_checkpoint_resumes(shapes, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    assert run(tiny(shapes, out, "train.checkpoint_every=2"), capsys)[0] == 0
    real, calls = simxent.train.step_loss, {"n": 0}

    def two_ctrl_c_at_the_third_step(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(simxent.train, "step_loss", two_ctrl_c_at_the_third_step)
    status, err = run(tiny(shapes, out, "train.resume=auto", "train.epochs=2", "train.checkpoint_every=2"), capsys)
    assert status == 128 + signal.SIGINT and err.splitlines()[-1] == "simxent: interrupted", err
    assert "Traceback" not in err and "a second SIGINT: stopping now" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["global_step"] == 6  # checkpoint_every=2
    monkeypatch.setattr(simxent.train, "step_loss", real)
    assert run(tiny(shapes, out, "train.resume=auto", "train.epochs=2"), capsys)[0] == 0


def test_a_signal_before_the_first_step_stops_at_once_and_the_folder_stays_free(shapes, tmp_path, capsys,
                                                                                 monkeypatch):
    """Ctrl-C while the images are decoded: nothing is trained yet, so the run stops at once (a large
    folder's decode is not waited for, nor a first step run), without a traceback, and the folder is free."""
    real_load, stepped = simxent.train.load_data, []

    def ctrl_c_while_decoding(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return loaded

    monkeypatch.setattr(simxent.train, "load_data", ctrl_c_while_decoding)
    monkeypatch.setattr(simxent.train, "step_loss", lambda *a: stepped.append(1))
    out = tmp_path / "run"
    status, err = run(tiny(shapes, out, "train.epochs=1"), capsys)
    assert status == 128 + signal.SIGINT and err.splitlines()[-1] == "simxent: interrupted", err
    assert "SIGINT received before the first step: stopping now" in err and "Traceback" not in err
    assert not stepped and not (out / "checkpoints" / "last.pt").exists()
    monkeypatch.setattr(simxent.train, "load_data", real_load)
    monkeypatch.undo()
    assert run(tiny(shapes, out, "train.resume=auto", "train.epochs=1"), capsys)[0] == 0


def test_a_stop_at_an_epochs_last_step_counts_that_epoch_as_trained(shapes, tmp_path, capsys, monkeypatch):
    real, calls = simxent.train.step_loss, {"n": 0}

    def sigterm_in_the_fifth_step(*args):  # 80 images in batches of 16: the first epoch's last step
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(simxent.train, "step_loss", sigterm_in_the_fifth_step)
    out = tmp_path / "run"
    assert pretrain_main(tiny(shapes, out, "train.epochs=3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 5 and summary["epochs_trained"] == 1 and summary["epoch"] == 0
    assert "trained: 1 epoch(s), 5 steps in" in capsys.readouterr().out


def test_a_refused_run_leaves_nothing_for_the_next_one_to_inherit(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = run(tiny(shapes, out, f"data.train={tmp_path / 'nope'}"), capsys)
    assert status == 2 and f"data.train: image folder not found: {tmp_path / 'nope'}" in error_line(err)
    assert not out.exists()  # a mistyped folder: no out made
    status, err = run(tiny(shapes, out, "train.resume=yes"), capsys)  # a mistyped checkpoint path, as well
    assert status == 2 and "train.resume: checkpoint not found: yes" in error_line(err) and not out.exists()
    image = next((shapes / "train").rglob("*.png"))
    status, err = run(tiny(shapes, out, f"data.train={image}"), capsys)
    assert status == 2 and f"data.train: {image} is an image: give a folder of images" in error_line(err)
    assert not out.exists()  # one image given for a folder: no out made either
    status, err = run([a for a in tiny(shapes, out) if not a.startswith("data.train=")], capsys)
    assert status == 2 and "data.train: no image folder given" in error_line(err) and not out.exists()
    status, err = run(tiny(shapes, out, "train.precision=fp16", "train.device=cpu"), capsys)
    assert status == 2 and "train.precision=fp16 on a CPU" in error_line(err) and not out.exists()
    (tmp_path / "empty").mkdir()
    assert run(tiny(shapes, out, f"data.train={tmp_path / 'empty'}"), capsys)[0] == 2
    assert "no images found" in (out / "train.log").read_text()  # refused once out was claimed: said there
    assert run(tiny(shapes, out, "train.resume=auto"), capsys)[0] == 0  # resume=auto with nothing to resume too
    log_text = (out / "train.log").read_text()
    assert "no images found" not in log_text and "80 training images" in log_text


def test_overwrite_removes_a_linked_run_folder_as_a_link_and_keeps_a_folder_under_a_run_files_name(tmp_path):
    shared = tmp_path / "shared_tb"
    shared.mkdir()
    (shared / "events.out.tfevents.1.host").write_bytes(b"theirs")
    out = tmp_path / "run"
    out.mkdir()
    (out / "tb").symlink_to(shared, target_is_directory=True)
    (out / "summary.json").mkdir()  # a folder of the user's under a name runs write as a file
    (out / "summary.json" / "mine.txt").write_text("mine")
    clear_run(out)
    assert not (out / "tb").exists() and (shared / "events.out.tfevents.1.host").read_bytes() == b"theirs"
    assert (out / "summary.json" / "mine.txt").read_text() == "mine"


def test_text_and_checkpoint_writes_reach_the_disk_before_and_after_their_rename(tmp_path, monkeypatch):
    """Atomic against a power cut, not only against a kill: the new file's bytes are fsynced before the
    rename, and the folder after it (also last.pt's move to the newest step file)."""
    from simxent.checkpoint import save_rotating
    from simxent.files import write_text_atomic

    synced, real = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    write_text_atomic(tmp_path / "summary.json", "{}")
    assert len(synced) == 2 and ".tmp" in synced[0] and synced[1] == str(tmp_path)
    synced.clear()
    save_rotating({"x": torch.zeros(1)}, tmp_path / "checkpoints", 3, keep=2, run_id="r")
    assert synced[-1] == str(tmp_path / "checkpoints") and synced.count(str(tmp_path / "checkpoints")) == 2
