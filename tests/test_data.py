"""Folder discovery, robust decoding and the decoded-image cache."""
import logging
import os
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

from simxent.data import (DataError, decode, decode_within, find_images, iterate_batches, load_folder,
                          open_stream)
from simxent.config import load_config
from simxent.train import pretrain
from tests.conftest import TINY_RUN, write_image


def test_a_run_folder_inside_the_image_folder_is_not_training_data(tmp_path, caplog):
    """out inside data.train: the run's own folder, and later runs', hold PNG figures; discovery leaves
    every folder holding a simxent run out (named in a warning), so the next run trains on the same images."""
    from simxent.config import load_config
    from simxent.demo import make_shapes
    from simxent.train import pretrain
    from tests.conftest import TINY_RUN

    train = make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=1, size=16) / "train"
    before = find_images(train)
    with caplog.at_level(logging.INFO, logger="simxent"):
        pretrain(load_config(None, [*TINY_RUN, f"data.train={train}", "train.epochs=1", "eval.every=0",
                                    "train.batch_size=10", f"out={train / 'run1'}"]), progress=False)
    assert list((train / "run1").rglob("*.png")) and f"{len(before.files)} training images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simxent"):
        after = find_images(train)
    assert after.files == before.files and after.classes == before.classes
    assert "left out 1 simxent run or output folder(s)" in caplog.text and "run1" in caplog.text
    # out = data.train itself: the run's own folders (figures, TensorBoard) are left out
    flat = make_shapes(tmp_path / "flat", train_per_class=4, test_per_class=1, size=16) / "train"
    images = find_images(flat)
    pretrain(load_config(None, [*TINY_RUN, f"data.train={flat}", "train.epochs=1", "eval.every=0",
                                "train.batch_size=10", f"out={flat}"]), progress=False)
    assert list((flat / "figures").rglob("*.png"))
    again = find_images(flat)
    assert again.files == images.files and again.classes == images.classes
    # A linear evaluation's --out inside an image folder: its figures are no training images either.
    from simxent.cli import linear_eval_main
    assert linear_eval_main(["--checkpoint", str(tmp_path / "shapes" / "train" / "run1" / "checkpoints" / "last.pt"),
                             "--train", str(tmp_path / "shapes" / "train"), "--test", str(tmp_path / "shapes" / "test"),
                             "--epochs", "1", "--knn-k", "2", "--workers", "0", "--no-progress",
                             "--out", str(flat / "evaluation")]) == 0
    assert list((flat / "evaluation").rglob("*.png"))
    assert find_images(flat).files == images.files


def test_discovery_nested_uppercase_and_unlabelled(tmp_path):
    write_image(tmp_path / "cat" / "deep" / "deeper" / "A.JPG")
    write_image(tmp_path / "cat" / "b.Png")
    write_image(tmp_path / "dog" / "c.jpeg")
    write_image(tmp_path / "loose.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    found = find_images(tmp_path)
    names = sorted(p.name for p in found.files)
    assert names == ["A.JPG", "b.Png", "c.jpeg", "loose.webp"]
    assert found.classes == ["cat", "dog"]
    by_name = {p.name: y for p, y in zip(found.files, found.labels)}
    assert by_name == {"A.JPG": 0, "b.Png": 0, "c.jpeg": 1, "loose.webp": -1}
    assert not found.labelled


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path, caplog):
    """A notebook's .ipynb_checkpoints beside the class folders, a .thumbs inside one, macOS's ._ companions."""
    write_image(tmp_path / "cat" / "a.png")
    write_image(tmp_path / "dog" / "b.png")
    write_image(tmp_path / ".ipynb_checkpoints" / "c.png")
    write_image(tmp_path / "cat" / ".thumbs" / "a.png")
    (tmp_path / "dog" / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found.files] == ["cat/a.png", "dog/b.png"]
    assert found.classes == ["cat", "dog"] and found.labelled
    assert "left out 3 hidden image file(s) and folder(s)" in caplog.text


def test_jpeg_under_other_names_is_read_and_unread_formats_are_counted(tmp_path, caplog):
    """.jfif and .jpe are JPEG (Windows saves web images so) and .avif Pillow reads: they vanished before, and a
    class of them went with them. HEIC photos, which Pillow cannot decode, are counted in a warning."""
    write_image(tmp_path / "dog" / "a.jpg", seed=3)
    (tmp_path / "cat").mkdir()
    shutil.copyfile(tmp_path / "dog" / "a.jpg", tmp_path / "cat" / "b.jfif")
    shutil.copyfile(tmp_path / "dog" / "a.jpg", tmp_path / "cat" / "c.JPE")
    avif = ".avif" in Image.registered_extensions()  # Pillow 11.3 and later
    if avif:
        Image.open(tmp_path / "dog" / "a.jpg").save(tmp_path / "cat" / "d.avif")
    (tmp_path / "dog" / "e.heic").write_bytes(b"....ftypheic")
    with caplog.at_level("WARNING", logger="simxent"):
        found = find_images(tmp_path)
    assert sorted(p.name for p in found.files) == ["a.jpg", "b.jfif", "c.JPE"] + ["d.avif"] * avif
    assert found.classes == ["cat", "dog"]
    np.testing.assert_array_equal(decode(tmp_path / "cat" / "b.jfif", 16), decode(tmp_path / "dog" / "a.jpg", 16))
    assert not avif or decode(tmp_path / "cat" / "d.avif", 16).shape == (16, 16, 3)
    assert f"left out 1 image(s) in {tmp_path} in formats simxent does not decode (.heic;" in caplog.text


def test_missing_and_empty_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in .*empty"):
        find_images(tmp_path / "empty")


def test_symlink_loop_terminates(tmp_path):
    write_image(tmp_path / "a" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    assert [p.name for p in find_images(tmp_path).files] == ["x.png"]


def test_a_class_folder_without_a_readable_image_is_named(tmp_path, caplog):
    """Kept (class indices stay those of the sorted folder names) but named: a probe can never predict it."""
    for i in range(2):
        write_image(tmp_path / "a" / f"{i}.png", seed=i)
        write_image(tmp_path / "c" / f"{i}.png", seed=i)
    (tmp_path / "b" / "x.jpg").parent.mkdir()
    (tmp_path / "b" / "x.jpg").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        data = load_folder(tmp_path, 8, workers=0, progress=False)
    assert data.classes == ["a", "b", "c"] and data.labels.tolist() == [0, 0, 2, 2]
    named = [r.getMessage() for r in caplog.records if "with no readable image" in r.getMessage()]
    assert len(named) == 1 and named[0].endswith(": b")


def test_modes_become_rgb(tmp_path):
    for mode in ("L", "RGBA", "P"):
        path = write_image(tmp_path / f"{mode}.png", size=(20, 12), mode=mode)
        out = decode(path, 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    grey = decode(tmp_path / "L.png", 8)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # Fully transparent RGBA composites onto white, whatever the hidden colour channels hold.
    clear = np.zeros((10, 10, 4), dtype=np.uint8)
    clear[..., :3] = 7
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert (decode(tmp_path / "clear.png", 10) == 255).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.full((6, 6), 32768, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert abs(int(decode(tmp_path / "deep.png", 6)[0, 0, 0]) - 128) <= 1


def test_float_tiffs_are_read_by_their_range(tmp_path):
    """Float images in [0, 1] (scikit-image's and tifffile's convention) decode as the 8-bit image of the same
    picture, not as black; float images in [0, 255] as themselves; NaN as black."""
    grey = np.random.default_rng(0).integers(0, 256, (6, 6)).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    expected = decode(tmp_path / "grey.png", 6)
    for name, pixels in (("unit", grey / 255.0), ("bytes", grey.astype(np.float64))):
        Image.fromarray(pixels.astype(np.float32), "F").save(tmp_path / f"{name}.tif")
        assert np.abs(decode(tmp_path / f"{name}.tif", 6).astype(int) - expected).max() <= 1, name
    hole = (grey / 255.0).astype(np.float32)
    hole[0, 0] = np.nan
    Image.fromarray(hole, "F").save(tmp_path / "hole.tif")
    out = decode(tmp_path / "hole.tif", 6)
    assert (out[0, 0] == 0).all() and np.abs(out[1:].astype(int) - expected[1:]).max() <= 1


def test_a_bad_training_image_is_named_once_when_the_knn_bank_decodes_it_again(tmp_path, caplog):
    """Larger images are cached padded for training, so the kNN bank decodes data.train a second time
    (the evaluation transform): its warnings are not repeated."""
    for split, n in (("train", 10), ("val", 3)):
        for c in ("a", "b"):
            for i in range(n):
                write_image(tmp_path / split / c / f"{i}.png", size=(24, 20), seed=i)
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"not a png")
    cfg = load_config(None, [*TINY_RUN, f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
                             "train.epochs=1", "train.precision=fp32", f"out={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="simxent"):
        pretrain(cfg, progress=False)
    assert caplog.text.count("bad.png") == 1 and "skipped 1 unreadable image(s)" in caplog.text


def test_corrupt_files_are_skipped_and_named(tmp_path, caplog):
    for i in range(5):
        write_image(tmp_path / "ok" / f"{i}.png", seed=i)
    (tmp_path / "ok" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "ok" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        data = load_folder(tmp_path, 8, workers=0, progress=False)
    assert len(data) == 5 and len(data.skipped) == 2
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text
    again = load_folder(tmp_path, 8, workers=0, progress=False)  # from the cache: the same five images
    assert torch.equal(again.images, data.images) and again.files == data.files and len(again.skipped) == 2
    assert torch.equal(load_folder(tmp_path, 8, workers=0, cache=False, progress=False).images, data.images)
    with pytest.raises(DataError, match="broken.jpg|empty.png"):
        load_folder(tmp_path, 8, workers=0, cache=False, on_bad_image="error", progress=False)
    with pytest.raises(DataError, match="broken.jpg|empty.png"):  # the cached folder remembers its bad files
        load_folder(tmp_path, 8, workers=0, on_bad_image="error", progress=False)


def test_a_file_denied_by_its_permissions_is_read_once_they_allow_it(tmp_path, monkeypatch):
    """A permission error is not a fault of the file: the cache's entry skips it while it stays unreadable
    (other processes of a torchrun job read the entry), and the folder is decoded again once it is not."""
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    opened, access = Image.open, os.access

    def locked(path, *args, **kwargs):  # as for a file of mode 000 (the tests may run as root)
        if Path(path).name == "2.png":
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", locked)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "2.png" and access(path, mode))
    cache = tmp_path / "cache"
    first = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    assert len(first) == 3 and "PermissionError" in first.reasons[str(tmp_path / "imgs" / "2.png")]
    assert len(list(cache.glob("*.json"))) == 1  # cached: a torchrun job's other processes read it
    still = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    assert len(still) == 3 and torch.equal(still.images, first.images)  # the entry, while 2.png stays denied
    monkeypatch.setattr(Image, "open", opened)  # the permissions mended
    monkeypatch.setattr(os, "access", access)
    again = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    assert len(again) == 4 and not again.skipped and len(list(cache.glob("*.npy"))) == 1


def test_an_entry_never_pairs_one_decodes_pixels_with_anothers_labels(tmp_path, monkeypatch):
    """An entry decoded again (a denied file now readable) while another user, still denied, decodes it too:
    the writes can interleave (array A, array B, metadata B, metadata A; or a kill between two renames). The
    denied user's metadata beside the other's array would shift every image after the denied one onto the
    next file's label; such a pair is a miss, decoded again."""
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    opened, access = Image.open, os.access

    def locked(path, *args, **kwargs):
        if Path(path).name == "1.png":
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    def deny():
        monkeypatch.setattr(Image, "open", locked)
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "1.png" and access(path, mode))
    cache = tmp_path / "cache"
    deny()
    denied = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    (meta,) = cache.glob("*.json")
    denied_meta = meta.read_bytes()
    monkeypatch.setattr(Image, "open", opened)
    monkeypatch.setattr(os, "access", access)
    assert len(load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)) == 4
    meta.write_bytes(denied_meta)  # the readable decode's array, the denied decode's metadata
    deny()
    again = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    assert again.files == denied.files and torch.equal(again.images, denied.images)
    meta.write_text("{\"good\": [0, 1")  # damaged metadata is a miss too, not a traceback
    assert torch.equal(load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False).images,
                       denied.images)


def test_an_array_replaced_as_it_is_opened_is_a_miss(tmp_path, monkeypatch):
    """Another decode's array renamed into place between the metadata check and the array's opening: the
    mapped array is checked again after it is opened, and such an entry is decoded again."""
    import simxent.data
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    cache = tmp_path / "cache"
    first = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    (array,) = cache.glob("*.npy")
    other = tmp_path / "other.npy"
    np.save(other, np.zeros_like(np.load(array)))
    load = np.load

    def replaced_then_loaded(path, *args, **kwargs):
        if Path(path) == array and other.exists():
            os.replace(other, array)
        return load(path, *args, **kwargs)
    monkeypatch.setattr(simxent.data.np, "load", replaced_then_loaded)
    again = load_folder(tmp_path / "imgs", 8, cache_dir=cache, workers=0, progress=False)
    assert torch.equal(again.images, first.images)


def test_a_cache_on_a_filesystem_without_locks_still_fills(tmp_path, monkeypatch):
    """NFS without lock support, Lustre without flock: the decoder's writer lock fails (ENOLCK) and the
    decode goes on, its pid alone keeping its file from clean-ups."""
    import errno
    import fcntl
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    data = load_folder(tmp_path / "imgs", 8, cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert len(data) == 3 and len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_folder_of_only_bad_files_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"no readable images in .* \(1 files could not be read\)$"):
        load_folder(tmp_path, 8, workers=0, progress=False)
    # Items all wrong alike (float tensors, say) are one mistake, and the error says which.
    from simxent.data import dataset_images
    with pytest.raises(DataError, match=r"\(3 files could not be read; all for the reason TypeError: the item is "
                                        r"a torch.float32 tensor: give uint8 pixels"):
        load_folder(dataset_images([torch.rand(3, 8, 8)] * 3), 8, workers=0, cache=False, progress=False)


def test_an_empty_simxent_cache_variable_is_the_default_folder(monkeypatch):
    from pathlib import Path
    from simxent.data import default_cache_dir
    monkeypatch.setenv("SIMXENT_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "simxent"


def test_cache_equals_direct_decode_and_follows_changes(tmp_path):
    root = tmp_path / "imgs"
    for i in range(6):
        write_image(root / "c" / f"{i}.png", size=(24, 20), seed=i)
    cache = tmp_path / "cache"
    direct = load_folder(root, 12, cache=False, workers=0, progress=False)
    first = load_folder(root, 12, cache_dir=cache, workers=0, progress=False)
    assert len(list(cache.glob("*.npy"))) == 1
    again = load_folder(root, 12, cache_dir=cache, workers=2, progress=False)
    assert torch.equal(direct.images, first.images) and torch.equal(first.images, again.images)
    assert len(list(cache.glob("*.npy"))) == 1  # reused, not re-decoded
    # 24 x 20 images for 12 px views: longer side at decode_side(12) = 18, aspect kept, stored top-left.
    assert again.images.shape == (6, 18, 18, 3) and again.sizes.tolist() == [[15, 18]] * 6
    expected = np.stack([decode_within(root / "c" / f"{i}.png", 18) for i in range(6)])
    assert np.array_equal(again.images[:, :15, :18].numpy(), expected)
    assert not again.images[:, 15:].any()
    # For 24 px views no image is larger than the view, but none is square: each is kept whole, at its own size.
    whole = load_folder(root, 24, cache_dir=cache, workers=0, progress=False)
    assert whole.sizes.tolist() == [[20, 24]] * 6
    assert np.array_equal(whole.images[:, :20, :24].numpy(), np.stack([decode_within(root / "c" / f"{i}.png", 36)
                                                                       for i in range(6)]))
    assert len(list(cache.glob("*.npy"))) == 2
    write_image(root / "c" / "new.png", seed=99)
    changed = load_folder(root, 12, cache_dir=cache, workers=0, progress=False)
    assert len(changed) == 7 and len(list(cache.glob("*.npy"))) == 3


def test_a_load_stats_the_folder_once_and_keeps_the_cache_names(tmp_path, monkeypatch):
    """The file listing (the folder, then path, size, mtime, ctime of each file) is made once per load, miss or
    hit, though the cache is looked up under two layouts; the cache file is named by the sha1 of
    "simxent-v5 <layout>", a "folder <resolved path>" line and a "path, bytes, mtime_ns, ctime_ns" line per
    file."""
    import hashlib

    import simxent.data as data

    root = tmp_path / "imgs"
    for i in range(3):
        write_image(root / "c" / f"{i}.png", size=(24, 20), seed=i)
    calls = []
    real = data._listing
    monkeypatch.setattr(data, "_listing", lambda images: calls.append(1) or real(images))
    for _ in range(2):  # a miss (two layouts looked up, then decoded), then a hit
        load_folder(root, 12, cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert len(calls) == 2
    stats = [(root / "c" / f"{i}.png").stat() for i in range(3)]
    lines = "".join(f"c/{i}.png\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n" for i, st in enumerate(stats))
    layout = data.Layout("padded", 12, data.decode_side(12))
    key = hashlib.sha1(f"simxent-v5 {layout.key()}\nfolder\t{root.resolve()}\n{lines}".encode()).hexdigest()[:20]
    assert [p.name for p in (tmp_path / "cache").glob("*.npy")] == [f"{key}.npy"]
    # Crop ratios that differ past six digits decode to other sides: the key keeps every digit.
    assert data.Layout("square", 16, 16, 0.1234561).key() != data.Layout("square", 16, 16, 0.1234564).key()


def test_a_file_replaced_with_its_old_size_and_time_is_decoded_again(tmp_path):
    """``cp -p``, ``rsync -t`` and ``tar x`` set a file's modification time back; its change time moves on, so
    a BMP (size fixed by its dimensions) replaced by another image with the old time restored is not read
    from the cache as the old pixels."""
    cache, path = tmp_path / "cache", tmp_path / "imgs" / "c" / "0.bmp"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (30, 30, 30)).save(path)
    before = path.stat()
    assert (load_folder(path.parent.parent, 8, cache_dir=cache, workers=0, progress=False).images == 30).all()
    time.sleep(0.05)  # a later change time where the kernel keeps it to a coarse clock tick
    Image.new("RGB", (8, 8), (225, 225, 225)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert (load_folder(path.parent.parent, 8, cache_dir=cache, workers=0, progress=False).images == 225).all()


def test_two_folders_of_same_named_same_sized_files_are_cached_apart(tmp_path):
    """BMPs have a size fixed by their dimensions: two folders with the same file names, sizes and times
    (as unpacked from one archive) but other pixels must not share a cache entry, or a test folder would
    be scored on the training folder's images."""
    cache = tmp_path / "cache"
    for name, grey in (("a", 30), ("b", 225)):
        for i in range(3):
            path = tmp_path / name / "c" / f"{i}.bmp"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (grey, grey, grey)).save(path)
            os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    a = load_folder(tmp_path / "a", 8, cache_dir=cache, workers=0, progress=False)
    b = load_folder(tmp_path / "b", 8, cache_dir=cache, workers=0, progress=False)
    assert (a.images == 30).all() and (b.images == 225).all()
    assert len(list(cache.glob("*.npy"))) == 2


def test_batches_cover_epoch_and_resume_in_place(labelled_folder):
    data = load_folder(labelled_folder, 16, workers=0, progress=False)
    batches = list(iterate_batches(data, 10, torch.Generator().manual_seed(1)))
    assert [s for s, _ in batches] == [0, 1, 2, 3] and batches[0][1].images.shape == (10, 3, 16, 16)
    rest = list(iterate_batches(data, 10, torch.Generator().manual_seed(1), start=2))
    assert [s for s, _ in rest] == [2, 3]
    assert all(torch.equal(a.images, b.images) for (_, a), (_, b) in zip(batches[2:], rest))
    flat = torch.cat([b.images for _, b in batches]).flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == 40  # no image twice in an epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_yields_the_cached_batches(labelled_folder, workers):
    """Streaming decodes in workers every epoch; each process's share of each batch equals the cache's
    (images no larger than the view: squares, cropped on the device)."""
    cached = load_folder(labelled_folder, 16, workers=0, progress=False)
    stream = open_stream(labelled_folder, 16, workers=workers)
    assert len(stream) == len(cached) and stream.classes == cached.classes
    assert torch.equal(stream.labels, cached.labels)
    for rank in (0, 1):
        a = list(iterate_batches(cached, 10, torch.Generator().manual_seed(3), start=1, rank=rank, world=2))
        b = list(iterate_batches(stream, 10, torch.Generator().manual_seed(3), start=1, rank=rank, world=2))
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        assert all(torch.equal(x.images, y.images) and not y.cropped for (_, x), (_, y) in zip(a, b))


def test_stream_replaces_a_bad_file_and_names_it(labelled_folder, caplog):
    bad = labelled_folder / "a" / "3.png"
    bad.write_bytes(b"not a png")
    stream = open_stream(labelled_folder, 16, workers=0)
    with caplog.at_level(logging.WARNING, logger="simxent"):
        batches = [b.images for _, b in iterate_batches(stream, 48, torch.Generator().manual_seed(0))]
    assert len(batches) == 1 and batches[0].shape == (48, 3, 16, 16)  # the batch keeps its size
    assert stream.skipped == [str(bad)] and str(bad) in caplog.text
    assert stream.reasons == {str(bad): "UnidentifiedImageError: cannot identify image file"}
    assert "cannot identify image file" in caplog.text  # the reason, in the warning too
    strict = open_stream(labelled_folder, 16, workers=0, on_bad_image="error")
    with pytest.raises(DataError, match="3.png"):
        list(iterate_batches(strict, 48, torch.Generator().manual_seed(0)))


def test_reasons_survive_the_padded_cache_and_the_cropped_stream(tmp_path):
    """Images larger than the view: the padded layout's reasons are written to and read back from the cache
    metadata beside the true sizes, and the stream's cropped batches name the same file for the same reason."""
    for i in range(4):
        write_image(tmp_path / "img" / "a" / f"{i}.png", size=(24, 16), seed=i)
    bad = tmp_path / "img" / "a" / "bad.png"
    bad.write_bytes(b"not a png")
    expected = {str(bad): "UnidentifiedImageError: cannot identify image file"}
    data = load_folder(tmp_path / "img", 8, workers=0, progress=False)
    again = load_folder(tmp_path / "img", 8, workers=0, progress=False)  # from the cache
    assert data.sizes is not None and torch.equal(again.sizes, data.sizes)
    assert data.reasons == again.reasons == expected and again.skipped == [str(bad)]
    stream = open_stream(tmp_path / "img", 8, workers=0)
    (_, batch), = iterate_batches(stream, 5, torch.Generator().manual_seed(0))
    assert batch.cropped and batch.images.shape == (10, 3, 8, 8)
    assert stream.reasons == expected


def test_cache_that_cannot_fit_the_disk_is_refused_with_the_way_out(labelled_folder, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(DataError, match="data.stream=true"):
        load_folder(labelled_folder, 8, cache_dir=tmp_path / "c", workers=0, progress=False)


def test_batch_labels_follow_the_batches():
    """Supervised contrastive training reads each batch's labels beside its images: for every process and
    a resumed epoch, the labels are those of the images the batch holds."""
    from simxent.data import ImageArray
    from simxent.train import batch_labels

    n = 50
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 3).contiguous()  # pixel = index
    labels = torch.tensor([(7 * i) % 5 for i in range(n)])
    data = ImageArray(images, labels, list("abcde"), [f"{i}.png" for i in range(n)], [])
    for rank in range(2):
        batches = iterate_batches(data, 10, torch.Generator().manual_seed(4), start=1, rank=rank, world=2)
        ys = batch_labels(data, 10, torch.Generator().manual_seed(4), start=1, rank=rank, world=2)
        pairs = list(zip(batches, ys, strict=True))
        assert len(pairs) == 4
        for (_, x), y in pairs:
            assert y.tolist() == labels[x.images[:, 0, 0, 0].long()].tolist()


def test_a_folder_reached_twice_through_links_is_named_with_the_path_its_images_were_read_under(tmp_path, caplog):
    """cats/see_also -> ../dogs is walked first (sorted), each real folder once: the dogs are read as cats and
    the class dogs is gone. Which path is meant cannot be known (data/cat -> raw/a may define the classes), so
    the walk keeps its order and says what it did, where it said nothing."""
    for c in ("cats", "dogs"):
        for i in range(2):
            write_image(tmp_path / c / f"{c}{i}.png", seed=i)
    os.symlink(tmp_path / "dogs", tmp_path / "cats" / "see_also")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        found = find_images(tmp_path)
    assert found.classes == ["cats"] and len(found.files) == 4
    assert "reached twice through links" in caplog.text
    assert f"{tmp_path / 'dogs'} is {tmp_path / 'cats' / 'see_also'}" in caplog.text


def test_a_turned_tiff_has_the_extent_and_the_streamed_views_of_the_same_turned_png(tmp_path):
    """Pillow 11 and later give a TIFF of EXIF orientation 5-8 its upright size on opening; swapping the
    sides again drew the streamed crops over the wrong shape and squeezed them."""
    from simxent.data import decode_views, image_extent

    upright = np.zeros((48, 24, 3), np.uint8)
    upright[::8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 48 wide, 24 tall; shown turned back
    for suffix in ("tif", "png"):
        stored.save(tmp_path / f"turned.{suffix}", exif=exif)
    assert image_extent(tmp_path / "turned.tif") == image_extent(tmp_path / "turned.png") == (48, 24)
    views = [decode_views(tmp_path / f"turned.{s}", 16, (0.5, 1.0), torch.Generator().manual_seed(0))
             for s in ("tif", "png")]
    assert torch.equal(views[0][1], views[1][1]) and np.array_equal(views[0][0], views[1][0])


def test_a_16_bit_pgm_is_scaled_from_its_maxval_whatever_its_brightest_pixel(tmp_path):
    """Pillow opens a 16-bit PGM as mode I, scaled to 65535: a dark one (no pixel above 255) was read as
    8-bit, up to 255 times too bright; the same pixels in a 16-bit PNG were right."""
    dark = np.full((8, 8), 200, dtype=np.uint16)  # 200 of 65535, so 1 of 255: no pixel above 255
    Image.fromarray(dark).save(tmp_path / "dark.png")
    (tmp_path / "dark.pgm").write_bytes(b"P5 8 8 65535\n" + dark.astype(">u2").tobytes())
    assert Image.open(tmp_path / "dark.pgm").mode.startswith("I")
    assert decode(tmp_path / "dark.pgm", 8)[4, 4].tolist() == decode(tmp_path / "dark.png", 8)[4, 4].tolist() == [1] * 3


def test_pbm_and_pnm_are_images_and_other_formats_are_counted(tmp_path, caplog):
    write_image(tmp_path / "a.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "b.pbm")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.pnm", format="PPM")
    Image.new("RGB", (8, 8)).save(tmp_path / "d.tga")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        found = find_images(tmp_path)
    assert sorted(Path(f).name for f in found.files) == ["a.png", "b.pbm", "c.pnm"]
    assert "left out 1 image(s)" in caplog.text and ".tga" in caplog.text


def test_a_stream_without_one_readable_file_is_one_line(tmp_path):
    """Raised in a DataLoader worker, the error came wrapped in the worker's traceback."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
    stream = open_stream(tmp_path, 8, workers=1)
    with pytest.raises(DataError, match=r"^no readable images among the 4 files streamed, such as .*0.jpg") as e:
        next(iter(stream.batches(2, torch.Generator().manual_seed(0))))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_decoding_worker_dies_with_a_run_killed_outright(tmp_path):
    """A worker leaves the run's process group (so that a Ctrl-C reaches the main process alone): a run
    SIGKILLed mid-decode left its workers behind, holding its files and a pipe's end open for minutes."""
    pids = tmp_path / "worker.pid"
    script = (
        "import os, time\n"
        "from torch.utils.data import DataLoader\n"
        "from simxent.data import leave_stop_signals_to_the_main_process, start_workers\n"
        "class Slow:\n"
        "    def __len__(self): return 100\n"
        "    def __getitem__(self, i):\n"
        f"        open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "        time.sleep(60)\n"
        "loader = DataLoader(Slow(), num_workers=1, worker_init_fn=leave_stop_signals_to_the_main_process)\n"
        "next(start_workers(loader))\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pids.read_text().split()[0])
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    still = alive(worker)
    if still:
        os.kill(worker, signal.SIGKILL)
    assert not still, "the worker outlived its killed parent"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_started_by_a_short_lived_thread_outlive_it():
    """The kernel takes the forking thread for a worker's parent: workers that a user's thread started must
    not die with that thread (the parent-death signal is asked for by the main thread's workers only)."""
    import threading

    from torch.utils.data import DataLoader

    from simxent.data import leave_stop_signals_to_the_main_process, start_workers

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            time.sleep(0.05)
            return i

    started = {}

    def start():
        started["batches"] = start_workers(DataLoader(Slow(), batch_size=2, num_workers=2,
                                                      worker_init_fn=leave_stop_signals_to_the_main_process))
        started["first"] = next(started["batches"])

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    time.sleep(0.5)
    assert sorted([*started["first"].tolist(), *(i for b in started["batches"] for i in b.tolist())]) == list(range(12))
