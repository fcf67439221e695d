"""Learning-rate schedule and optimisers (SGD, AdamW, LARS) with SimCLR's parameter groups."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .config import OptimConfig


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


@dataclass
class StepPlan:
    """A schedule's length: the run takes ``total`` steps, warms up over ``warmup`` and its cosine reaches
    min_lr at step ``decay_end`` (``total`` for epochs, so the last step runs just above it; ``total - 1``
    for a time budget, whose last step runs at min_lr).

    A plan fixed mid-warm-up (a time budget's) goes on from where the lr stands: its warm-up is the line
    from ``start_fraction`` at step ``start_step`` to 1 at ``warmup``,

        f(s) = f0 + (1 - f0) * (s + 1 - s0) / (warmup - s0)        for s0 <= s < warmup
    """

    total: int
    warmup: int
    decay_end: int
    start_step: int = 0
    start_fraction: float = 0.0

    def fraction(self, step: int, min_fraction: float) -> float:
        """The lr at ``step`` as a fraction of the peak (:func:`lr_at` with peak 1, after the warm-up)."""
        if self.start_step and step < self.warmup:
            f0 = self.start_fraction
            return f0 + (1 - f0) * (step + 1 - self.start_step) / (self.warmup - self.start_step)
        return lr_at(step, self.decay_end, self.warmup, 1.0, min_fraction)


# A budget's warm-up takes at most this share of its steps: 10 epochs of warm-up in a 2-minute run would
# leave no time for the decay.
BUDGET_WARMUP_SHARE = 0.1


def planned_steps(done: int, rate: float, remaining: float, epoch_steps: int) -> int:
    """Steps a time budget allows: those ``done``, then ``rate`` steps/s over the ``remaining`` seconds,
    never more than the epochs ask for:

        total = min(epoch_steps, done + floor(rate * remaining))
    """
    return min(epoch_steps, done + math.floor(rate * max(0.0, remaining)))


class TimeBudget:
    """The step plan of a run with a time budget (``max_time`` seconds from ``started``, a ``clock``
    reading taken when the run began, so decoding counts), fixed once from the measured step rate.

    Until it is fixed the lr follows ``epoch_plan`` (epochs x steps per epoch); its warm-up starts at 0,
    so the first steps are small whatever the plan. The rate is timed over ``measure`` steps after
    ``skip`` (first steps pay for caches, allocation, compilation), or over fewer (one at least) when
    they would take more than ``window_share`` of the budget (slow steps, short budgets); then

        total = planned_steps(done, rate, max_time - elapsed, epoch_plan.total)
        warmup = min(epoch_plan.warmup, floor(BUDGET_WARMUP_SHARE * total))

    and the cosine ends on the last planned step (a budget that allows every epoch keeps ``epoch_plan``).
    The plan never changes after that: it is saved in checkpoints (:meth:`state_dict`) and a resumed run
    follows it. ``max_time <= 0`` means no budget:
    ``epoch_plan`` is the plan from the start. ``agree`` makes every process fix the same total.
    """

    skip, measure, window_share = 3, 10, 0.05

    def __init__(self, epoch_plan: StepPlan, max_time: float, started: float,
                 clock: Callable[[], float] = time.monotonic, agree: Callable[[int], int] = int):
        self.plan, self.epoch_steps = epoch_plan, epoch_plan.total
        self.max_time, self.started, self.clock, self.agree = max_time, started, clock, agree
        self.fixed, self.budgeted = max_time <= 0, False
        self.seen, self.window_start = 0, 0.0
        self.rate, self.remaining = float("nan"), float("nan")

    def fraction(self, step: int, min_fraction: float) -> float:
        return self.plan.fraction(step, min_fraction)

    def window_done(self) -> bool:
        """Whether this process's clock says that the step now ending closes the timing window. Under
        several processes each one's answer goes into the step's agreement (:func:`simxent.dist.agree`),
        so that all of them fix the plan on the same step: see :meth:`step_done`."""
        if self.fixed:
            return False
        measured = self.seen + 1 - self.skip
        return measured >= self.measure or (
            measured >= 1 and self.clock() - self.window_start >= self.window_share * self.max_time)

    def step_done(self, global_step: int, window_done: Optional[bool] = None) -> bool:
        """Count a finished step (``global_step`` done in all); returns True when it fixed the plan.

        ``window_done``: whether any process's :meth:`window_done` said so for this step (None: ask this
        process's clock alone). All processes then call ``agree`` together and fix the mean plan."""
        if self.fixed:
            return False
        done = self.window_done() if window_done is None else window_done
        self.seen += 1
        now = self.clock()
        if self.seen == self.skip:
            self.window_start = now
        if not done or self.seen <= self.skip:  # the step count is the same on every process
            return False
        self.rate = (self.seen - self.skip) / max(now - self.window_start, 1e-9)
        self.remaining = self.max_time - (now - self.started)
        self.fix(self.agree(planned_steps(global_step, self.rate, self.remaining, self.epoch_steps)), global_step)
        return True

    def fix(self, total: int, done: int = 0) -> None:
        """Fix the plan at ``total`` steps, ``done`` of them run; a budget that allows all the epochs keeps
        their schedule. A shorter plan warms up over ``BUDGET_WARMUP_SHARE`` of its steps, at most the epochs'
        warm-up; fixed inside the epochs' warm-up, its lr climbs on from the last step's, never faster than
        the planned warm-up's slope 1 / warmup (so that warm-up may end a little later)."""
        if total >= self.epoch_steps:
            self.fixed, self.budgeted = True, True
            return
        warmup = min(self.plan.warmup, math.floor(BUDGET_WARMUP_SHARE * total))
        f0 = self.plan.fraction(done - 1, 0.0) if done else 0.0
        if warmup and 0 < done < self.plan.warmup and f0 < 1:
            end = max(warmup, done + math.ceil((1 - f0) * warmup))
            self.plan = StepPlan(total, end, max(total - 1, end), done, f0)
        else:
            self.plan = StepPlan(total, warmup, max(total - 1, warmup))
        self.fixed, self.budgeted = True, True

    def finished(self, global_step: int) -> bool:
        """Whether a budget plan shorter than the epochs has run all its steps (one as long as the epochs
        ends with them)."""
        return self.budgeted and self.plan.total < self.epoch_steps and global_step >= self.plan.total

    def state_dict(self) -> Optional[dict]:
        """The fixed plan for checkpoints; None without a budget or before the plan is fixed."""
        return vars(self.plan).copy() if self.budgeted else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            self.plan, self.fixed, self.budgeted = StepPlan(**state), True, True


def param_groups(model: nn.Module, weight_decay: float, leave_out: tuple = ()) -> list[dict]:
    """Biases and normalisation parameters (every 1-d tensor) get no weight decay and, under LARS,
    no trust-ratio adaptation, as in SimCLR. Parameters in ``leave_out`` (by identity) are left out."""
    decay, plain = [], []
    left_out = {id(p) for p in leave_out}
    for p in model.parameters():
        if p.requires_grad and id(p) not in left_out:
            (plain if p.ndim <= 1 else decay).append(p)
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
    its own group at ``temperature_lr``."""
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
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def set_lr(optimizer: torch.optim.Optimizer, fraction: float, peak: float, temperature_lr: float) -> float:
    """Every group at ``fraction`` (from :func:`lr_at` with peak 1) of its peak: ``peak`` for the encoder
    and head, ``temperature_lr`` for the temperature's group, which so follows the same warm-up and
    cosine. Returns the encoder's lr."""
    for group in optimizer.param_groups:
        group["lr"] = fraction * (temperature_lr if group.get("temperature") else peak)
    return fraction * peak
