"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain values only (state dicts, the config as a dict, RNG states
as tensors), so the safe unpickler can read all of it and a crafted file cannot run code.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
log = logging.getLogger("simxent")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or one that is not simxent's."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` so that ``path`` always holds either the old file or the complete new one:
    temporary file in the same directory, flush + fsync, then an atomic ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with the safe unpickler; refuse files that carry arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values "
            f"(weights_only=True rejected it: {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a simxent checkpoint (no format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}; this simxent reads up to {FORMAT_VERSION}"
        )
    return state


def load_encoder(path: str | Path, map_location="cpu"):
    """The pretrained encoder of a simxent checkpoint as a ready ``nn.Module`` (eval mode), mapping an
    image batch normalised with the run's ``augment.mean``/``augment.std`` to pooled features."""
    from .config import config_from_dict
    from .models import backbone

    state = load_checkpoint(path, map_location)
    cfg = config_from_dict(state["config"])
    encoder, _ = backbone(cfg.model.backbone, cfg.model.cifar_stem)
    encoder.load_state_dict(state["encoder"])
    return encoder.eval()


def export_torchvision(path: str | Path, dest: str | Path) -> None:
    """Write the encoder as a plain state dict: for ResNets, loadable by the torchvision model of the
    same name with ``strict=False`` (only ``fc`` is missing), or ``strict=True`` after replacing fc."""
    state = load_checkpoint(path)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(state["encoder"], tmp)
    os.replace(tmp, dest)


def save_rotating(state: dict, folder: str | Path, step: int, keep: int) -> Path:
    """Write ``step-<step>.pt`` atomically, point ``last.pt`` at it (an atomically replaced hard link, so
    no second copy is written), and delete all but the newest ``keep`` step files."""
    folder = Path(folder)
    path = folder / f"step-{step:09d}.pt"
    save_checkpoint(state, path)
    link = folder / ".last.pt.tmp"
    link.unlink(missing_ok=True)
    os.link(path, link)
    os.replace(link, folder / "last.pt")
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def newest_valid_checkpoint(folder: str | Path) -> Path | None:
    """``last.pt`` if it loads, else the newest step file that does; None when there is none."""
    folder = Path(folder)
    candidates = [folder / "last.pt"] + sorted(folder.glob("step-*.pt"), reverse=True)
    for path in candidates:
        if path.is_file():
            try:
                load_checkpoint(path)
                return path
            except CheckpointError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
    return None
