"""Files that several writers may share: temporary names that carry their writer, removal of what dead
writers left, and disk space reserved before it is filled.

A temporary file is named ``.<final name>.<pid>@<host>.<random>.tmp``: unique per writer and per call, so
concurrent writers never collide, and it says who wrote it. A leftover is removed only when its writer
ran on this host and its process no longer exists (``os.kill(pid, 0)``): a live writer's file is never
touched, and a pid reused by an unrelated process only delays the clean-up until that process ends.
Files of other hosts (a folder shared over the network) are left alone, since their pids mean nothing here.
A writer may also hold its file's lock while it writes (:func:`writer_lock`, the image cache's hours-long
decodes): a locked file is never removed, whatever its pid says. That keeps the file of a writer in another
process-id space on the same host (containers sharing the host's name) whose pid means nothing here.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("simxent")

HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "localhost"
_TEMP = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.\w+\.tmp(\.npy)?$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def writer_tag() -> str:
    """``<pid>@<host>`` of this process."""
    return f"{os.getpid()}@{HOST}"


def temp_path(final: Path, suffix: str = "") -> Path:
    """A fresh temporary name beside ``final`` (not created): ``.<name>.<pid>@<host>.<random>.tmp<suffix>``."""
    return final.with_name(f".{final.name}.{writer_tag()}.{secrets.token_hex(4)}.tmp{suffix}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


@contextmanager
def writer_lock(path: Path):
    """Create ``path`` if needed and hold its lock (``flock``, exclusive) while writing it:
    :func:`remove_dead_temp_files` leaves a locked file alone. Where the filesystem has no locks (ENOLCK,
    or a network filesystem refusing them), the writer goes on unlocked and the pid alone protects it.
    (NFS takes an exclusive lock only on a file open for writing.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a clean-up's momentary probe, if any
        except OSError as e:
            log.debug("no writer lock on %s: %s", path, e)
        yield
    finally:
        os.close(fd)


def locked_by_a_writer(path: Path) -> bool:
    """Whether a live process holds ``path``'s :func:`writer_lock`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without locks: the pid alone decides
        return False
    finally:
        os.close(fd)


def dead_writer(name: str) -> bool:
    """Whether ``name`` is a temporary file of this host whose writing process is gone."""
    m = _TEMP.search(name)
    return bool(m) and m["host"] == HOST and not pid_alive(int(m["pid"]))


def remove_dead_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that dead writers of this host left in ``folder``; returns them."""
    removed = []
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:  # no folder yet: nothing left behind
        return removed
    for name in names:
        if dead_writer(name) and not locked_by_a_writer(folder / name):
            (folder / name).unlink(missing_ok=True)
            removed.append(folder / name)
    if removed:
        log.info("removed %d temporary file(s) that dead processes left in %s", len(removed), folder)
    return removed


def reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's first ``nbytes`` bytes now (``posix_fallocate``), so that a full disk is an
    ENOSPC here and not a SIGBUS later, when a sparse memory map touches a page the disk cannot hold.
    Where the call or the filesystem cannot reserve (macOS, some network filesystems) this does nothing
    and writes report a full disk themselves."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None or nbytes <= 0:
        return
    try:
        fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def missing_file(path: str | Path, what: str) -> str:
    """Why ``path``, which is not a file, cannot be read as the ``what`` (a label file, ...): a folder
    stands there, or nothing does."""
    return f"{what} {path} is a folder, not a file" if Path(path).is_dir() else f"{what} not found: {path}"


def folder_problem(path: Path) -> str | None:
    """Create the folder ``path`` if needed; what makes it unusable for writing (a file in its place, no
    permission to create or write it), or None when it is usable."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder {path}: {e.strerror}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"the folder {path} is not writable"
    return None


def json_text(obj, **dumps_args) -> str:
    """Strict JSON that is valid UTF-8. A score that is undefined (NaN: an AUC without negatives) or infinite is
    null, since strict parsers (jq, JavaScript) refuse Python's NaN token. Non-ASCII text is written as itself,
    but where a file name is not UTF-8 (Python holds its bytes as lone surrogates, which UTF-8 cannot encode)
    everything non-ASCII as ``\\uXXXX`` escapes, which read back to the same name."""
    obj = _finite(obj)
    text = json.dumps(obj, ensure_ascii=False, **dumps_args)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(obj, **dumps_args)


def _finite(obj):
    """``obj`` with every NaN or infinite float, at any depth of dicts, lists and tuples, made None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data) -> None:
    """Write ``data`` (bytes or a buffer) so that ``path`` holds the old file or the whole new one, a power
    cut included: a temporary file beside it (named after its writer, so concurrent writers never collide),
    its bytes reserved, written, fsynced, renamed over ``path``, and the folder fsynced. Without the fsyncs
    some filesystems (XFS, ext4 without data=ordered) can leave an empty file after a crash. An error names
    ``path``, not the temporary file, and leaves no temporary file behind."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            reserve(f.fileno(), len(data))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # A write or close that runs out of space raises without a file name.
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    sync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` for text, as UTF-8 (run.json, summary.json, ...)."""
    write_bytes_atomic(path, text.encode("utf-8"))
