"""Image folders and the cache as files on disk: non-regular files, what failed or killed decoders leave
behind, a full cache disk, and a JPEG too short for the image its header declares."""
import errno
import io
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simxent.data import DataError, decode, find_images, load_folder, open_stream
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def images(folder: Path, n: int = 6) -> Path:
    for i in range(n):
        write_image(folder / f"{i}.png", seed=i)
    return folder


def test_fifo_named_like_an_image_is_skipped_by_name_not_read(tmp_path, caplog):
    folder = images(tmp_path / "f")
    os.mkfifo(folder / "x.jpg")  # opening it for reading would block until a writer comes: forever
    os.symlink(folder / "x.jpg", folder / "link_to_fifo.png")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        found = find_images(folder)
    assert sorted(p.name for p in found.files) == [f"{i}.png" for i in range(6)]
    assert sorted(p.name for p in found.irregular) == ["link_to_fifo.png", "x.jpg"]
    assert "2 image-named file(s)" in caplog.text and "x.jpg" in caplog.text
    data = load_folder(folder, 16, workers=0, progress=False)  # returns: nothing opens the FIFO
    assert len(data) == 6 and sorted(Path(f).name for f in data.skipped) == ["link_to_fifo.png", "x.jpg"]
    assert sorted(Path(f).name for f in open_stream(folder, 16, workers=0).skipped) == ["link_to_fifo.png", "x.jpg"]


def test_full_cache_disk_is_one_error_naming_the_folder_and_bytes(tmp_path, monkeypatch):
    folder = images(tmp_path / "f")
    cache = tmp_path / "cache"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DataError, match=rf"no space left in the image cache {cache}: .*needs ([\d,]+) bytes") as e:
        load_folder(folder, 16, cache_dir=cache, workers=0, progress=False)
    needed = int(re.search(r"needs ([\d,]+) bytes", str(e.value))[1].replace(",", ""))
    assert needed >= 6 * 16 * 16 * 3  # the pixels, plus the .npy header
    assert list(cache.iterdir()) == []  # no sparse array left behind


def test_failed_decode_leaves_no_temporary_array(tmp_path):
    folder = images(tmp_path / "f")
    (folder / "bad.png").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        load_folder(folder, 16, cache_dir=cache, workers=0, on_bad_image="error", progress=False)
    assert list(cache.iterdir()) == []


def test_killed_decoders_array_is_removed_and_a_live_ones_kept(tmp_path):
    from simxent.files import temp_path

    folder = images(tmp_path / "f")
    cache = tmp_path / "cache"
    # A decoder SIGKILLed in the middle of its folder (its third image), as an out-of-memory kill would.
    code = ("import os, signal, simxent.data as d\n"
            "real, n = d.decode, [0]\n"
            "def dying(path, size):\n"
            "    n[0] += 1\n"
            "    if n[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(path, size)\n"
            "d.decode = dying\n"
            f"d.load_folder({str(folder)!r}, 16, cache_dir={str(cache)!r}, workers=0, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(cache.iterdir())
    assert len(left) == 1 and left[0].stat().st_size >= 6 * 16 * 16 * 3
    live = temp_path(cache / "other.npy", ".npy")  # another decoder, alive (this process), still writing
    live.write_bytes(b"in progress")
    data = load_folder(folder, 16, cache_dir=cache, workers=0, progress=False)
    assert len(data) == 6 and not left[0].exists() and live.exists()


def test_jpeg_too_short_for_its_declared_size_is_bad(tmp_path):
    """A 631-byte file whose header claims 9000x9000: libjpeg would fill the missing scan with grey."""
    buf = io.BytesIO()
    Image.new("RGB", (9000, 9000), (200, 30, 30)).save(buf, "JPEG", quality=50)
    head = buf.getvalue()[:629] + b"\xff\xd9"  # cut inside the scan, then an end-of-image marker
    (tmp_path / "short.jpg").write_bytes(head)
    with pytest.raises(OSError, match="truncated JPEG: 631 bytes cannot hold the 9000x9000 image"):
        decode(tmp_path / "short.jpg", 16)
    # No false alarm on the smallest honest JPEGs: flat images, baseline with optimised tables and progressive.
    for name, opts in (("optimised.jpg", {"optimize": True}), ("progressive.jpg", {"progressive": True})):
        Image.new("L", (2000, 1000), 77).save(tmp_path / name, "JPEG", quality=1, **opts)
        with Image.open(tmp_path / name) as im:
            expected = np.asarray(im.convert("RGB"))[:16, :16]
        assert np.array_equal(decode(tmp_path / name, 16), expected)
