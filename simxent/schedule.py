"""Learning-rate schedule and optimisers (SGD, AdamW, LARS) with SimCLR's parameter groups."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch
from torch import nn

from .config import OptimConfig

log = logging.getLogger("simxent")


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """``cfg.lr`` is quoted for a batch of 256: linear -> lr*B/256, sqrt -> lr*sqrt(B/256)."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * batch_size / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(batch_size / 256)
    return cfg.lr


def lr_at(step: int, total: int, warmup: int, peak: float, min_fraction: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_fraction * peak``:

        lr(s) = peak * (s + 1) / warmup                                 for s < warmup
        lr(s) = peak * (m + (1 - m) * (1 + cos(pi * p)) / 2),  p = (s - warmup) / (total - warmup)
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# A budget's warm-up ends by this share of its time at the latest: 10 epochs of warm-up in a 2-minute run
# would leave no time for the decay.
BUDGET_WARMUP_SHARE = 0.1


def warmup_steps(warmup_epochs: float, epochs: int, steps_per_epoch: int) -> int:
    """W = ``warmup_epochs`` x ``steps_per_epoch``, but at most a tenth of the run's S = ``epochs`` x
    ``steps_per_epoch`` steps when W >= S: a warm-up as long as the run would end it before the lr reached its
    peak, never decayed (10 warm-up epochs with ``train.epochs=5``). Said in a warning."""
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    if warmup < total or total == 0:
        return warmup
    cut = round(BUDGET_WARMUP_SHARE * total)
    log.warning("optim.warmup_epochs=%g is not below train.epochs=%d: the lr would still be warming up when the run "
                "ends; the warm-up is cut to %d of the run's %d steps", warmup_epochs, epochs, cut, total)
    return cut


def budget_lr_fraction(step: int, total: int, warmup: int, used: float, min_fraction: float = 0.0,
                       clock: Optional[float] = None) -> float:
    """The lr as a fraction of the peak when a time budget is the schedule, ``used`` (q) the share of the
    budget spent (0 at the first step, 1 at the deadline), S = ``total`` steps, W = ``warmup``, m = ``min_fraction``,
    ``clock`` (q_t, default q) the share that time alone has spent:

        p = max(s / S, q)                                   progress: the epochs' or the clock's, the further
        warm = min(1, max((s + 1) / W, q_t / 0.1))          (1 when W = 0)
        f = warm * (m + (1 - m) * (1 + cos(pi * p)) / 2)

    so warm-up ends after W steps or 10 % of the budget's time, whichever comes first, and f reaches m at
    p = 1. (A resumed run's q counts the steps' progress it saved as spent budget; warm-up must not.)
    With q = 0 throughout this is not :func:`lr_at` (its cosine starts after the warm-up, over
    (s - W) / (S - W)), so a run without a budget keeps lr_at.
    """
    used_share = (used if clock is None else clock) / BUDGET_WARMUP_SHARE
    warm = min(1.0, max((step + 1) / warmup, used_share)) if warmup else 1.0
    progress = min(1.0, max(step / total, used))
    return warm * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


class TimeBudget:
    """The schedule's progress through ``total`` steps (``warmup`` of them warm-up) and, with a time
    budget, through ``max_time`` seconds from ``started`` (a ``clock`` reading taken when the run began, so
    decoding counts toward the deadline).

    Without a budget (``max_time`` 0, or ``spans`` false) the lr is :func:`lr_at` over the steps and
    ``max_time`` only cuts the run. With one, the budget's clock starts at the first step (:meth:`start`,
    time t1) and each step's share of it, tau = (now - t1) / (started + max_time - t1), is averaged over the
    processes (:meth:`read_clock`, then :meth:`agree` with the mean), so that every process sets the same lr;
    the agreed share after step k sets the lr of step k + 1 (:func:`budget_lr_fraction` with
    q = p0 + (1 - p0) * tau, where p0 is the progress a resumed run starts from, 0 for a fresh one). The
    schedule is done when q reaches 1: the deadline.
    """

    def __init__(self, total: int, warmup: int, max_time: float, started: float, spans: bool,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.warmup, self.max_time, self.started, self.clock = total, warmup, max_time, started, clock
        self.spans = spans and max_time > 0
        self.start_progress, self.start_share, self.used, self.first = 0.0, 0.0, 0.0, None

    def start(self) -> float:
        """Start the budget's clock (at the first step); returns the seconds left until the deadline."""
        self.first = self.clock()
        return self.started + self.max_time - self.first

    def read_clock(self) -> tuple[bool, float]:
        """This process's clock: whether the deadline has passed, and the share tau of the budget used
        (0 without a budget; 1 when the deadline came before the first step)."""
        now = self.clock()
        time_up = self.max_time > 0 and now - self.started >= self.max_time
        if not self.spans:
            return time_up, 0.0
        left = self.started + self.max_time - self.first
        return time_up, 1.0 if left <= 0 else min(1.0, (now - self.first) / left)

    def agree(self, mean_used: float, time_up: bool = False) -> None:
        """The share of the budget used, as the processes agreed after a step: it sets the next step's lr.
        ``time_up``: some process's deadline has passed, which ends the run; its schedule ends there too
        (processes that started later have a later deadline, so the mean share may fall short of 1)."""
        self.used = 1.0 if time_up and self.spans else mean_used

    def budget_used(self) -> float:
        """q = p0 + (1 - p0) * tau: the budget's share of the whole schedule, a resumed run's included."""
        return self.start_progress + (1 - self.start_progress) * self.used

    def time_share(self) -> float:
        """The share of the schedule that time budgets alone have used over the run's sessions,
        q = q0 + (1 - q0) * tau (q0: the resumed checkpoint's; kept as it is by a session without a budget).
        Checkpoints save it beside p, so that a run resumed with more ``train.epochs`` goes on from
        max(s / S, q) over its new S: p = 1 after the old epochs would end it at once, as if its budget had
        run out, and a p0 that came from the steps would count as time at the next resume."""
        return self.start_share + (1 - self.start_share) * self.used if self.spans else self.start_share

    def progress(self, step: int) -> float:
        """p = max(s / S, q) at global step ``step`` (s / S without a budget); what checkpoints save."""
        return max(step / self.total, self.budget_used()) if self.spans else step / self.total

    def fraction(self, step: int, min_fraction: float) -> float:
        """The lr at ``step`` as a fraction of the peak."""
        if not self.spans:
            return lr_at(step, self.total, self.warmup, 1.0, min_fraction)
        return budget_lr_fraction(step, self.total, self.warmup, self.budget_used(), min_fraction, self.time_share())

    def finished(self) -> bool:
        """Whether the budget's schedule has reached its end (the deadline; the epochs end their own loop)."""
        return self.spans and self.budget_used() >= 1

    def resume(self, progress: float, share: float) -> None:
        """Go on from the progress p0 and the time budgets' share q0 of a checkpoint
        (:func:`simxent.checkpoint.saved_progress`): the budget anneals p0 to 1."""
        self.start_progress, self.start_share = min(1.0, progress), min(1.0, share)


# Tokens and position tables of torchvision's transformers (ViT, Swin): no decay, as in timm and MAE.
PLAIN_NAMES = ("class_token", "pos_embedding", "relative_position_bias_table")


def param_groups(model: nn.Module, weight_decay: float, leave_out: tuple = ()) -> list[dict]:
    """Biases, normalisation parameters and other per-channel scales (a tensor with at most one dimension
    above 1: ConvNeXt's (C, 1, 1) layer scale, Swin V2's logit scale) and PLAIN_NAMES get no weight decay
    and, under LARS, no trust-ratio adaptation, as in SimCLR; LARS steps of at most lr * eta * ||w|| would
    hold ConvNeXt's layer scales near their 1e-6 start. Parameters in ``leave_out`` (by identity) are left
    out."""
    decay, plain = [], []
    left_out = {id(p) for p in leave_out}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in left_out:
            per_channel = sum(size > 1 for size in p.shape) <= 1
            (plain if per_channel or name.rsplit(".", 1)[-1] in PLAIN_NAMES else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars": False},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as used by SimCLR:

        g <- g + wd * w
        g <- g * eta * ||w|| / ||g||       (groups with lars=True, when both norms are > 0)
        v <- m * v + g ;  w <- w - lr * v
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        """All parameters of a group at once (foreach kernels): a per-tensor loop would launch some ten
        small kernels per parameter, which on a GPU costs more host time than the update itself."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                grads = torch._foreach_mul(grads, list(ratio.unbind()))
            for p in params:
                if "momentum" not in self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def temperature_group(temperature: nn.Module) -> list[dict]:
    """A learnt temperature's own group (its lr is set apart from the encoder's, absolute, not scaled with
    the batch): no weight decay and no LARS trust ratio. In the biases' group it would take the encoder's
    lr, which under SGD and LARS at the presets' rates drives t below 0.005 within a few hundred steps,
    or far above 1. Empty for a fixed temperature."""
    params = [p for p in temperature.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": 0.0, "lars": False, "temperature": True}] if params else []


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, temperature: Optional[nn.Module] = None,
                    temperature_lr: float = 0.0) -> torch.optim.Optimizer:
    """``model``'s SimCLR groups at ``lr``, and a learnt ``temperature`` (a submodule of ``model`` or not) in
    its own group at ``temperature_lr``.

    SGD and AdamW use PyTorch's fused kernels (one pass over each tensor, on the CPU as on the GPU): the
    per-tensor loop they default to on a CPU took some 5 % of the ``cpu`` preset's training step."""
    if temperature is None:
        groups = param_groups(model, cfg.weight_decay)
    else:
        groups = param_groups(model, cfg.weight_decay, tuple(temperature.parameters()))
        groups += temperature_group(temperature)
    for g in groups:
        g["lr"] = temperature_lr if g.get("temperature") else lr
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    for g in groups:
        g.pop("lars")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, fraction: float, peak: float, temperature_lr: float) -> float:
    """Every group at ``fraction`` (of the schedule's peak 1: :meth:`TimeBudget.fraction`) of its peak:
    ``peak`` for the encoder and head, ``temperature_lr`` for the temperature's group, which so follows the
    same warm-up and cosine. Returns the encoder's lr."""
    for group in optimizer.param_groups:
        group["lr"] = fraction * (temperature_lr if group.get("temperature") else peak)
    return fraction * peak
