"""Seeing and clearing the decoded-image cache (``simxent-cache list|clear``).

An entry of the cache folder is a decoded array ``KEY.npy`` and its metadata ``KEY.json`` (which names the
source folder). A decoder writes each under a temporary name that carries its process and host
(``.KEY.npy.<pid>@<host>.<random>.tmp.npy`` and ``.KEY.json.<pid>@<host>.<random>.tmp``, from
:func:`simxent.files.temp_path`) and renames it when done. Clearing never removes the temporary file of a process that still runs, or of another host: that decoder is filling it.
Removing a finished entry while a run reads it is safe: the run's memory map keeps the data until it closes.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError
from .files import HOST, locked_by_a_writer, pid_alive

# Keys are data._cache_key's 20 hex digits: other files in the folder (a cache_dir shared with a project's
# own .npy and .json files) are never listed or cleared.
_KEY = r"(?P<key>[0-9a-f]{20})"
_ENTRY = re.compile(rf"^{_KEY}\.(npy|json)$")
_WRITER = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.\w+"  # files.temp_path's <pid>@<host>.<random>
_TEMPS = (re.compile(rf"^\.{_KEY}\.npy\.{_WRITER}\.tmp\.npy$"),  # an array being decoded
          re.compile(rf"^\.{_KEY}\.json\.{_WRITER}\.tmp$"))  # its metadata


@dataclass
class CacheEntry:
    """One decoded folder in the cache: its files, their bytes on disk, the folder it came from, and the
    age of its array in seconds."""

    key: str
    files: list[Path] = field(default_factory=list)
    source: str = "?"
    age_s: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(_disk_bytes(f) for f in self.files)


@dataclass
class TempFile:
    """A file a decoder is writing (or was, when ``alive`` is False and its process is gone)."""

    path: Path
    key: str
    pid: int
    alive: bool


def _temp_file(path: Path) -> TempFile | None:
    """The temporary file ``path`` names, or None. One of another host counts as alive (its pid means
    nothing here), and so does one whose writer holds its lock (:func:`simxent.files.writer_lock`)."""
    for pattern in _TEMPS:
        m = pattern.match(path.name)
        if m:
            pid = int(m["pid"])
            return TempFile(path, m["key"], pid, m["host"] != HOST or pid_alive(pid) or locked_by_a_writer(path))
    return None


def _disk_bytes(path: Path) -> int:
    """Bytes the file takes on disk (its allocated blocks; a sparse array counts what it holds)."""
    try:
        st = path.stat()
    except OSError:
        return 0
    return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size


def scan(cache_dir: Path) -> tuple[list[CacheEntry], list[TempFile]]:
    """The finished entries of ``cache_dir`` (oldest first) and the temporary files in it."""
    entries: dict[str, CacheEntry] = {}
    temps = []
    names = sorted(os.listdir(cache_dir)) if cache_dir.is_dir() else []
    for name in names:
        path = cache_dir / name
        temp = _temp_file(path)
        if temp is not None:
            temps.append(temp)
        elif _ENTRY.match(name) and path.is_file():
            entries.setdefault(path.stem, CacheEntry(path.stem)).files.append(path)
    now = time.time()
    for entry in list(entries.values()):
        mtimes = {f: _mtime(f) for f in entry.files}  # a clear running beside this one may remove some
        entry.files = [f for f, t in mtimes.items() if t is not None]
        if not entry.files:
            del entries[entry.key]
            continue
        entry.source = _source(cache_dir / f"{entry.key}.json")
        entry.age_s = now - max(mtimes[f] for f in entry.files)
    return sorted(entries.values(), key=lambda e: -e.age_s), temps


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # removed since it was listed
        return None


def _source(meta: Path) -> str:
    try:
        return str(json.loads(meta.read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return "? (no metadata)"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def format_listing(cache_dir: Path) -> str:
    """One line per entry (key, size on disk, age, source folder), the files being written, and the total."""
    entries, temps = scan(cache_dir)
    lines = [f"{'key':<20}  {'size':>9}  {'age':>7}  source"]
    lines += [f"{e.key:<20}  {human_bytes(e.nbytes):>9}  {human_age(e.age_s):>7}  {e.source}" for e in entries]
    lines += [f"{t.path.name}: {human_bytes(_disk_bytes(t.path))}, "
              f"{'being written by' if t.alive else 'left by the ended'} process {t.pid}" for t in temps]
    total = sum(e.nbytes for e in entries) + sum(_disk_bytes(t.path) for t in temps)
    lines.append(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, {human_bytes(total)} in {cache_dir}")
    return "\n".join(lines)


def clear(cache_dir: Path, keys: list[str] | None = None) -> tuple[list[Path], int, list[TempFile]]:
    """Delete the entries named by ``keys`` (all of them, and the temporary files of ended processes, when
    ``keys`` is None). Returns the removed files, the bytes they took on disk, and the temporary files left
    because their writer runs.
    An unknown key is a DataError naming it, before anything is deleted."""
    entries, temps = scan(cache_dir)
    by_key = {e.key: e for e in entries}
    keys = list(dict.fromkeys(keys)) if keys is not None else None  # a key named twice is cleared (and counted) once
    unknown = [k for k in keys or [] if k not in by_key]
    if unknown:
        raise DataError(f"no cache entry {', '.join(unknown)} in {cache_dir} (simxent-cache list shows the keys)")
    chosen = list(by_key.values()) if keys is None else [by_key[k] for k in keys]
    doomed = [f for e in chosen for f in e.files]
    in_use = [t for t in temps if t.alive and (keys is None or t.key in keys)]
    if keys is None:
        doomed += [t.path for t in temps if not t.alive]
    freed = sum(_disk_bytes(f) for f in doomed)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed, freed, in_use
