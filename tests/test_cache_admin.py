"""simxent-cache: the decoded-image cache's entries listed with their sizes, and cleared without touching a
file that a running decoder writes."""
import os
import subprocess
import sys

import torch

from simxent.cli import cache_main, main
from simxent.data import load_folder
from simxent.files import HOST, temp_path
from tests.conftest import write_image


def disk_bytes(*paths):
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def two_entries(tmp_path):
    """The cache of two real folders, a live decoder's temporary array and a dead one's."""
    cache = tmp_path / "cache"
    keys = []
    for name, n in (("small", 3), ("large", 9)):
        for i in range(n):
            write_image(tmp_path / name / f"{i}.png", seed=i)
        load_folder(tmp_path / name, 16, cache_dir=cache, workers=0, progress=False)
        keys.append(max(cache.glob("*.npy"), key=os.path.getmtime).stem)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = temp_path(cache / f"{keys[0][:16]}0000.npy", ".npy")  # named as the decoder names its array
    gone = cache / f".{keys[0][:16]}1111.json.{int(dead.stdout)}@{HOST}.0123abcd.tmp"
    for path in (live, gone):
        path.write_bytes(b"\0" * 5000)
    return cache, keys, live, gone


def test_list_names_each_entry_with_its_folder_and_size(tmp_path, capsys):
    cache, (small, large), live, gone = two_entries(tmp_path)
    assert cache_main(["--dir", str(cache), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out if line.split()[0] in (small, large)}
    assert rows[small].endswith(str(tmp_path / "small")) and rows[large].endswith(str(tmp_path / "large"))
    # size on disk, as du counts it: the array and its metadata
    for key in (small, large):
        size = disk_bytes(cache / f"{key}.npy", cache / f"{key}.json")
        assert f"{size / 1000:.1f} kB" in rows[key], (rows[key], size)
    assert any(live.name in line and f"being written by process {os.getpid()}" in line for line in out)
    assert any(gone.name in line and "left by the ended process" in line for line in out)
    assert out[-1].startswith("2 entries")
    assert cache_main(["list", "--dir", str(cache)]) == 0  # --dir after the command names the same folder
    assert capsys.readouterr().out.splitlines() == out
    # A mistyped --dir is one line naming it, not an empty cache.
    assert cache_main(["--dir", str(tmp_path / "cahce"), "list"]) == 2
    assert f"--dir {tmp_path / 'cahce'}: no such folder" in capsys.readouterr().err


def test_clear_by_key_then_all_keeps_a_live_writers_file(tmp_path, capsys):
    cache, (small, large), live, gone = two_entries(tmp_path)
    assert cache_main(["--dir", str(cache), "clear", small, small]) == 0  # named twice: cleared and counted once
    assert "removed 2 file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{large}.npy", f"{large}.json", live.name, gone.name])
    assert main(["cache", "--dir", str(cache), "clear", "--all"]) == 0
    assert [p.name for p in cache.iterdir()] == [live.name]
    assert f"kept {live.name}: process {os.getpid()} is writing it" in capsys.readouterr().out


def test_clear_all_leaves_files_that_are_not_cache_entries(tmp_path, capsys):
    """A cache folder shared with other files (data.cache_dir set to a project folder): only simxent's
    entries (20 hex digits) and its decoders' temporary files are listed and cleared."""
    cache, (small, large), live, gone = two_entries(tmp_path)
    theirs = [cache / name for name in ("package.json", "features.npy", f"{small}_backup.npy", ".x.json.1@h.ab.tmp")]
    for path in theirs:
        path.write_text("mine")
    assert cache_main(["--dir", str(cache), "list"]) == 0
    assert not any(p.name in capsys.readouterr().out for p in theirs)
    assert cache_main(["--dir", str(cache), "clear", "--all"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name] + [p.name for p in theirs])


def test_clear_refuses_an_unknown_key_and_deletes_nothing(tmp_path, capsys):
    cache, (small, large), _, _ = two_entries(tmp_path)
    before = sorted(cache.iterdir())
    assert cache_main(["--dir", str(cache), "clear", small, "feedbeef"]) == 2
    assert "no cache entry feedbeef" in capsys.readouterr().err
    assert sorted(cache.iterdir()) == before


def test_list_names_a_folder_given_by_a_relative_path_in_full(tmp_path, capsys, monkeypatch):
    for i in range(3):
        write_image(tmp_path / "photos" / f"{i}.png", seed=i)
    monkeypatch.chdir(tmp_path)
    load_folder("photos", 16, cache_dir=tmp_path / "cache", workers=0, progress=False)
    monkeypatch.chdir("/")
    assert cache_main(["--dir", str(tmp_path / "cache"), "list"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "photos" in line]
    assert row.endswith(f"  {tmp_path.resolve() / 'photos'}")


def test_list_names_a_cached_dataset_by_its_name(tmp_path, capsys, monkeypatch):
    from simxent.data import dataset_images
    monkeypatch.chdir(tmp_path)
    images = [torch.zeros(3, 8, 8, dtype=torch.uint8) + i for i in range(3)]
    load_folder(dataset_images(images, "my pets"), 8, cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert cache_main(["--dir", str(tmp_path / "cache"), "list"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "my pets" in line]
    assert row.endswith("  dataset my pets")  # not made a path under the current folder


def test_a_locked_array_is_a_live_writers_whatever_its_pid_says(tmp_path):
    """A decoder in another process-id space on this host (a container sharing the host's name) names its
    array with a pid that means nothing here, or an ended process's: its lock keeps the file, for the clean-up
    before a decode and for simxent-cache clear --all; unlocked, the file is a dead writer's."""
    from simxent.files import remove_dead_temp_files, writer_lock
    cache, _, _, gone = two_entries(tmp_path)
    other = cache / gone.name.replace(".json.", ".npy.").replace(".tmp", ".tmp.npy")  # named as a decoder names it
    other.write_bytes(b"\0" * 5000)
    with writer_lock(other):
        assert remove_dead_temp_files(cache) == [gone] and other.exists()
        assert cache_main(["--dir", str(cache), "clear", "--all"]) == 0 and other.exists()
    assert remove_dead_temp_files(cache) == [other]


def test_list_goes_on_when_a_clear_beside_it_removes_an_entry(tmp_path, monkeypatch, capsys):
    """An entry removed between the folder's listing and its files' stat (another simxent-cache clear) is
    left out of the list, not a FileNotFoundError."""
    from pathlib import Path
    cache, (small, large), _, _ = two_entries(tmp_path)
    is_file = Path.is_file

    def removed_once_seen(path):
        seen = is_file(path)
        if seen and path.stem == small:
            path.unlink()
        return seen
    monkeypatch.setattr(Path, "is_file", removed_once_seen)
    assert cache_main(["--dir", str(cache), "list"]) == 0
    out = capsys.readouterr().out
    assert large in out and small not in out and out.splitlines()[-1].startswith("1 entry,")
