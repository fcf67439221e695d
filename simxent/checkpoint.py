"""Checkpoints: written atomically, read with ``weights_only=True``; encoders rebuilt from checkpoints and
plain state dicts, and exported in forms that load without simxent.

A checkpoint is a dict of tensors and plain values only (state dicts, the config as a dict, RNG states
as tensors), so the safe unpickler can read all of it and a crafted file cannot run code.
"""
from __future__ import annotations

import collections
import filecmp
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import __version__, dist
from .config import Config, ConfigError, ModelConfig, check_backbone, config_from_saved, flatten, to_dict
from .files import is_disk_full, sync_folder, temp_path, write_bytes_atomic

FORMAT_VERSION = 1
# All that rebuilds an encoder: ViTs and MaxViT are built for one image size.
ENCODER_KEYS = ("model.backbone", "model.cifar_stem", "data.image_size")
log = logging.getLogger("simxent")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or one that is not simxent's."""


class OtherKindError(CheckpointError):
    """A plain state dict where a simxent checkpoint was asked for, or the reverse."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` so that ``path`` always holds either the old file or the complete new one
    (:func:`simxent.files.write_bytes_atomic`).

    Serialising in memory first costs one copy of the state; in exchange a full disk is a plain ENOSPC
    with the size it needed (torch writing to a file reports it as an opaque ``unexpected pos``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    data = buffer.getbuffer()
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        if is_disk_full(e):
            raise CheckpointError(f"no space left to write checkpoint {path} ({len(data) / 1e6:.1f} MB needed); "
                                  f"the previous checkpoint is intact: free space in {path.parent}") from None
        raise


def refused_object(e: pickle.UnpicklingError) -> str:
    """What torch's safe unpickler refused, without torch's advice to load the file unsafely instead."""
    lines = [line.strip() for line in str(e).splitlines()]
    said = next((line for line in lines if "GLOBAL" in line or line.startswith("WeightsUnpickler error:")), None)
    if said is None:
        return "the safe unpickler refused it"
    return said.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()


def last_in_folder(folder: Path) -> Path | None:
    """The run's last checkpoint in ``folder``, given as a run folder or as its ``checkpoints``; None if none."""
    return next((p for p in (folder / "checkpoints" / "last.pt", folder / "last.pt") if p.is_file()), None)


def read_weights_file(path: str | Path, map_location="cpu"):
    """Whatever ``path`` holds, read with the safe unpickler: tensors and plain values only."""
    path = Path(path)
    if path.is_dir():
        last = last_in_folder(path)
        hint = f": a run folder's last checkpoint is {last}" if last else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    if not head.startswith((b"PK", b"\x80")):  # torch.save's zip archive, or its legacy pickle (truncated or not)
        raise CheckpointError(f"{path} is not a file torch.save wrote (a checkpoint or a state dict)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain values "
                              f"({refused_object(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged zip raises what it meets (UnicodeDecodeError, ValueError, ...)
        if is_exported_program(path):
            raise CheckpointError(f"{path} is a torch.export program (simxent exports convnets so), not a state "
                                  f"dict: load it with torch.export.load; to score or embed, give the simxent "
                                  f"checkpoint it was exported from") from None
        # torch's own words run to a paragraph of advice: its first sentence says what failed.
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first} (the file is damaged or incomplete)") from None


def is_exported_program(path: str | Path) -> bool:
    """Whether ``path`` is a torch.export archive: a zip whose entries include ``archive_format`` and no
    ``data.pkl`` (which torch.save's archives hold)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n.rsplit("/", 1)[-1] for n in z.namelist()]
    except Exception:  # noqa: BLE001 - a damaged zip fails in many ways; none is an export to name
        return False
    return "archive_format" in names and "data.pkl" not in names


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a simxent checkpoint with the safe unpickler; refuse files that carry arbitrary objects."""
    state = read_weights_file(path, map_location)
    if not isinstance(state, dict) or "format_version" not in state:
        raise OtherKindError(f"{path} is not a simxent checkpoint (no format_version), so no run resumes from "
                             f"it; to score or embed a plain state dict, name its architecture with --backbone NAME "
                             f"(simxent-linear-eval, simxent-embed)")
    version = state["format_version"]
    if type(version) is not int or version < 1:  # bool is an int subclass: refused too
        raise CheckpointError(f"{path}: format_version is {version!r}, not a positive integer; the file is damaged "
                              f"or was not written by simxent")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this simxent reads up to {FORMAT_VERSION}: "
                              f"a newer simxent wrote it, upgrade simxent to read it")
    return state


def saved_config(state: dict, path: str | Path, keys=ENCODER_KEYS) -> Config:
    """The ``keys`` of a checkpoint's saved config (see :func:`config_from_saved`): by default only what
    rebuilds the encoder. Nothing else in a checkpoint is trusted."""
    tree = state.get("config")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} has no saved config, so the architecture of its encoder is unknown")
    return config_from_saved(tree, keys, f"{path}, saved config")


def fit_weights(module: nn.Module, weights, source: str | Path, arch: str) -> nn.Module:
    """``module.load_state_dict(weights)``, strict, with one line naming a few missing, unexpected and
    mis-shaped keys instead of PyTorch's list of all of them. The parts of a full torchvision model that an
    encoder leaves out (its classifier, auxiliary classifiers) are dropped first: encoders end at the pooled
    features."""
    from .models import left_out  # here: simxent.models imports this module

    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CheckpointError(f"{source}: expected a state dict (parameter names to tensors), got {type(weights).__name__}")
    kept = collections.OrderedDict((k, v) for k, v in weights.items() if not left_out(module, k))
    kept._metadata = getattr(weights, "_metadata", {})  # layer versions, which some models (MNASNet) read
    weights = kept
    own = module.state_dict()
    problems = {
        "missing": [k for k in own if k not in weights],
        "unexpected": [k for k in weights if k not in own],
        "wrong shape": [f"{k} {list(weights[k].shape)} (model: {list(own[k].shape)})"
                        for k in own if k in weights and weights[k].shape != own[k].shape],
    }
    found = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for what, v in problems.items() if v]
    if found:
        raise CheckpointError(f"{source}: weights do not fit {arch}: {'; '.join(found)}")
    module.load_state_dict(weights)
    return module


def fitted_backbone(name: str, cifar_stem: bool, weights, source: str | Path, image_size: int = 32) -> nn.Module:
    """Encoder ``name`` (see :func:`simxent.models.backbone`) for ``image_size`` px images, holding ``weights``;
    eval mode."""
    from .models import backbone  # here: simxent.models imports this module

    encoder, _ = backbone(name, cifar_stem, image_size)
    arch = name + (" with the CIFAR stem" if cifar_stem else "")
    return fit_weights(encoder, weights, source, arch).eval()


def checkpoint_encoder(state: dict, cfg: Config, path: str | Path) -> nn.Module:
    """The encoder of a loaded checkpoint, built from ``cfg`` (its saved config) and checked against the
    shapes of its weights; eval mode."""
    if "encoder" not in state:
        raise CheckpointError(f"{path} holds no encoder weights")
    return fitted_backbone(cfg.model.backbone, cfg.model.cifar_stem, state["encoder"], path, cfg.data.image_size)


def encoder_digest(encoder: nn.Module) -> str:
    """SHA-256 of the encoder's state dict (names, dtypes, shapes and values, in its order): the same for the
    same weights wherever they are stored, different once a run has trained on into the same file."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_encoder(path: str | Path, map_location="cpu") -> nn.Module:
    """The pretrained encoder of a simxent checkpoint as a ready ``nn.Module`` (eval mode), mapping an
    image batch normalised with the run's ``augment.mean``/``augment.std`` to pooled features.

    Only ``model.backbone``, ``model.cifar_stem`` and ``data.image_size`` are read from the saved config, so
    checkpoints of older and newer simxent versions load as long as those keep their meaning."""
    state = load_checkpoint(path, map_location)
    return checkpoint_encoder(state, saved_config(state, path), path)


def load_backbone(path: str | Path, name: str, cifar_stem: bool = False, map_location="cpu",
                  image_size: int = 32) -> nn.Module:
    """An encoder ``name`` (any ``model.backbone``) with the weights of a plain state dict: a torchvision
    model's ``state_dict()`` (its classifier, if present, is ignored), a file from :func:`export_torchvision`,
    or a backbone trained by another tool with torchvision's parameter names. Eval mode."""
    weights = read_weights_file(path, map_location)
    if isinstance(weights, dict) and "format_version" in weights:
        raise OtherKindError(f"{path} is a simxent checkpoint: leave out --backbone, its config names the architecture")
    try:
        check_backbone(ModelConfig(backbone=name, cifar_stem=cifar_stem))
    except ConfigError as e:
        raise ConfigError(f"--backbone: {e}") from None
    return fitted_backbone(name, cifar_stem, weights, path, image_size)


def export_torchvision(path: str | Path, dest: str | Path) -> str:
    """Write the encoder of checkpoint ``path`` to ``dest`` in a form that loads without simxent, and return
    that form's name.

    torchvision backbones: ``"state_dict"``, a plain state dict for the torchvision model of the same name,
    without the classifier's last layer (ResNets: set ``model.fc = nn.Identity()`` to load it with
    ``strict=True``; with the CIFAR stem, first replace ``conv1`` by a 3x3 stride-1 convolution and
    ``maxpool`` by ``nn.Identity()``); a ``package.module:function`` backbone's state dict likewise. The convnets
    match no torchvision model, so one is written as ``"exported_program"``: a ``torch.export`` graph with
    its weights, any batch and image size, loaded by ``torch.export.load(dest).module()``.
    """
    from .models import CONVNETS  # here: simxent.models imports this module

    state = load_checkpoint(path)
    cfg = saved_config(state, path)
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise CheckpointError(f"cannot export to {dest}: the folder {dest.parent} does not exist")
    program = cfg.model.backbone in CONVNETS
    if program and dest.suffix != ".pt2":  # torch.export.load reads only .pt2 names, torch.load not at all
        raise CheckpointError(f"cannot export {cfg.model.backbone} to {dest}: it is written as a torch.export program, "
                              f"which needs a name ending in .pt2 (e.g. {dest.with_suffix('.pt2').name})")
    if not program and dest.suffix == ".pt2":  # a state dict under a program's name: torch.export.load fails on it
        raise CheckpointError(f"cannot export {cfg.model.backbone} to {dest}: it is written as a state dict "
                              f"(torch.save), which a .pt2 name would pass off as a torch.export program; name it "
                              f"{dest.with_suffix('.pth').name}")
    encoder = checkpoint_encoder(state, cfg, path)
    if program:
        # torch.export rather than TorchScript, which torch 2.14 deprecates (jit.script, jit.save, jit.load)
        dynamic = torch.export.Dim.DYNAMIC
        exported = torch.export.export(encoder, (torch.zeros(2, 3, 32, 32),),
                                       dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},))
    tmp = temp_path(dest, dest.suffix)  # ending in dest's suffix: torch.export.save checks for .pt2
    try:
        if program:
            torch.export.save(exported, tmp)
        else:
            torch.save(encoder.state_dict(), tmp)
        os.replace(tmp, dest)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk or a refused file as RuntimeError
        raise CheckpointError(f"cannot export to {dest}: {e}") from None
    finally:  # whatever stopped the write (Ctrl-C too) leaves no temporary file in the user's folder
        tmp.unlink(missing_ok=True)
    return "exported_program" if program else "state_dict"


def step_file_name(step: int, run_id: str) -> str:
    """``step-<step>-<run id>.pt``: zero-padded, so names sort by step within a run."""
    return f"step-{step:09d}-{run_id}.pt" if run_id else f"step-{step:09d}.pt"


def file_step(path: Path) -> int:
    """The global step in a :func:`step_file_name`."""
    return int(path.name.split("-")[1].removesuffix(".pt"))


def step_files(folder: str | Path, run_id: str | None = None) -> list[Path]:
    """The step checkpoints in ``folder``, oldest first: of run ``run_id`` only, or all when None."""
    pattern = f"step-*-{run_id}.pt" if run_id else "step-*.pt"
    return sorted(Path(folder).glob(pattern))


def host_copy(obj):
    """``obj`` (nested dicts, lists and tuples) with every tensor copied to the CPU: a snapshot that the
    steps after it cannot change, since they update weights and optimiser state in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copy = obj.copy()  # its type: a state dict is an OrderedDict whose _metadata holds the layers' versions
        copy.update((k, host_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata
        return copy
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a thread, one at a time, so that training goes on while the bytes are serialised
    and reach the disk: on a GPU whose epoch takes 2 s, serialising and fsyncing a 100 MB checkpoint at each
    epoch's end cost 0.27 s (docs/benchmarks.md, "Pipeline efficiency").

    :meth:`write` waits for the write before it, so files land in the order asked for; a write's error is
    raised by the next :meth:`write`, once that one's checkpoint is written (the steps trained since are not
    lost to an error that has passed), or by :meth:`wait`. The thread is not a daemon: an interpreter that
    exits on an error still finishes the checkpoint in flight, which is atomic anyway (a kill leaves the old
    file)."""

    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def write(self, state: dict, folder: Path, step: int, keep: int, run_id: str) -> None:
        """:func:`save_rotating` of a host copy of ``state``, taken now, on the writer's thread; after a
        failed write, here and now, then that write's error is raised."""
        self.join()
        failed, self.error = self.error, None
        if failed is not None:
            save_rotating(host_copy(state), folder, step, keep, run_id)
            raise failed
        args = (host_copy(state), folder, step, keep, run_id)
        self.thread = threading.Thread(target=self._run, args=args, name="simxent-checkpoint")
        self.thread.start()

    def _run(self, *args) -> None:
        try:
            save_rotating(*args)
        except BaseException as e:  # raised in the training thread, by the next write or wait
            log.error("writing checkpoint step %d into %s failed: %s; the run stops at its next checkpoint, once "
                      "that is written", args[2], args[1], e)
            self.error = e

    def exit(self, exc_type, exc, tb) -> bool:
        """The run's way out (an ExitStack's callback): the write in flight lands before ``out`` is unlocked,
        Ctrl-C held off meanwhile; its error is raised unless another one is already ending the run (that
        one is the cause; the write's was logged as it failed)."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.wait()
        except BaseException:
            if exc_type is None:
                raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return False

    def join(self) -> None:
        """Wait for the write in flight; its error, if it failed, stays for the next :meth:`write` or
        :meth:`wait`."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        self.join()
        error, self.error = self.error, None
        if error is not None:
            raise error


def save_rotating(state: dict, folder: str | Path, step: int, keep: int, run_id: str = "") -> Path:
    """Write ``step-<step>-<run_id>.pt`` atomically, point ``last.pt`` at it (an atomically replaced hard
    link, so no second copy is written), and delete all but the newest ``keep`` step files of this run:
    another run's files are never touched."""
    folder = Path(folder)
    path = folder / step_file_name(step, run_id)
    save_checkpoint({**state, "run_id": run_id}, path)
    point_last_at(path)
    for old in step_files(folder, run_id)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def point_last_at(path: Path) -> None:
    """Make ``last.pt`` beside ``path`` that file, atomically: a hard link, or where the filesystem has none
    (exFAT, shared folders of virtual machines, some FUSE mounts) a synced byte-for-byte copy, which
    :func:`same_checkpoint` still recognises."""
    link = temp_path(path.parent / "last.pt")
    try:
        os.link(path, link)
    except OSError:
        try:
            with open(path, "rb") as src, open(link, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            link.unlink(missing_ok=True)
            raise
    os.replace(link, path.parent / "last.pt")
    sync_folder(path.parent)


def same_checkpoint(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one checkpoint: one file (a hard link), or ``last.pt``'s copy of a step
    file (:func:`point_last_at`), byte for byte."""
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def set_aside_later_steps(folder: str | Path, run_id: str, step: int) -> Path | None:
    """Move run ``run_id``'s step files after global step ``step`` (and ``last.pt`` when it is one of them)
    into a new ``folder/superseded-after-step-<step>-*/``; returns it, or None when there are none.

    A run resumed from an older checkpoint of its own folder starts a new branch. Left in place, the
    abandoned steps would outrank the new ones: rotation keeps the highest step numbers (deleting the new
    branch's files) and resuming falls back to the newest step file. Moved, they stay on disk, out of both."""
    folder = Path(folder)
    later = [p for p in step_files(folder, run_id) if file_step(p) > step]
    if not later:
        return None
    aside = Path(tempfile.mkdtemp(prefix=f"superseded-after-step-{step}-", dir=folder))
    os.chmod(aside, folder.stat().st_mode & 0o777)  # readable by whoever reads the checkpoints (mkdtemp: 0700)
    # Newest first: a kill halfway leaves the oldest of the abandoned steps, nearest the branch point, in place.
    last = folder / "last.pt"
    if last.is_file() and any(same_checkpoint(last, p) for p in later):
        os.replace(last, aside / last.name)
    for p in reversed(later):
        os.replace(p, aside / p.name)
    return aside


def start_branch(folder: str | Path, run_id: str, step: int, resumed: Path) -> Path | None:
    """Make the run resumed from checkpoint ``resumed`` (at global ``step``) the one in ``folder``: the step
    files of run ``run_id`` after ``step`` go aside (:func:`set_aside_later_steps`); returns where, or None.

    A checkpoint inside ``folder/superseded-after-step-<k>-*/`` resumes that set-aside branch: it shares
    the top level's steps up to k only, so the top level's steps after k go aside instead, and the branch's
    own steps up to ``step`` come back, so that the top level holds one line of steps again. What stays in
    the branch's folder now comes after ``step``: the folder is renamed to say so (or removed when empty)."""
    folder, source = Path(folder), Path(resumed).resolve().parent
    fork = re.fullmatch(r"superseded-after-step-(\d+)-(\w+)", source.name)
    if source.parent != folder.resolve() or not fork:
        return set_aside_later_steps(folder, run_id, step)
    aside = set_aside_later_steps(folder, run_id, int(fork[1]))
    for p in step_files(source, run_id):
        if file_step(p) <= step:
            os.replace(p, folder / p.name)
    last = source / "last.pt"
    if last.is_file() and not any(same_checkpoint(last, p) for p in step_files(source, run_id)):
        last.unlink()  # a link to a step file that came back: it would keep that file's blocks twice named
    if any(source.iterdir()):
        os.replace(source, folder / f"superseded-after-step-{step}-{fork[2]}")
    else:
        source.rmdir()
    return aside


def newest_valid_checkpoint(folder: str | Path, run_id: str | None = None,
                            torchrun_job: str | None = None) -> Path | None:
    """The newest checkpoint that loads: ``last.pt``, unless a step file of a later step loads (a stop
    between a step file's write and ``last.pt``'s move to it leaves ``last.pt`` a step behind); else the
    newest step file that loads; None when there is none. With ``run_id``, only checkpoints of that run
    count; with ``torchrun_job``, only those that job saved."""
    folder = Path(folder)
    files = step_files(folder, run_id)[::-1]
    last = _loads(folder / "last.pt", run_id, torchrun_job)
    if last is not None:
        files = [p for p in files if file_step(p) > last["position"]["global_step"]]
    return next((path for path in files if _loads(path, run_id, torchrun_job) is not None),
                folder / "last.pt" if last is not None else None)


def _loads(path: Path, run_id: str | None, torchrun_job: str | None = None) -> dict | None:
    """The checkpoint at ``path`` when it is a file that loads (of run ``run_id`` and saved by
    ``torchrun_job``, when given), else None; an unreadable one is named in a warning."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        log.warning("skipping unreadable checkpoint: %s", e)
        return None
    if torchrun_job is not None and state.get("torchrun_job") != torchrun_job:
        return None
    return state if run_id is None or state.get("run_id") == run_id else None


# --- A training run's state: what train.py checkpoints and resumes from ---------------------------------

@dataclass
class Position:
    """Where the run stands: ``epoch`` and ``step`` inside it (the next step to run), ``global_step``."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


def rng_state(device: torch.device) -> dict:
    """Every RNG the training loop on ``device`` draws from, as tensors (safe for ``weights_only`` loading):
    the CPU's and, on a GPU, that GPU's alone (a process of a torchrun job draws on its own GPU)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`'s RNGs, the GPU's onto ``device``, whichever GPU it drew on before. torch
    takes the states as CPU byte tensors only: a checkpoint loaded onto a GPU (``map_location``) holds them
    there. Older checkpoints hold every visible GPU's state: this process's own, by ``device``'s index."""
    torch.set_rng_state(state["torch"].cpu())
    saved = state.get("cuda") if device.type == "cuda" else None
    if isinstance(saved, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = saved[index] if index < len(saved) else None
    if saved is not None:
        torch.cuda.set_rng_state(saved.cpu(), device)


def training_state(cfg: Config, net: nn.Module, optimizer, scaler, pos: Position, rng: Optional[dict],
                   progress: tuple[float, float, int], ahead_progress: Optional[float] = None,
                   history: Optional[dict] = None) -> dict:
    """A run's checkpoint: config, weights (encoder, head and temperature apart, so that an encoder loads
    alone), optimiser, grad scaler, position, the schedule's progress p in [0, 1], the time budgets' share of
    it q and the steps S it spans (``progress``: (p, q, S), see :class:`simxent.schedule.TimeBudget`) and every
    process's RNG state (``rng``:
    this one's as it was before the batch drawn ahead, else its current state), with the progress that
    sized that batch's views (``ahead_progress``; None when none was drawn), and the figures the run's
    summary reports over all its sessions (``history``: kNN top-1 per evaluation, skipped steps, last loss,
    seconds). Every process calls it: the RNG states are gathered."""
    return {
        "simxent_version": __version__,
        "config": to_dict(cfg),
        "world_size": dist.world_size(),
        "torchrun_job": dist.torchrun_job(),  # a restart of the job resumes the job's own checkpoints
        "encoder": net.encoder.state_dict(),
        "head": net.head.state_dict(),
        "temperature": net.temperature.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "position": asdict(pos),
        "rng": dist.gather_objects(rng or rng_state(next(net.parameters()).device)),
        "progress": progress[0],
        "time_share": progress[1],
        "schedule_steps": progress[2],
        "ahead_progress": ahead_progress,
        "history": history or {},
    }


# What a checkpoint's weights depend on: resuming with another value cannot continue that run.
SHAPE_KEYS = ("model.backbone", "model.cifar_stem", "model.head_hidden", "model.head_out", "model.head_layers",
              "data.image_size")


def check_resumable(state: dict, cfg: Config, path: Path) -> None:
    """One line naming what a resumed run cannot read (:func:`check_training_state`), or the first setting of
    SHAPE_KEYS, or ``optim.name``, in which the checkpoint and this run differ: another optimiser would read
    the saved one's buffers as its own (Adam's moments as SGD's momentum) or fail on them."""
    check_training_state(state, path)
    saved, ours = state.get("config", {}), to_dict(cfg)
    for key in (*SHAPE_KEYS, "optim.name"):
        section, name = key.split(".")
        theirs, mine = saved.get(section, {}).get(name, ours[section][name]), ours[section][name]
        if theirs != mine:
            advice = (f"; to go on from its encoder with {mine}, start a new run with model.weights={path}"
                      if key == "optim.name" else "")
            raise ConfigError(f"train.resume: checkpoint {path} was trained with {key}={json.dumps(theirs)}, "
                              f"this run has {json.dumps(mine)}{advice}")


def check_training_state(state: dict, path: Path) -> None:
    """The entries a resumed run reads besides the weights, there and of their kind: a damaged or hand-made
    file is one line naming it and the entry, not a KeyError from deep inside the resume."""
    position, optimizer = state.get("position"), state.get("optimizer")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    checks = (
        ("position (integers epoch, step and global_step)", isinstance(position, dict)
         and set(position) == {"epoch", "step", "global_step"}
         and all(type(v) is int and v >= 0 for v in position.values())),
        ("rng (a random state per process)", isinstance(state.get("rng"), list) and len(state["rng"]) > 0),
        ("optimizer (an optimiser's state dict)", isinstance(optimizer, dict)
         and {"state", "param_groups"} <= optimizer.keys()),
        ("head (the projection head's state dict)", isinstance(state.get("head"), dict)),
        ("config (the run's settings)", isinstance(state.get("config", {}), dict)),
        ("progress (a number)", number(state.get("progress", 0)) and number(state.get("time_share", 0))),
    )
    for entry, ok in checks:
        if not ok:
            raise CheckpointError(f"train.resume: {path} has no valid {entry}; the file is damaged or was not "
                                  f"written by simxent's training")



def load_parts(state: dict, path: Path, parts: dict) -> None:
    """``part.load_state_dict(state[name])`` for each part; a mismatch is one line naming the checkpoint
    and train.resume, not a page of tensor shapes."""
    for name, part in parts.items():
        try:
            part.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
            detail = next((line for line in lines if "mismatch" in line or "key" in line.lower()), lines[0])
            raise ConfigError(f"train.resume: checkpoint {path} does not fit this run's {name}: {detail}") from None


def fit_temperature_group(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """``saved`` (an optimiser state dict) made to fit ``optimizer`` when the two differ only in the
    learnt temperature's group (the last, marked ``temperature``): a checkpoint of a fixed temperature
    resumed with a learnt one gains that group, fresh; the other way round it loses it. Else unchanged."""
    groups, ours = saved["param_groups"], optimizer.param_groups
    if len(groups) + 1 == len(ours) and ours[-1].get("temperature"):
        next_id = sum(len(g["params"]) for g in groups)
        fresh = {k: v for k, v in ours[-1].items() if k != "params"}
        ids = list(range(next_id, next_id + len(ours[-1]["params"])))
        return {**saved, "param_groups": [*groups, {**fresh, "params": ids}]}
    if len(groups) == len(ours) + 1 and groups[-1].get("temperature"):
        dropped = set(groups[-1]["params"])
        return {"state": {k: v for k, v in saved["state"].items() if k not in dropped}, "param_groups": groups[:-1]}
    return saved


def fit_older_grouping(saved: dict, optimizer: torch.optim.Optimizer, net: nn.Module) -> dict:
    """``saved`` from a run whose decay and plain groups split ``net``'s parameters by the older rule (every
    tensor of at most one dimension plain; ConvNeXt's (C, 1, 1) layer scales and ViT's tokens decayed, see
    :func:`simxent.schedule.param_groups`): each group's saved ids listed again in this optimiser's order,
    so that every parameter keeps its own state. Else unchanged."""
    groups, ours = saved["param_groups"], optimizer.param_groups
    sizes = [len(g["params"]) for g in groups]
    if len(groups) != len(ours) or len(groups) < 2 or sizes == [len(g["params"]) for g in ours]:
        return saved
    temperature = {id(p) for g in ours if g.get("temperature") for p in g["params"]}
    params = [p for p in net.parameters() if p.requires_grad and id(p) not in temperature]
    older = [p for p in params if p.ndim > 1] + [p for p in params if p.ndim <= 1]
    saved_ids = groups[0]["params"] + groups[1]["params"]
    if len(older) != len(saved_ids):
        return saved  # another model: load_state_dict names the mismatch
    id_of = {id(p): i for p, i in zip(older, saved_ids)}
    if any(id(p) not in id_of for g in ours[:2] for p in g["params"]):
        return saved
    log.info("optimizer state regrouped: per-channel scales and transformer tokens no longer take weight decay")
    regrouped = [{**g, "params": [id_of[id(p)] for p in mine["params"]]} for g, mine in zip(groups, ours[:2])]
    return {**saved, "param_groups": regrouped + groups[2:]}


def fit_optimizer(saved: dict, optimizer: torch.optim.Optimizer, net: Optional[nn.Module] = None) -> dict:
    """``saved`` fitted to ``optimizer``: its temperature group (:func:`fit_temperature_group`), and every
    group's settings (weight decay, momentum, betas, LARS's trust coefficient, the kernels ``fused`` and
    ``foreach``) taken from ``optimizer``, built from this run's config: the checkpoint brings the state
    (moments, step counts). torch keeps a saved group's settings on load, so a run resumed with
    ``optim.weight_decay`` changed would go on with the old value while its config.yaml recorded the new one;
    and a checkpoint written before the optimisers were fused would resume unfused (under fp16's grad
    scaler, which hands a fused-capable optimiser its scale, failing its first step)."""
    saved = fit_temperature_group(saved, optimizer)
    if net is not None:
        saved = fit_older_grouping(saved, optimizer, net)
    groups, ours = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(ours):
        return saved  # load_state_dict names the mismatch
    settings = [{k: v for k, v in group.items() if k != "params"} for group in ours]
    return {**saved, "param_groups": [{**group, **mine} for group, mine in zip(groups, settings)]}


def saved_progress(state: dict, total: int, step: int, batch_size: int) -> tuple[float, float]:
    """(p0, q0): the progress a resumed run starts from and the time budgets' saved share q0. Over the same
    plan as the checkpoint's (``total`` S steps of ``batch_size``), p0 is the progress p it saved; over
    another (train.epochs, the batch size or the folder changed), p0 = max(s / S, q0) at ``step`` s, the
    resumed position's batches in this run's units (:func:`resumed_position`), since p = 1 after the old
    epochs would end the run at once. A checkpoint without q0 gives the progress it saved as both; one
    written before progress was saved counts its steps' share of the step plan it holds under "schedule" (a
    time budget's: its cosine ended at step ``decay_end``), else of ``total``."""
    plan = state.get("schedule")
    if "time_share" in state:
        share = float(state["time_share"])
        if state.get("schedule_steps") == total and saved_batch_size(state, batch_size) == batch_size:
            return float(state["progress"]), share
        return max(step / total, share), share
    if "progress" in state:
        progress = float(state["progress"])
    else:  # in the steps of its own plan
        done = state["position"]["global_step"]
        progress = min(1.0, done / max(1, plan["decay_end"])) if plan else done / total
    return progress, progress


def learnt_temperature(state: dict) -> bool:
    """Whether the run that wrote training checkpoint ``state`` learnt its temperature."""
    return bool(state.get("config", {}).get("loss", {}).get("learn_temperature", False))


def changed_settings(state: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """``(key, the checkpoint's value, this run's)`` for every setting a resumed run changes. A key the
    checkpoint's config lacks is newer than its run, which did what the key's default does (a checkpoint
    without a config says nothing of its settings: no changes)."""
    if "config" not in state:
        return []
    saved, ours = flatten(state["config"]), flatten(to_dict(cfg))
    was = {**flatten(to_dict(Config())), **saved}
    return [(key, was[key], value) for key, value in ours.items() if was[key] != value and key != "train.resume"]


def resumed_position(state: dict, batch_size: int) -> Position:
    """The checkpoint's position in batches of ``batch_size``: the same epoch, and inside it the step whose
    batch holds the first image the saved run had not reached (with another ``train.batch_size`` the saved
    step counts other batches: it would skip or repeat images, and set the schedule elsewhere). At most
    ``batch_size - 1`` images are seen again. ``global_step`` goes on counting applied steps."""
    pos = Position(**state["position"])
    return replace(pos, step=pos.step * saved_batch_size(state, batch_size) // batch_size)


def saved_batch_size(state: dict, default: int) -> int:
    """The checkpoint's ``train.batch_size``, or ``default`` for a state without a config."""
    return state.get("config", {}).get("train", {}).get("batch_size", default)


def restore_training(path: Path, state: dict, net: nn.Module, optimizer, scaler, seed: int,
                     batch_size: int) -> Position:
    """Load a checkpoint's weights, optimiser, scaler and this process's RNG state; returns where it stood
    (:func:`resumed_position`). A checkpoint written by another number of processes restarts the
    augmentation streams (said so)."""
    state = {**state, "optimizer": fit_optimizer(state["optimizer"], optimizer, net)}
    parts = {"encoder": net.encoder, "head": net.head, "optimizer": optimizer}
    if state.get("scaler"):  # empty from a run without fp16's scaler: an fp16 resume starts its scaler fresh
        parts["scaler"] = scaler
    # A learnt temperature is state; a fixed one is a setting (loss.temperature), and a learnt one resumed
    # from a fixed run starts at loss.temperature as any learnt one does.
    if learnt_temperature(state) and net.temperature.log_t.requires_grad:
        parts["temperature"] = net.temperature
    load_parts(state, path, parts)
    pos = resumed_position(state, batch_size)
    rank, world = dist.rank(), dist.world_size()
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank], next(net.parameters()).device)
    else:
        log.warning("checkpoint was written by %d process(es), resuming with %d: augmentation streams restart",
                    len(state["rng"]), world)
        torch.manual_seed(seed + rank + 7919 * pos.global_step)
    log.info("resumed from %s after %s (global step %d)", path, trained_so_far(pos, batch_size), pos.global_step)
    return pos


def trained_so_far(pos: Position, batch_size: int) -> str:
    """E.g. "2 whole epochs and 3 steps of 256 images of the next": ``pos.epoch`` counts whole epochs done,
    as every other line's "epoch E/N step S" counts from 1."""
    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"
    epochs = count(pos.epoch, "whole epoch")
    steps = f"{count(pos.step, 'step')} of {batch_size} images"
    if not pos.step:
        return epochs
    return f"{epochs} and {steps} of the next" if pos.epoch else f"{steps} of the first epoch"
