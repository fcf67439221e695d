import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

# The smallest real run: a small convnet on 16 px shape images, a batch of 16, SGD, no decoding workers.
TINY_RUN = ["model.backbone=convnet", "model.head_hidden=32", "model.head_out=16", "data.image_size=16",
            "data.workers=0", "train.batch_size=16", "optim.name=sgd", "optim.lr=0.1"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test decodes into its own cache directory."""
    monkeypatch.setenv("SIMXENT_CACHE", str(tmp_path / "cache"))


def next_second() -> None:
    """Wait for the wall clock's next second. TensorBoard reads a folder's event files in name order, and a
    name is the writer's start second, then host and pid, then a process-wide counter that sorts "10" before
    "9": two sessions of a run started in one process within one second may be read in the wrong order
    (separate processes, as a real resume is, have their own start seconds)."""
    time.sleep(1 - time.time() % 1 + 0.01)


def write_image(path: Path, size=(16, 16), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode if mode != "P" else "L"]
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    im = Image.fromarray(a[..., 0] if channels == 1 else a, "L" if channels == 1 else mode)
    if mode == "P":
        im = im.convert("P")
    im.save(path)
    return path


@pytest.fixture
def load_script(monkeypatch):
    """``load_script(name)``: scripts/<name>.py as a module, set up as ``python scripts/<name>.py`` runs it
    (scripts/ on the path for its imports of its neighbours, the module in ``sys.modules``, where dataclasses
    look it up); both undone after the test."""
    def load(name: str):
        monkeypatch.syspath_prepend(str(ROOT / "scripts"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def one_thread():
    """Tiny tensor products: one torch thread is many times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def labelled_folder(tmp_path):
    """Two classes of random colour images, 24 each, 16 px."""
    root = tmp_path / "folder"
    for c, name in enumerate(("a", "b")):
        for i in range(24):
            write_image(root / name / f"{i}.png", seed=100 * c + i)
    return root


@pytest.fixture(scope="session")
def cifar():
    if not (CIFAR / "train").is_dir() or not (CIFAR / "test").is_dir():
        pytest.skip(f"real CIFAR-10 folder not found at {CIFAR}")
    return CIFAR
