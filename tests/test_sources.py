"""Training sources besides a folder: a text file listing image paths and a user's Dataset of images. Each is
decoded, cached, streamed, skipped and resumed as a folder is."""
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simxent.checkpoint import load_checkpoint
from simxent.config import ConfigError, load_config
from simxent.data import DataError, dataset_images, find_images, iterate_batches, load_folder, open_stream
from simxent.demo import make_shapes
from simxent.train import pretrain
from tests.conftest import write_image
from tests.test_reliability import assert_same_weights, kill_then_resume, run_to_the_end, tiny


class Items(torch.utils.data.Dataset):
    """A Dataset over given items (images, pixels, tuples or anything), counting reads; an exception item
    is raised when read."""

    def __init__(self, items):
        self.items, self.reads = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads += 1
        if isinstance(self.items[i], Exception):
            raise self.items[i]
        return self.items[i]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_a_list_file_is_read_like_the_folder_it_names(tmp_path, caplog):
    root = tmp_path / "imgs"
    files = [write_image(root / "c" / f"{i}.png", size=(24, 20), seed=i) for i in range(5)]
    listing = tmp_path / "train.txt"
    listing.write_text(f"# five images, one missing\n\n  imgs/c/0.png  \n{files[1]}\nimgs/c/2.png\r\n"
                       f"imgs/gone.png\nimgs/c/3.png\nimgs/c/4.png\n")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        data = load_folder(listing, 12, workers=0, progress=False)
    folder = load_folder(root, 12, workers=0, progress=False, cache=False)
    assert [Path(f).name for f in data.files] == [f"{i}.png" for i in range(5)]
    assert data.skipped == [str(tmp_path / "imgs" / "gone.png")] and "gone.png" in caplog.text
    assert torch.equal(data.images, folder.images) and torch.equal(data.sizes, folder.sizes)
    assert (data.labels == -1).all() and data.classes == []
    cache = Path(os.environ["SIMXENT_CACHE"])
    assert len(list(cache.glob("*.npy"))) == 1
    assert torch.equal(load_folder(listing, 12, workers=0, progress=False).images, data.images)
    assert len(list(cache.glob("*.npy"))) == 1  # unchanged list and files: the cache
    write_image(files[3], size=(20, 24), seed=9)  # a listed file changes: decoded again
    changed = load_folder(listing, 12, workers=0, progress=False)
    assert len(list(cache.glob("*.npy"))) == 2 and changed.sizes[3].tolist() == [18, 15]


def test_list_file_mistakes_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(DataError, match=r"no image paths listed in .*empty.txt"):
        load_folder(tmp_path / "empty.txt", 8, progress=False)
    image = write_image(tmp_path / "one.png")
    (tmp_path / "bom.txt").write_text("one.png\n", encoding="utf-8-sig")  # as a Windows editor saves it
    assert [Path(f).name for f in load_folder(tmp_path / "bom.txt", 8, progress=False).files] == ["one.png"]
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00a.png")
    with pytest.raises(DataError, match=r"binary.txt: not a text file of image paths"):
        load_folder(tmp_path / "binary.txt", 8, progress=False)
    (tmp_path / "twice.txt").write_text("one.png\n# a comment\n./one.png\n")
    with pytest.raises(DataError, match=r"twice.txt: ./one.png is listed on lines 1 and 3; list each image once"):
        load_folder(tmp_path / "twice.txt", 8, progress=False)
    (tmp_path / "twice.txt").write_text(f"one.png\n{image}\n")  # a list given by a relative path too
    with pytest.raises(DataError, match=r"is listed on lines 1 and 2"):
        load_folder(os.path.relpath(tmp_path / "twice.txt"), 8, progress=False)
    with pytest.raises(DataError, match="one.png is an image: give a folder of images or a text file"):
        load_folder(image, 8, progress=False)
    cfg = load_config(None, [f"data.train={tmp_path / 'empty.txt'}", f"out={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"^data.train: no image paths listed"):
        pretrain(cfg, progress=False)


def test_dataset_items_decode_as_their_files(tmp_path):
    """PIL images, CHW tensors, HWC arrays, grey and RGBA pixels and (image, label) pairs give the arrays
    their files give, in both layouts (squares; padded with true sizes)."""
    # 24 x 20 images at 12 px views are stored padded; 20 x 20 ones at 24 px as squares.
    for extent, size in (((24, 20), 12), ((20, 20), 24)):
        root = tmp_path / f"{extent[0]}x{extent[1]}"
        paths = [write_image(root / f"{i}.png", size=extent, mode=mode, seed=i)
                 for i, mode in enumerate(["RGB", "RGB", "RGB", "L", "RGBA", "RGB"])]
        items = [Image.open(paths[0]), torch.from_numpy(pixels(paths[1])).permute(2, 0, 1), pixels(paths[2]),
                 torch.from_numpy(pixels(paths[3])), torch.from_numpy(pixels(paths[4])).permute(2, 0, 1),
                 (Image.open(paths[5]), 7)]
        folder = load_folder(root, size, workers=0, progress=False, cache=False)
        data = load_folder(dataset_images(Items(items)), size, workers=0, progress=False)
        assert torch.equal(data.images, folder.images)
        assert (data.sizes is None) == (size == 24) and (data.sizes is None or torch.equal(data.sizes, folder.sizes))
        assert data.files == [f"Items[{i}]" for i in range(6)] and (data.labels == -1).all()
    assert not list(Path(os.environ["SIMXENT_CACHE"]).glob("*.npy"))  # no cache name: decoded in memory


def test_a_dataset_image_keeps_its_pixels_whatever_its_exif_says(tmp_path):
    upright = np.random.default_rng(0).integers(0, 256, (10, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate to display; a file is turned, a dataset's pixels are not
    for name, info in (("turned", {"exif": exif}), ("plain", {})):
        (tmp_path / name).mkdir()
        Image.fromarray(upright).save(tmp_path / name / "image.png", **info)
    item = Image.open(tmp_path / "turned" / "image.png")
    for size in (10, 30):  # padded, then squares
        data = load_folder(dataset_images(Items([item])), size, workers=0, progress=False)
        plain = load_folder(tmp_path / "plain", size, workers=0, progress=False, cache=False)
        turned = load_folder(tmp_path / "turned", size, workers=0, progress=False, cache=False)
        assert torch.equal(data.images, plain.images) and not torch.equal(data.images, turned.images)
    assert item.getexif()[0x0112] == 6  # the user's image is left as it was


def bad_items(tmp_path) -> list:
    good = [pixels(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(6)]
    return [*good[:2], OSError("disk gone"), good[2], "not an image", torch.zeros(3, 16, 16),
            torch.zeros(16, 16, 2, dtype=torch.uint8), *good[2:]]


def test_a_cache_name_used_again_for_other_images_does_not_read_the_earlier_ones(tmp_path):
    """Same name, same length, other pixels: another cache entry. The same items again: the cache's, with
    only the eight sampled items read."""
    first = [pixels(write_image(tmp_path / "a" / f"{i}.png", seed=i)) for i in range(12)]
    other = [pixels(write_image(tmp_path / "b" / f"{i}.png", seed=100 + i)) for i in range(12)]
    cache = tmp_path / "cache"
    a = load_folder(dataset_images(Items(first), "photos"), 16, cache_dir=cache, workers=0, progress=False)
    b = load_folder(dataset_images(Items(other), "photos"), 16, cache_dir=cache, workers=0, progress=False)
    direct = load_folder(dataset_images(Items(other)), 16, cache=False, workers=0, progress=False)
    assert torch.equal(b.images, direct.images) and not torch.equal(a.images, b.images)
    again = Items(first)
    assert torch.equal(load_folder(dataset_images(again, "photos"), 16, cache_dir=cache, workers=0,
                                   progress=False).images, a.images)
    assert again.reads == 8 and len(list(cache.glob("*.npy"))) == 2


def test_bad_dataset_items_are_skipped_and_named_by_index(tmp_path, caplog):
    items = bad_items(tmp_path)
    with caplog.at_level(logging.WARNING, logger="simxent"):
        data = load_folder(dataset_images(Items(items), "bad"), 16, workers=2, progress=False)
    assert data.skipped == ["bad[2]", "bad[4]", "bad[5]", "bad[6]"] and "bad[5]" in caplog.text
    assert len(data) == 7 and data.files[2] == "bad[3]"
    with pytest.raises(DataError, match=r"cannot read image bad\[2\]: OSError: disk gone"):
        load_folder(dataset_images(Items(items), "bad"), 16, workers=0, progress=False, cache=False,
                    on_bad_image="error")
    stream = open_stream(dataset_images(Items(items), "bad"), 16, workers=0)
    batches = [b.images for _, b in iterate_batches(stream, 11, torch.Generator().manual_seed(0))]
    assert batches[0].shape == (11, 3, 16, 16) and sorted(stream.skipped) == data.skipped
    with pytest.raises(DataError, match=r"pretrain\(train=...\): the dataset Items is empty"):
        pretrain(load_config(None, [f"out={tmp_path / 'run'}"]), progress=False, train=Items([]))
    with pytest.raises(DataError, match=r"pretrain\(train=...\): a int is not a dataset of images"):
        pretrain(load_config(None, [f"out={tmp_path / 'run'}"]), progress=False, train=3)
    with pytest.raises(ConfigError, match=r"data.train: .* is set and a dataset is given"):
        pretrain(load_config(None, [f"data.train={tmp_path}", f"out={tmp_path / 'run'}"]), train=Items(items))


def test_a_named_dataset_is_cached_under_its_name_and_length(tmp_path):
    items = [pixels(write_image(tmp_path / f"{i}.png", size=(20, 24), seed=i)) for i in range(5)]
    cache = Path(os.environ["SIMXENT_CACHE"])
    first = Items(items)
    data = load_folder(dataset_images(first, "mine-v1"), 12, workers=0, progress=False)
    assert first.reads >= 5 and len(list(cache.glob("*.npy"))) == 1
    again = Items(items)
    assert torch.equal(load_folder(dataset_images(again, "mine-v1"), 12, workers=0, progress=False).images,
                       data.images)
    assert again.reads == 5  # from the cache: only the items its key samples (eight at most) are read
    load_folder(dataset_images(Items(items[:4]), "mine-v1"), 12, workers=0, progress=False)
    load_folder(dataset_images(Items(items), "mine-v2"), 12, workers=0, progress=False)
    assert len(list(cache.glob("*.npy"))) == 3  # another length, another name: decoded anew


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_dataset_yields_the_cached_batches(labelled_folder, workers):
    files = find_images(labelled_folder).files
    dataset = Items([Image.open(f) for f in files])
    cached = load_folder(dataset_images(dataset), 16, workers=0, progress=False)
    stream = open_stream(dataset_images(dataset), 16, workers=workers)
    a = list(iterate_batches(cached, 10, torch.Generator().manual_seed(3), start=1))
    b = list(iterate_batches(stream, 10, torch.Generator().manual_seed(3), start=1))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    assert all(torch.equal(x.images, y.images) for (_, x), (_, y) in zip(a, b))


# A Dataset-backed run as a user starts it: a script that builds the Dataset and calls simxent.pretrain.
DATASET_SCRIPT = '''
import sys

import numpy as np
import torch
from PIL import Image

import simxent


class Pixels(torch.utils.data.Dataset):
    """Listed image files as uint8 CHW tensors."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)


listing, overrides = sys.argv[1], sys.argv[2:]
files = open(listing).read().split()
simxent.pretrain(simxent.load_config(None, overrides), progress=False, train=Pixels(files), cache_name="shapes")
'''
STEPS = 30  # 6 epochs of 80 images in batches of 16


@pytest.fixture(scope="module")
def shapes_and_reference(tmp_path_factory):
    """The shape images, a list of them in the folder's order, and the checkpoint of an uninterrupted
    folder run: a list or a Dataset of the same images must train to the same weights."""
    root = tmp_path_factory.mktemp("sources")
    shapes = make_shapes(root / "shapes", train_per_class=16, test_per_class=4, size=16)
    listing = root / "train.txt"
    listing.write_text("".join(f"{f}\n" for f in find_images(shapes / "train").files))
    run_to_the_end(run_args(shapes, root / "reference", f"data.cache_dir={root / 'cache'}"))
    return shapes, listing, load_checkpoint(root / "reference" / "checkpoints" / "last.pt")


def run_args(shapes, out, *more):
    return tiny(shapes, out, "train.epochs=6", "train.checkpoint_every=1", "train.keep_checkpoints=3", *more)


def test_a_list_backed_run_killed_and_resumed_equals_the_folder_run(shapes_and_reference, tmp_path):
    shapes, listing, reference = shapes_and_reference
    run = tmp_path / "run"
    resumed = kill_then_resume(run_args(shapes, run, f"data.train={listing}"), run, STEPS)
    assert resumed["position"] == reference["position"] == {"epoch": 6, "step": 0, "global_step": STEPS}
    assert_same_weights(reference, resumed)


def test_a_dataset_backed_run_killed_and_resumed_equals_the_folder_run(shapes_and_reference, tmp_path):
    shapes, listing, reference = shapes_and_reference
    script = tmp_path / "train_on_dataset.py"
    script.write_text(DATASET_SCRIPT)
    run = tmp_path / "run"
    args = [a for a in run_args(shapes, run) if not a.startswith("data.train=")]
    resumed = kill_then_resume(args, run, STEPS, command=[str(script), str(listing)])
    assert resumed["position"] == reference["position"]
    assert_same_weights(reference, resumed)
    assert len(list(Path(os.environ["SIMXENT_CACHE"]).glob("*.npy"))) == 1  # decoded once, under its name
