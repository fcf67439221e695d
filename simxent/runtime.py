"""Device, precision, threads, seeds and RNG state: the machine-facing settings of a run."""
from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .config import ConfigError

log = logging.getLogger("simxent")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast context for ``dtype`` (bf16/fp16) on ``device``; a no-op for fp32 (``None``)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA on a machine without it is a ConfigError naming
    ``option``, the setting that asked (``train.device`` for pretraining, ``--device`` for linear eval)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but no CUDA device is available here (use auto or cpu)")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows
        raise ConfigError(f"{option}: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None


def configure_device(device: torch.device) -> None:
    """On CUDA, let cuDNN pick the fastest convolution algorithms: training shapes never change."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextmanager
def full_float32():
    """float32 convolutions and matrix products on a GPU in full float32 for the block. PyTorch runs cuDNN's
    float32 convolutions in TF32 by default (10 mantissa bits: a relative error near 1e-3), so an image
    embedded on a GPU would score about 0.999 against its own copy embedded on the CPU."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    # torch refuses to read a flag of one API once the other has set it: the newer API where there is one.
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        flags, full = ((cudnn.conv, "fp32_precision"), (matmul, "fp32_precision")), "ieee"
    else:
        flags, full = ((cudnn, "allow_tf32"), (matmul, "allow_tf32")), False
    before = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, full)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, before):
            setattr(owner, name, value)


def cpu_supports_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX, from ``/proc/cpuinfo``'s flags),
    where bf16 autocast pays: 2-3x float32's speed. Without them bf16 is emulated and far slower (a
    training step 13-16x slower than float32 on an AVX2 CPU, docs/benchmarks.md), so every other CPU,
    and any system without ``/proc/cpuinfo``, trains in float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``precision`` (None = plain float32).

    auto: bf16 on CUDA devices and CPUs that support it, fp16 on older GPUs, else fp32.

    fp16 on a CPU is refused (a ConfigError naming train.precision): fp16 autocast there ran a training step
    about 65x slower than float32, so one step could take many minutes, and ``train.max_time`` and SIGTERM
    are only seen between steps. bf16 on a CPU without native bf16 (13-16x slower) is allowed with a warning.
    """
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision=fp16 on a CPU: fp16 autocast runs about 65x slower than float32 there "
                          "(one step can take minutes, and a stop request waits for the step to end); use fp32, or "
                          "auto (bf16 where the CPU has it natively)")
    if precision == "bf16":
        if device.type == "cpu" and not cpu_supports_bf16():
            log.warning("train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): each step runs about "
                        "13-16x slower than float32 (docs/benchmarks.md); train.precision=auto picks float32 here")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":  # native bf16 (Ampere on): torch's default check counts emulation on V100 and T4
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


class SlowStepWatch:
    """Times training steps and warns once when one runs longer than ``limit`` seconds: ``train.max_time``,
    SIGTERM and Ctrl-C are only seen between steps, so a stop waits for the step to end."""

    limit = 60.0

    def __init__(self):
        self.started, self.warned = time.monotonic(), False

    def start(self) -> None:
        self.started = time.monotonic()

    def stop(self) -> None:
        """Call after the step's host sync, so that the time is the step's and not its launch's."""
        seconds = time.monotonic() - self.started
        if seconds > self.limit and not self.warned:
            self.warned = True
            log.warning("a training step took %.0f s: train.max_time, SIGTERM and Ctrl-C are only seen between "
                        "steps, so a stop waits that long; a smaller train.batch_size, data.image_size or "
                        "model.backbone shortens it, as does train.precision=fp32 on a CPU without native bf16",
                        seconds)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is a terminal: progress bars redraw themselves with carriage returns, which
    a log file or a pipe would keep as clutter."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def show_progress_bars(progress: bool) -> bool:
    """Bars only when asked for and stderr is a terminal; elsewhere runs log plain periodic lines."""
    return progress and stderr_is_terminal()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (pytest and notebooks replace it), through
    ``tqdm.write``: an active progress bar is cleared first and redrawn after, so a message never lands on
    the bar's line."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise from a handler
            self.handleError(record)


@contextmanager
def quiet_log():
    """simxent's log below ERROR left unsaid inside the block (a second look at what was reported before)."""
    logger = logging.getLogger("simxent")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def held_warnings(level: int = logging.WARNING):
    """The warnings (records of ``level`` and above) logged inside the block, kept (they reach stderr as
    usual) so that :func:`setup_logging` can write them into a log file that could not be opened before them:
    a run's train.log opens only once its folder is claimed, after the warnings of finding what to resume."""
    records: list[logging.LogRecord] = []
    keeper = logging.Handler(level)
    keeper.emit = records.append
    logger = logging.getLogger("simxent")
    logger.addHandler(keeper)
    try:
        yield records
    finally:
        logger.removeHandler(keeper)


def setup_logging(log_file: Optional[Path] = None, level: int = logging.INFO,
                  earlier: Sequence[logging.LogRecord] = ()) -> None:
    """Messages to stderr and, when given, to a file in the run directory, which starts with the ``earlier``
    records (from :func:`held_warnings`)."""
    logger = logging.getLogger("simxent")
    logger.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(fmt)
        logger.addHandler(h)
    if log_file is not None:
        for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(h)
            h.close()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
        for record in earlier:
            fh.handle(record)


def close_log_file(exc_type, exc, traceback) -> None:
    """Detach the run's log file, first writing into it the error that ends the run, if one does (stderr gets
    it from the caller): the process's later messages are not the run's. An ExitStack exit callback."""
    logger = logging.getLogger("simxent")
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        if exc is not None:
            h.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0,
                                       f"stopped by {exc_type.__name__}: {exc}", None, None))
        logger.removeHandler(h)
        h.close()
