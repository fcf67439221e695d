"""Data parallelism with torchrun: process-group set-up, rank helpers, a gradient-carrying gather and
BatchNorm over the global batch.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins a process group: NCCL on CUDA,
gloo on CPU. Everything here is the identity in a single process, so the training loop has one code path.
"""
from __future__ import annotations

import datetime
import itertools
import os
import signal
import threading
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.distributed.rendezvous import rendezvous
from torch import nn

# torch marks its autograd-aware collectives deprecated in favour of a private module; these public ones
# remain correct, and their warning would repeat on every step.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated", category=FutureWarning)

# A collective that waits longer than this fails: a process that died or hung is found within it.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
# What rank 0 does alone while the others wait (decoding a large folder into the cache) may take hours.
MAIN_FIRST_TIMEOUT = datetime.timedelta(days=2)
_store = None  # the process group's key-value store, for waits longer than a collective may take
_store_calls = itertools.count()  # numbers each wait's keys alike in every process


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the torchrun process group when launched by it; returns this process's device."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    global _store
    store, rank_, world = next(rendezvous("env://", timeout=PROCESS_GROUP_TIMEOUT))
    # torchrun's store outlives a restart; the dead workers' addresses must not be read again.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _store = dist.PrefixStore(f"simxent/attempt{attempt}", store)
    with signals_end_the_process():
        dist.init_process_group(backend, store=_store, rank=rank_, world_size=world, timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device


@contextmanager
def signals_end_the_process():
    """SIGTERM and SIGINT with their default action (the process ends) within the block: joining the group
    waits inside a C call, where a Python handler never runs, so a process whose peer died before it joined
    heard torchrun's SIGTERM only as the SIGKILL that follows 30 s later. Nothing is trained yet."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_all() -> None:
    """A barrier on the store (``MAIN_FIRST_TIMEOUT``), for waits that may outlast a collective's
    ``PROCESS_GROUP_TIMEOUT``: a process decoding a large folder keeps the others here, not in the next
    collective. Every process must call it (and :func:`in_turns`) in the same order."""
    if not dist.is_initialized() or _store is None:
        return
    key = f"all/{next(_store_calls)}"
    if _store.add(key, 1) == world_size():
        _store.set(f"{key}/done", "done")
    _store.wait([f"{key}/done"], MAIN_FIRST_TIMEOUT)


@contextmanager
def in_turns(turn: int, turns: int):
    """Run the block in the processes of turn 0 first, then in those of turn 1 once every process of turn 0
    has finished it, and so on; all leave together, after the last turn. Each turn ends in
    :func:`wait_for_all`, on the store, not in a collective, whose ``PROCESS_GROUP_TIMEOUT`` the block may
    outlast (a first decode of ImageNet takes longer). Should a process fail in the block, torchrun stops
    the others."""
    if not dist.is_initialized() or _store is None:
        yield
        return
    for _ in range(turn):
        wait_for_all()
    yield
    for _ in range(turn, turns):
        wait_for_all()


def main_process_first():
    """:func:`in_turns`: rank 0 first (rank 0 alone scores kNN), then every other process."""
    return in_turns(0 if is_main() else 1, 2)


def node_first():
    """:func:`in_turns` for the image cache: rank 0 fills it first; then the first process of every other
    node, which reads it (a shared disk) or fills its node's own; then all the others, which read their
    node's. A node never decodes a folder once per process, with the disk space of as many copies."""
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    return in_turns(0 if is_main() else 1 if local_main else 2, 3)


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def torchrun_job() -> str | None:
    """The torchrun job this process belongs to (``--rdzv-id``; a random id per ``--standalone`` launch),
    which its restarts share; None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def job_id_is_torchruns_default() -> bool:
    """Whether torchrun may restart this job (``--max-restarts``) under its default job id ``none`` (no
    ``--standalone`` or ``--rdzv-id``, as with ``--master-port``), which every such job shares: a restart
    cannot tell this job's checkpoints from those of an earlier job launched the same way."""
    return torchrun_job() == "none" and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0


class MainProcessStopped(RuntimeError):
    """The main process stopped (a refused ``out``, say) while the others waited for what it shares."""


def from_main(value):
    """The main process's ``value``, in every process (one collective; ``value`` picklable). Should the
    main process stop before it shares (its own error names why), the others stop with one line, not the
    process group's traceback."""
    try:
        return gather_objects(value)[0]
    except RuntimeError as e:
        if is_main():
            raise
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MainProcessStopped(f"process {rank()}: the main process stopped before the run began (its error "
                                 f"says why), or this one failed waiting for it: {cause}") from e


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated in rank order, with gradients flowing back to each owner.

    The backward pass sums, over all processes, the gradients of their losses with respect to this
    process's rows (torch's all_gather backward is a reduce-scatter), so that after DDP's averaging each
    encoder sees d(mean over processes of the local losses) - the gradient of one process holding the
    whole batch.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()))


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated in rank order, without gradients (for logging)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor across processes, for logging."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def agree(values: list, device: torch.device) -> list[float]:
    """The mean over processes of each of ``values`` (0-d tensors, booleans or numbers) in one collective
    and one host sync: the training step's loss, finite flag, stop requests and share of the time
    budget used.

    A flag's mean is above 0 when any process raised it and 1 when all did."""
    # Numbers are filled on the device, not copied there: a blocking copy to a GPU would wait for the stream.
    stacked = torch.cat([v.detach().float().reshape(1).to(device) if torch.is_tensor(v)
                         else torch.full((1,), float(v), device=device) for v in values])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= world_size()
    return stacked.tolist()


def gather_objects(local) -> list:
    """Every process's ``local`` (picklable), in rank order; ``[local]`` in a single process."""
    if world_size() == 1:
        return [local]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return gathered


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose statistics span the global batch on any device (torch's SyncBatchNorm is
    GPU-only). Mean and variance are all-reduced with gradients, in two passes for accuracy:

        mean = sum_r sum_i x_ri / n,    var = sum_r sum_i (x_ri - mean)^2 / n,    n = global count
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device, dtype=xf.dtype)
        n = dist_nn.all_reduce(count)
        mean = dist_nn.all_reduce(xf.sum(dims)) / n
        centred = xf - mean.view(shape)
        var = dist_nn.all_reduce(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            self._track(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        y = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """Running statistics as torch's BatchNorm keeps them: an exponential average with ``momentum``, or
        with ``momentum=None`` the cumulative average, 1 / (batches seen) each."""
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased_var, alpha=m)


class LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over this process's batch alone, for any input of at least 2 dimensions."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")


@contextmanager
def local_batchnorm(module: nn.Module):
    """Every BatchNorm over the global batch in ``module`` (:class:`GlobalBatchNorm`, ``nn.SyncBatchNorm``)
    normalises over its own process's batch within the block: for a pass that every process runs on the
    same images, where the statistics agree without collectives, and a process that fails alone leaves no
    other waiting in one. The class is swapped, not the layer: parameters and buffers stay where they are."""
    swapped = [(m, type(m)) for m in module.modules() if isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm))]
    for m, _ in swapped:
        m.__class__ = LocalBatchNorm
    try:
        yield module
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm with one over the global batch: torch's SyncBatchNorm on CUDA, else
    :class:`GlobalBatchNorm`. Weights and running statistics carry over."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        like = next(iter(module.state_dict().values()), None)  # none at all: no affine, no running stats
        where = {"device": like.device, "dtype": like.dtype} if like is not None and like.is_floating_point() else {}
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, **where)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, device))
    return module
