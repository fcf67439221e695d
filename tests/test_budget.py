"""A time budget is the schedule's length: the plan from the measured rate, its lr, resume, the switch."""
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import simxent.dist
import simxent.schedule
from simxent.checkpoint import load_checkpoint
from simxent.config import load_config
from simxent.demo import make_shapes
from simxent.schedule import StepPlan, TimeBudget, lr_at, planned_steps
from simxent.train import pretrain, time_budget
from tests.test_distributed import free_port
from tests.test_reliability import ROOT, launch, tiny, wait_for_step


def cosine(step: int, warmup: int, end: int, m: float) -> float:
    """The schedule written out: linear warm-up to 1, then cosine from 1 at ``warmup`` to ``m`` at ``end``."""
    if step < warmup:
        return (step + 1) / warmup
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (end - warmup))))


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_steps(budget: TimeBudget, clock: FakeClock, steps: int, seconds_per_step: float) -> list[int]:
    """Steps 1..``steps`` each taking ``seconds_per_step``; returns the global steps at which the plan was fixed."""
    fixed_at = []
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        if budget.step_done(step):
            fixed_at.append(step)
    return fixed_at


def ramp(step: int, start: int, f0: float, end: int) -> float:
    """A warm-up that goes on from ``f0`` at ``start`` to 1 at ``end``, written out."""
    return f0 + (1 - f0) * (step + 1 - start) / (end - start)


def test_plan_is_the_measured_rate_times_the_time_left_since_the_run_started():
    """5 s of decoding, then 0.5 s a step: the plan is fixed once, after steps 4..13 are timed (2 steps/s),
    from the 200 s budget less the 11.5 s spent: 13 + floor(2 * 188.5) = 390 steps; warm-up 39 (10 %),
    taken on from the epochs' warm-up (13/50 after step 13) at slope 1/39: 1 at step 13 + ceil(0.74 * 39)."""
    clock = FakeClock(100.0 + 5.0)
    budget = TimeBudget(StepPlan(1000, 50, 1000), max_time=200, started=100.0, clock=clock)
    before = [budget.fraction(s, 0.1) for s in range(13)]
    assert before == [lr_at(s, 1000, 50, 1.0, 0.1) for s in range(13)]  # the epochs' warm-up until then
    assert run_steps(budget, clock, 40, 0.5) == [13]
    assert budget.rate == pytest.approx(2.0) and budget.remaining == pytest.approx(188.5)
    assert budget.plan == StepPlan(13 + math.floor(2.0 * 188.5), 42, 389, 13, 13 / 50)
    assert budget.state_dict() == {"total": 390, "warmup": 42, "decay_end": 389, "start_step": 13,
                                   "start_fraction": 13 / 50}
    lrs = before + [budget.fraction(s, 0.1) for s in range(13, 390)]
    expected = before + [ramp(s, 13, 0.26, 42) for s in range(13, 42)] + [cosine(s, 42, 389, 0.1)
                                                                          for s in range(42, 390)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[41] == 1.0 and lrs[-1] == pytest.approx(0.1)  # the last planned step runs at min_lr
    assert max(b - a for a, b in zip(lrs, lrs[1:])) <= 1 / 39 + 1e-12  # never steeper than the planned warm-up
    assert not budget.finished(389) and budget.finished(390)


@pytest.mark.parametrize("fixed_at, epoch_warmup, total", [(13, 50, 24), (13, 50, 390), (5, 8, 60), (40, 50, 100),
                                                           (13, 14, 200), (30, 20, 200)])
def test_the_lr_never_jumps_when_the_plan_is_fixed(fixed_at, epoch_warmup, total):
    """Fixed at any step, the lr of consecutive steps rises by at most the planned warm-up's slope
    1 / warmup (warmup = 10 % of the plan, at most the epochs'), reaches the peak, and ends at min_lr."""
    budget = TimeBudget(StepPlan(1000, epoch_warmup, 1000), max_time=100, started=0.0)
    before = [budget.fraction(s, 0.1) for s in range(fixed_at)]
    budget.fix(total, fixed_at)
    lrs = before + [budget.fraction(s, 0.1) for s in range(fixed_at, total)]
    slope = 1 / min(epoch_warmup, math.floor(0.1 * total))  # the planned warm-up
    assert max(b - a for a, b in zip(lrs, lrs[1:])) <= slope + 1e-12
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)


def test_slow_steps_are_timed_over_5_percent_of_the_budget():
    """20 s a step in a 120-second budget: steps 1-3 skipped, then step 4 alone (over 6 s = 5 %) gives the
    rate, 0.05 steps/s, with 120 - 2 - 80 s left: 4 + floor(0.05 * 38) = 5 steps, no warm-up."""
    clock = FakeClock(2.0)
    budget = TimeBudget(StepPlan(390, 8, 390), max_time=120, started=0.0, clock=clock)
    assert run_steps(budget, clock, 6, 20.0) == [4]
    assert budget.rate == pytest.approx(0.05) and budget.plan == StepPlan(4 + math.floor(0.05 * 38.0), 0, 4)


def test_plan_formula_and_a_budget_that_allows_every_epoch():
    assert planned_steps(13, 2.0, 48.5, 1000) == 110
    assert planned_steps(13, 2.0, 48.5, 60) == 60
    assert planned_steps(13, 2.0, -4.0, 1000) == 13  # already past the deadline: no more steps
    clock = FakeClock(0.0)
    budget = TimeBudget(StepPlan(60, 50, 60), max_time=600, started=0.0, clock=clock)
    run_steps(budget, clock, 20, 0.5)
    # The epochs' own schedule, not a capped warm-up; the run ends with its epochs, not as a cut budget.
    assert budget.plan == StepPlan(60, 50, 60) and not budget.finished(60)
    assert budget.state_dict() == {"total": 60, "warmup": 50, "decay_end": 60, "start_step": 0, "start_fraction": 0}


def test_without_max_time_the_epoch_schedule_is_unchanged():
    clock = FakeClock(0.0)
    budget = TimeBudget(StepPlan(200, 20, 200), max_time=0, started=0.0, clock=clock)
    assert run_steps(budget, clock, 200, 0.5) == []
    assert [budget.fraction(s, 0.0) for s in range(200)] == [lr_at(s, 200, 20, 1.0) for s in range(200)]
    assert budget.state_dict() is None and not budget.finished(10_000)
    restored = TimeBudget(StepPlan(200, 20, 200), max_time=0, started=0.0)
    restored.load_state_dict({"total": 110, "warmup": 11, "decay_end": 109})  # a recorded plan wins
    assert restored.plan == StepPlan(110, 11, 109) and restored.finished(110) and not restored.finished(109)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=4, size=16)


PLANNED = 24  # steps forced on the plan below (5 steps an epoch, 200 epochs: 1,000 steps by epochs)
PEAK = 0.1 * 16 / 256  # TINY_RUN's lr at its batch of 16 (linear scaling)


@pytest.mark.usefixtures("one_thread")
def test_a_run_with_a_budget_follows_its_plan_to_min_lr_and_stops(shapes, tmp_path, monkeypatch):
    """The real loop with the planner's answer spied on and set to 24 steps: the plan is asked for after
    step 13 with the measured rate and the time left, the logged lr climbs on from the epochs' warm-up at
    the slope of the planned one (2 = 10 % of 24, not the epochs' 50) and follows the cosine to min_lr at
    step 24, and the run stops there, annealed, with the plan saved.
    The rate is always timed over the full 10 steps (no share of the budget cuts the window short), so
    when the plan is fixed does not depend on how fast this machine runs a step."""
    asked = []

    def spy(done, rate, remaining, epoch_steps):
        asked.append((done, rate, remaining, epoch_steps))
        return PLANNED

    monkeypatch.setattr(simxent.schedule, "planned_steps", spy)
    monkeypatch.setattr(TimeBudget, "window_share", math.inf)
    run = tmp_path / "run"
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=200", "train.max_time=600", "train.budget_schedule=true",
                                              "optim.min_lr=0.1")), progress=False)
    [(done, rate, remaining, epoch_steps)] = asked
    assert done == 13 and rate > 0 and 0 < remaining < 600 and epoch_steps == 1000
    assert summary["global_step"] == PLANNED == summary["planned_steps"] and summary["stopped_by_max_time"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["schedule"] == {"total": PLANNED, "warmup": 15, "decay_end": PLANNED - 1, "start_step": 13,
                                 "start_fraction": 13 / 50}
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}  # logged at step s + 1 for step s
    assert sorted(lrs) == list(range(1, PLANNED + 1))
    early = [PEAK * lr_at(s, 1000, 50, 1.0, 0.1) for s in range(13)]  # the epochs' warm-up until the plan
    # From 13/50 on to the peak in ceil(0.74 * 2) = 2 steps (slope <= 1/2), then the cosine.
    late = [PEAK * ramp(s, 13, 13 / 50, 15) for s in (13, 14)] + [PEAK * cosine(s, 15, PLANNED - 1, 0.1)
                                                                   for s in range(15, PLANNED)]
    assert [lrs[s + 1] for s in range(PLANNED)] == pytest.approx(early + late, rel=1e-6)
    assert lrs[PLANNED] == pytest.approx(PEAK * 0.1)


@pytest.mark.usefixtures("one_thread")
def test_budget_schedule_false_keeps_the_epoch_schedule(shapes, tmp_path):
    run = tmp_path / "run"
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=3", "train.max_time=600",
                                              "train.budget_schedule=false")), progress=False)
    assert summary["planned_steps"] is None and summary["global_step"] == 15
    assert load_checkpoint(run / "checkpoints" / "last.pt")["schedule"] is None
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([PEAK * lr_at(s, 15, 50, 1.0) for s in range(15)], rel=1e-6)


def launch_with_plan(args, steps: int):
    """scripts/pretrain.py's command with the planner's answer fixed at ``steps``, in the environment of
    tests.test_reliability.launch: a plan that does not hang on the machine's speed, so two runs share it."""
    code = (f"import sys, simxent.schedule as s; s.planned_steps = lambda *a: min({steps}, a[-1]); "
            "from simxent.cli import pretrain_main; sys.exit(pretrain_main())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, "--no-progress", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_after_the_plan_then_resume_keeps_it_and_equals_uninterrupted(shapes, tmp_path):
    """Killed at a random step after the plan (24 steps) was fixed, then resumed by the plain command,
    which would plan 1,000 steps (the epochs, in 600 s) were it to measure again: it follows the saved
    plan and ends with the weights of the same run uninterrupted."""
    args = tiny(shapes, tmp_path / "killed", "train.epochs=200", "train.max_time=600", "train.budget_schedule=true", "train.checkpoint_every=1")
    reference = launch_with_plan([*args, f"out={tmp_path / 'reference'}"], PLANNED)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    proc = launch_with_plan(args, PLANNED)
    wait_for_step(tmp_path / "killed" / "checkpoints" / "last.pt", random.Random().randint(14, 20), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert killed["schedule"]["total"] == PLANNED and killed["position"]["global_step"] < PLANNED
    resumed = launch([*args, "train.resume=auto"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"following the time budget's plan saved in the checkpoint: {PLANNED} steps" in err
    a = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert a["position"]["global_step"] == b["position"]["global_step"] == PLANNED
    assert a["schedule"] == b["schedule"]
    for part in ("encoder", "head"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=1e-6, msg=lambda m: f"{part}.{key}: {m}")
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["planned_steps"] == PLANNED


def _agree_worker(rank, port, world, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        budget = time_budget(load_config(None, ["train.max_time=60", "train.epochs=10", "train.budget_schedule=true"]), 100, 0.0,
                             torch.device("cpu"))
        results[rank] = budget.agree(5 + 10 * rank)  # each process measured its own rate
    finally:
        torch.distributed.destroy_process_group()


def test_every_process_fixes_the_same_plan():
    """Under torchrun each process times its own steps; the plan is the floor of their mean (5 and 15
    planned steps: 10 on both), so all stop on the same step."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_agree_worker, args=(free_port(), 2, results), nprocs=2)
    assert dict(results) == {0: 10, 1: 10}


SECONDS_PER_STEP = {0: 0.4, 1: 0.6}  # rank 1's clock closes the 5 s timing window (5 % of 100 s) a step earlier


def _shared_window_worker(rank, port, world, results):
    """The loop's use of a budget: each process asks its own clock whether the timing window is done, the
    answers travel in the step's agreement with the loss, and every process counts the step with them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        budget = time_budget(load_config(None, ["train.max_time=100", "train.epochs=10", "train.budget_schedule=true"]), 100, 0.0,
                             torch.device("cpu"))
        budget.clock = clock = FakeClock(0.0)
        fixed_at, losses = [], []
        for step in range(1, 30):
            clock.now += SECONDS_PER_STEP[rank]
            loss, window = simxent.dist.agree([torch.tensor(float(rank)), budget.window_done()], torch.device("cpu"))
            losses.append(loss)
            if budget.step_done(step, window > 0):
                fixed_at.append(step)
        results[rank] = (fixed_at, budget.plan.total, set(losses))
    finally:
        torch.distributed.destroy_process_group()


def test_processes_whose_clocks_disagree_fix_the_plan_on_the_same_step():
    """Rank 1 (0.6 s a step) sees its timing window end after step 12, rank 0 (0.4 s) after step 13: the
    shared flag makes both fix the plan after step 12, each from its own rate over steps 4-12 and time
    left, at the floor of the mean of their plans (one process deciding alone called the plan's
    all_reduce on its own and paired it with the other's next collective)."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_shared_window_worker, args=(free_port(), 2, results), nprocs=2)
    plans = [planned_steps(12, 9 / (9 * spd), 100 - 12 * spd, 1000) for spd in SECONDS_PER_STEP.values()]
    expected = math.floor(sum(plans) / 2)
    assert dict(results) == {0: ([12], expected, {0.5}), 1: ([12], expected, {0.5})}
