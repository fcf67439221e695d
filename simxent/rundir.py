"""The run folder (``out``): one run at a time, one run per folder.

- A run holds an exclusive ``flock`` on ``OUT/.simxent.lock`` for its whole life. The kernel drops it when
  the process ends, however it ends (a SIGKILL leaves no stale lock); the file names the holder, so a
  second run stops at once saying who holds the folder.
- Every run has an id (``OUT/run.json``, and in each of its checkpoints and step-file names). Resuming and
  rotation only ever consider files of that id.
- A fresh run refuses a folder that holds another run's checkpoints or TensorBoard events, unless
  ``train.overwrite=true``, which first deletes the files runs write there, by name: a file of the user's
  stays, inside the run's subfolders too.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError
from .files import HOST, folder_problem, remove_dead_temp_files, write_text_atomic
from .runtime import quiet_log

log = logging.getLogger("simxent")

LOCK_FILE = ".simxent.lock"
# Marks a folder that linear evaluation or embedding writes results into: image discovery leaves it out (its
# figures and sprites are not images to train on), as it leaves out a run folder by its lock file.
OUTPUT_MARK = ".simxent-output"
RUN_FILE = "run.json"
# What a pretraining run (and the linear evaluation it defaults to) writes in its folder: files at the top,
# and subfolders holding only files of the names in RUN_FILE_NAMES (at any depth) once the run wrote them.
RUN_FILES = ("train.log", "summary.json", "config.yaml", "similarities.json", "skipped_images.txt", RUN_FILE)
RUN_FOLDERS = ("checkpoints", "tb", "figures", "linear_eval")
RUN_FILE_NAMES = (OUTPUT_MARK, "last.pt", "step-*.pt", ".*.tmp*",  # checkpoints, also in superseded-*/
                  "events.out.tfevents.*", "projector_config.pbtxt", "tensors.tsv", "metadata.tsv",
                  "sprite.png",  # TensorBoard's scalars, figures and projector
                  "similarities.png", "pretrained_*.png", "random_init_*.png")  # figures


def writable_folder(path: str | Path, key: str) -> Path:
    """Create the folder ``path`` if needed; one line naming ``key`` when it is a file or cannot be written."""
    path = Path(path)
    problem = folder_problem(path)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    return path


def _holder(lock_path: Path) -> str:
    try:
        h = json.loads(lock_path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is still writing its name
        return "holder not yet named"


def first_image(folder: Path) -> Path | None:
    """An image that image discovery (:func:`simxent.data.find_images`) takes from ``folder``, or None."""
    from .data import DataError, find_images  # data imports this module

    try:
        with quiet_log():  # discovery's warnings (hidden files, run folders left out) are for training
            return find_images(folder).files[0]
    except DataError:  # none found
        return None


def mark_output(folder: Path, key: str = "--out") -> None:
    """Mark ``folder`` (made if needed) as simxent's output: OUTPUT_MARK. A folder that holds images is
    refused, naming ``key``: marked, its images would be left out of every image folder above it."""
    if folder.is_dir() and not (folder / OUTPUT_MARK).exists() and not (folder / LOCK_FILE).exists():
        image = first_image(folder)  # (a run's folder, as a marked one, is left out of image folders already)
        if image is not None:
            raise ConfigError(f"{key}: {folder} holds images ({image}); as simxent's output folder they would be "
                              f"left out of any image folder above it: give a folder of its own")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTPUT_MARK).write_text("simxent writes results here; image folders that hold this one skip it\n")


_held_locks: set[int] = set()  # the lock files' descriptors this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader or decoding worker): close the copies of the held locks' descriptors,
    which leaves the locks with the parent. A copy kept open would hold the lock for as long as the child
    lives, after the parent is killed too: a restart within those seconds was refused, naming the dead
    parent."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def run_lock(out: Path, key: str = "out"):
    """Hold the exclusive lock on ``out`` for the ``with`` block; ConfigError naming the holder (and ``key``,
    the setting that named ``out``) if taken. The lock is this process's alone, never a forked child's.
    Where the filesystem refuses locks, the block runs unlocked, said in a warning."""
    lock_path = out / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _held_locks.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{key}: {out} is in use by another run ({_holder(lock_path)}); wait for it to "
                              f"end or choose another {key}") from None
        except OSError as e:  # a filesystem without locks (ENOLCK: NFS without its lock manager)
            log.warning("%s: %s cannot be locked (%s): the run goes on, but a second run started in it meanwhile "
                        "would not be refused", key, out, e.strerror or e)
        holder = {"pid": os.getpid(), "host": HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)  # releases the lock; the file stays (unlinking a lock file races with its next taker)


def has_checkpoints(out: Path) -> bool:
    """Whether ``out/checkpoints`` holds a checkpoint a run wrote (``last.pt``, a step file), not just a .pt
    file of the user's."""
    return any(p.name == "last.pt" or p.name.startswith("step-") for p in (out / "checkpoints").glob("*.pt"))


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run's progress: a checkpoint or TensorBoard events."""
    tb = out / "tb"
    return has_checkpoints(out) or (tb.is_dir() and any(tb.rglob("events.out.tfevents.*")))


def _run_record(out: Path) -> dict:
    """run.json's content, or {} (none, unreadable, or not an object)."""
    try:
        record = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_run_id(out: Path) -> str | None:
    """The id of the run ``out`` holds, or None (no run yet, or one written before runs had ids)."""
    return _run_record(out).get("run_id")


def recorded_torchrun_job(out: Path) -> str | None:
    """The torchrun job (``dist.torchrun_job``) that claimed the run ``out`` holds, or None."""
    return _run_record(out).get("torchrun_job")


def record_run_id(out: Path, run_id: str, torchrun_job: str | None = None) -> None:
    """run.json: the run's id, when it started (kept when only the torchrun job changes) and that job."""
    earlier = _run_record(out)
    started = earlier.get("started") if earlier.get("run_id") == run_id else None
    record = {"run_id": run_id, "started": started or time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(out / RUN_FILE, json.dumps({**record, "torchrun_job": torchrun_job} if torchrun_job else record))


def clear_run(out: Path) -> None:
    """Delete what runs write in ``out``: RUN_FILES, and the files named as in RUN_FILE_NAMES inside
    RUN_FOLDERS, whose folders go once empty. Any other file stays, and is counted in the warning."""
    for name in RUN_FILES:
        if not (out / name).is_dir() or (out / name).is_symlink():  # a folder of that name is not the run's
            (out / name).unlink(missing_ok=True)
    kept = []
    for name in RUN_FOLDERS:
        if (out / name).is_symlink():  # the link goes, as a run makes its own folder; never what it points to
            (out / name).unlink()
        elif (out / name).is_dir():
            kept += _clear_folder(out / name)
    left = f"; kept {len(kept)} file(s) of yours inside its {', '.join(RUN_FOLDERS)} folders, such as {kept[0]}" \
        if kept else ""
    log.warning("train.overwrite=true: cleared the previous run in %s%s", out, left)


def _clear_folder(folder: Path) -> list[Path]:
    """Delete the run-written files under ``folder`` and then its empty folders, deepest first; returns the
    files that stay. Links are deleted by their own name, never followed."""
    kept = []
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILE_NAMES):
                path.unlink()
            else:
                kept.append(path)
        with contextlib.suppress(OSError):  # not empty: it holds a file that stays
            os.rmdir(root)
    return kept


def claim_clears(out: Path, resumed_id: str | None, resuming: bool, overwrite: bool) -> bool:
    """Whether :func:`claim` (same arguments) clears the run ``out`` holds: another run than the one resumed,
    which only ``overwrite`` replaces; refused without it."""
    held = recorded_run_id(out)
    own = resuming and (held is None or held == resumed_id)
    if not holds_run(out) or own:
        return False
    if not overwrite:
        what = f"run {held}" if held else "another run"
        raise ConfigError(f"out: {out} holds {what} (checkpoints or TensorBoard events): set train.resume=auto "
                          f"to continue it, train.overwrite=true to replace it, or choose another out")
    return True


def claim(out: Path, resumed_id: str | None, resuming: bool, overwrite: bool, torchrun_job: str | None = None) -> str:
    """Make ``out`` this run's folder (call under :func:`run_lock`); returns the run id.

    ``resuming`` with ``resumed_id``, the id in the checkpoint being resumed (None for one written before
    runs had ids). A folder holding another run is refused unless ``overwrite`` clears it first
    (:func:`claim_clears`). The torchrun job claiming it is recorded, so that only its own restarts take the
    folder's run as theirs."""
    for folder in (out, out / "checkpoints"):
        remove_dead_temp_files(folder)  # under the lock: whoever wrote them in this folder is gone
    if claim_clears(out, resumed_id, resuming, overwrite):
        clear_run(out)
    held = recorded_run_id(out)
    run_id = resumed_id if resuming and resumed_id else uuid.uuid4().hex[:12]
    if run_id != held or torchrun_job != recorded_torchrun_job(out):
        record_run_id(out, run_id, torchrun_job)
    return run_id
