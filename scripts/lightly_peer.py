#!/usr/bin/env python
"""lightly's standard SimCLR pipeline training simxent's ``cpu`` model: the peer of ``scripts/benchmark.py
--only lightly``, which runs this file in a separate Python that has lightly installed, with PYTHONPATH at
simxent's repository root (simxent never depends on lightly).

    python scripts/lightly_peer.py --train DATA/train --out OUT --image-size 64 --minutes 30 --marks 2,5,10,30
    python scripts/lightly_peer.py --train DATA/train --out OUT --image-size 64 --epochs 10

The pipeline, as lightly's examples write it: ``SimCLRTransform(input_size, cj_strength=0.5,
gaussian_blur=0.0)`` (lightly's other defaults: crops of 8 % to 100 %, ImageNet normalisation), torchvision's
``ImageFolder`` and ``DataLoader`` (batch 256, shuffled, last partial batch dropped, 2 persistent workers),
one forward per view (z0 = model(x0); z1 = model(x1)), ``NTXentLoss(temperature=0.2)``, AdamW at a
constant lr of 1e-3 with torch's default weight decay, bf16 autocast where simxent's ``train.precision=auto``
picks it (a CPU with native bf16, a GPU), else float32. The model is simxent's: the cpu preset's encoder
(``convnet_slim``) and ``ProjectionHead``.

Training stops after ``--epochs`` or ``--minutes``, whichever comes first; minutes count from the end of the
imports (worker start-up and data loading included), as simxent's run in the benchmark's process, whose
modules are imported before its clock starts. The encoder's plain state dict (what
``simxent-linear-eval --backbone convnet_slim`` scores) is saved as ``OUT/epoch-<e>.pt`` at every epoch end and
``OUT/mark-<m>min.pt`` at the end of the step that crosses each of ``--marks`` minutes (``--minutes`` is one);
``OUT/progress.json`` records each save's {epoch, step, seconds, images_per_s} (images trained / seconds
since the start).
"""
import argparse
import importlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from simxent.config import load_config
from simxent.models import ProjectionHead, backbone
from simxent.runtime import autocast, resolve_device, resolve_dtype

BATCH_SIZE = 256
WORKERS = 2
TEMPERATURE = 0.2
LR = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="image folder with class sub-folders (ImageFolder)")
    p.add_argument("--out", required=True, help="folder for the encoder snapshots and progress.json")
    p.add_argument("--image-size", type=int, default=32, help="SimCLRTransform's input_size")
    p.add_argument("--epochs", type=int, default=0, help="stop after this many epochs (0: no limit)")
    p.add_argument("--minutes", type=float, default=0, help="stop after this many minutes (0: no limit)")
    p.add_argument("--marks", default="", help="comma-separated minutes at which to save the encoder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.epochs <= 0 and a.minutes <= 0:
        p.error("give --epochs or --minutes (or both)")
    a.marks = {float(m) for m in a.marks.split(",") if m.strip()}
    if a.minutes and any(m > a.minutes for m in a.marks):
        p.error(f"--marks {sorted(a.marks)} go beyond --minutes {a.minutes:g}")
    a.marks = sorted(a.marks | ({a.minutes} if a.minutes else set()))  # a stop on time leaves a snapshot
    return a


def cpu_preset_model(image_size: int) -> tuple[nn.Module, nn.Module]:
    """simxent's cpu preset model: (encoder, encoder followed by the projection head)."""
    sizes = load_config("cpu").model
    encoder, dim = backbone(sizes.backbone, sizes.cifar_stem, image_size)
    return encoder, nn.Sequential(encoder, ProjectionHead(dim, sizes.head_hidden, sizes.head_out, sizes.head_layers))


def save_encoder(encoder: nn.Module, path: Path) -> None:
    """The encoder's plain ``state_dict()``, written whole or not at all (a temporary file renamed over)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(encoder.state_dict(), tmp)
    os.replace(tmp, path)


def lightly_loader(train: str, image_size: int) -> torch.utils.data.DataLoader:
    """lightly's two SimCLR views of every image of an ImageFolder, in shuffled batches of 256."""
    import torchvision
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=image_size, cj_strength=0.5, gaussian_blur=0.0)
    dataset = torchvision.datasets.ImageFolder(train, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
                                       num_workers=WORKERS, persistent_workers=True)


class Progress:
    """The snapshots written so far, as ``progress.json``: rewritten after each, so a killed run keeps them."""

    def __init__(self, out: Path, steps_per_epoch: int, meta: dict, started: float):
        self.out, self.steps_per_epoch, self.started = out, steps_per_epoch, started
        self.record = {**meta, "steps_per_epoch": steps_per_epoch, "epochs": [], "marks": []}

    def save(self, encoder: nn.Module, kind: str, value: float, step: int) -> None:
        """Write the encoder at ``step`` as ``epoch-<value>.pt`` or ``mark-<value>min.pt`` and record it."""
        seconds = time.monotonic() - self.started
        name = f"epoch-{int(value)}.pt" if kind == "epochs" else f"mark-{value:g}min.pt"
        save_encoder(encoder, self.out / name)
        entry = {"epoch": step / self.steps_per_epoch, "step": step, "seconds": seconds,
                 "images_per_s": step * BATCH_SIZE / seconds, "file": name}
        self.record[kind].append({"minutes": value, **entry} if kind == "marks" else entry)
        (self.out / "progress.json").write_text(json.dumps(self.record, indent=2))
        print(f"{name}: step {step}, {seconds:.1f} s, {entry['images_per_s']:.1f} images/s", flush=True)


def train(a: argparse.Namespace) -> None:
    """The training loop; see the module's docstring."""
    from lightly.loss import NTXentLoss
    importlib.import_module("lightly.transforms")  # before the clock, as simxent's modules are

    started = time.monotonic()
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    encoder, model = cpu_preset_model(a.image_size)
    model.to(device).train()
    criterion = NTXentLoss(temperature=TEMPERATURE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = lightly_loader(a.train, a.image_size)
    progress = Progress(out, len(loader), {"precision": str(dtype), "device": str(device), "images": len(loader.dataset),
                                           "batch_size": BATCH_SIZE, "image_size": a.image_size}, started)
    marks, step, epoch = list(a.marks), 0, 0
    while not a.epochs or epoch < a.epochs:
        for (x0, x1), _ in loader:
            with autocast(device, dtype):
                z0 = model(x0.to(device))
                z1 = model(x1.to(device))
                loss = criterion(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            elapsed = time.monotonic() - started
            while marks and elapsed >= 60 * marks[0]:
                progress.save(encoder, "marks", marks.pop(0), step)
            if a.minutes and elapsed >= 60 * a.minutes:
                return
        epoch += 1
        progress.save(encoder, "epochs", epoch, step)


if __name__ == "__main__":
    train(parse_args())
