"""A time budget is the schedule: progress is the share of the budget used, agreed over processes, saved
on resume; ``train.budget_schedule=false`` keeps the epoch schedule."""
import math
import os
import shutil
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import simxent.dist
import simxent.train
from simxent.checkpoint import load_checkpoint, resumed_position, save_checkpoint, saved_progress
from simxent.config import load_config
from simxent.demo import make_shapes
from simxent.schedule import TimeBudget, lr_at
from simxent.train import pretrain
from tests.test_distributed import free_port
from tests.test_reliability import tiny


def expected_fraction(step: int, total: int, warmup: int, q: float, m: float) -> float:
    """The budget's lr written out: warm-up to step ``warmup`` or to 10 % of the budget (q = 0.1), whichever
    comes first, times a cosine over the further of the steps' and the budget's progress."""
    p = max(step / total, q)
    warm = min(1.0, max((step + 1) / warmup, q / 0.1))
    return warm * (m + (1 - m) * (1 + math.cos(math.pi * p)) / 2)


class StepClock:
    """A clock that reads ``first`` at the budget's start, then advances by the next of ``durations`` at
    each reading (the loop reads it once per step); ``times`` holds every reading. ``hook(reading)``, if
    given, runs at each step's reading (its count from 1)."""

    def __init__(self, first: float, durations, hook=None):
        self.durations, self.hook, self.times = iter(durations), hook, []
        self.now = first

    def __call__(self) -> float:
        if self.times:
            self.now += next(self.durations)
            if self.hook:
                self.hook(len(self.times))
        self.times.append(self.now)
        return self.now


def shares(times: list, started: float, max_time: float) -> list:
    """tau after each step, from the clock's readings: time since the first step over the time it had left."""
    first, deadline = times[0], started + max_time
    return [min(1.0, (t - first) / (deadline - first)) for t in times[1:]]


def drive(budget: TimeBudget, m: float, agree=lambda used: used) -> list:
    """The training loop's use of a budget without the model: each step's lr fraction, then the clock read
    and the share of the budget agreed, until the deadline, the schedule's end or the epochs."""
    fractions, step = [], 0
    budget.start()
    while step < budget.total and not budget.finished():
        fractions.append(budget.fraction(step, m))
        time_up, used = budget.read_clock()
        budget.agree(agree(used))
        step += 1
        if time_up:
            break
    return fractions


def test_the_lr_follows_the_share_of_the_budget_used_since_the_first_step():
    """Started at 100 s, 7 s of decoding (they count toward the deadline at 200 s, not in tau: 93 s left at
    the first step), steps of random length: step k's lr is the formula at tau after step k - 1, and the run
    stops on the step that reaches the deadline, its lr within 1 % of min_lr."""
    rng = torch.Generator().manual_seed(0)
    durations = (0.2 + 0.8 * torch.rand(1000, generator=rng, dtype=torch.float64)).tolist()
    clock = StepClock(107.0, durations)
    budget = TimeBudget(total=1000, warmup=50, max_time=100, started=100.0, spans=True, clock=clock)
    fractions = drive(budget, 0.1)
    taus = shares(clock.times, 100.0, 100)
    assert clock.times[-2] < 200 <= clock.times[-1]  # the last step is the one that reached the deadline
    expected = [expected_fraction(s, 1000, 50, ([0.0] + taus)[s], 0.1) for s in range(len(fractions))]
    assert fractions == pytest.approx(expected, rel=1e-12)
    assert 0.1 <= fractions[-1] <= 0.101
    assert budget.progress(len(fractions)) == 1.0 and budget.finished()


def test_without_a_budget_the_lr_is_the_epoch_schedule_bit_for_bit():
    """max_time 0 (or train.budget_schedule=false) leaves the schedule of epochs: lr_at, exactly; with
    budget_schedule false, max_time still stops the run at its deadline."""
    for max_time, spans in ((0.0, True), (0.0, False), (30.0, False)):
        clock = StepClock(2.0, [1.0] * 200)
        budget = TimeBudget(total=200, warmup=20, max_time=max_time, started=0.0, spans=spans, clock=clock)
        fractions = drive(budget, 0.05)
        assert len(fractions) == (28 if max_time else 200)  # 2 s decoding + 28 steps of 1 s reach 30 s
        assert fractions == [lr_at(s, 200, 20, 1.0, 0.05) for s in range(len(fractions))]
        assert budget.progress(len(fractions)) == len(fractions) / 200


def test_a_slow_start_does_not_shorten_the_run():
    """The first 5 steps take 1 s, the rest 0.05 s (20x faster) in a 100 s budget: the run goes on to the
    deadline (1,905 steps), ends within 1 % of min_lr, and no step raises the lr by more than the warm-up's
    slope, 0.1 a step here (a slow step is 1 % of the budget, a tenth of the warm-up's 10 %)."""
    clock = StepClock(0.0, [1.0] * 5 + [0.05] * 10_000)
    budget = TimeBudget(total=100_000, warmup=500, max_time=100, started=0.0, spans=True, clock=clock)
    fractions = drive(budget, 0.2)
    assert len(fractions) == pytest.approx(5 + 95 / 0.05, abs=1) and clock.times[-1] >= 100
    assert 0.2 <= fractions[-1] <= 0.202
    steps = [b - a for a, b in zip(fractions, fractions[1:])]
    assert max(steps) <= 0.1 + 1e-9
    assert -min(steps) <= (1 - 0.2) * math.pi / 2 * 0.01  # the cosine's steepest slope over 1 % of the budget


def test_a_resumed_budget_goes_on_from_its_saved_progress_to_its_own_deadline():
    """A run stopped at step 30 with p0 = 0.4 saved, resumed with a budget of 50 s: q = p0 + (1 - p0) tau,
    so its first lr is the one the stopped run would have set next, and it anneals by its own deadline."""
    clock = StepClock(0.0, [1.0] * 100)
    first = TimeBudget(total=1000, warmup=10, max_time=75, started=0.0, spans=True, clock=clock)
    first.start()
    for step in range(30):
        first.agree(first.read_clock()[1])
    p0 = first.progress(30)
    assert p0 == pytest.approx(0.4)
    clock = StepClock(5.0, [2.0] * 100)
    resumed = TimeBudget(total=1000, warmup=10, max_time=55, started=0.0, spans=True, clock=clock)
    assert first.time_share() == pytest.approx(0.4)  # all of it from the budget's time
    resumed.resume(p0, first.time_share())
    resumed.start()
    assert resumed.fraction(30, 0.1) == first.fraction(30, 0.1) == expected_fraction(30, 1000, 10, 0.4, 0.1)
    fractions = []
    for step in range(30, 1000):
        fractions.append(resumed.fraction(step, 0.1))
        time_up, used = resumed.read_clock()
        resumed.agree(used)
        if time_up:
            break
    qs = [p0 + (1 - p0) * tau for tau in [0.0] + shares(clock.times, 0.0, 55)]
    assert len(fractions) == 25  # 50 s left at the first step, 2 s a step
    assert fractions == pytest.approx([expected_fraction(30 + k, 1000, 10, qs[k], 0.1) for k in range(25)],
                                      rel=1e-12)
    assert fractions[-1] == pytest.approx(0.1, rel=0.02) and resumed.finished() and resumed.time_share() == 1
    plain = TimeBudget(total=1000, warmup=10, max_time=0, started=0.0, spans=True)
    plain.resume(p0, p0)  # resumed without a budget: the epochs' schedule from the step, as before
    assert plain.fraction(30, 0.1) == lr_at(30, 1000, 10, 1.0, 0.1)


def _agree_worker(rank, port, world, results):
    """The loop's use of a budget under two processes: each reads its own clock (rank 1's decoding took
    longer and its steps are slower) and the mean share travels in the step's agreement."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        clock = StepClock(*CLOCKS[rank])
        budget = TimeBudget(total=1000, warmup=20, max_time=60, started=0.0, spans=True, clock=clock)
        budget.start()
        fractions = []
        while not budget.finished():
            fractions.append(budget.fraction(len(fractions), 0.1))
            time_up, used = budget.read_clock()
            loss, time_up_share, used_mean = simxent.dist.agree([torch.tensor(1.0), time_up, used],
                                                                torch.device("cpu"))
            budget.agree(used_mean, time_up_share > 0)
            if time_up_share > 0:
                break
        results[rank] = (fractions, clock.times, budget.finished())
    finally:
        torch.distributed.destroy_process_group()


CLOCKS = {0: (2.0, [0.5] * 200), 1: (4.0, [0.75] * 200)}


def test_processes_whose_clocks_disagree_set_the_same_lr():
    """Rank 0 starts at 2 s and takes 0.5 s a step, rank 1 at 4 s and 0.75 s: both set the lr of the mean
    of their shares, identical on every step, and stop together when rank 1 reaches the 60 s deadline, with
    the schedule ended in both (the mean share is below 1 then: BatchNorm re-estimation and a resume's
    'nothing to train' depend on it)."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_agree_worker, args=(free_port(), 2, results), nprocs=2)
    (f0, times0, done0), (f1, times1, done1) = results[0], results[1]
    assert done0 and done1
    assert f0 == f1 and len(f0) == 75  # 4 + 75 * 0.75 = 60.25: rank 1's deadline ends the run
    taus = [(a + b) / 2 for a, b in zip(shares(times0, 0.0, 60), shares(times1, 0.0, 60))]
    expected = [expected_fraction(s, 1000, 20, ([0.0] + taus)[s], 0.1) for s in range(75)]
    assert f0 == pytest.approx(expected, rel=1e-6)  # the shares are averaged in float32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=4, size=16)


PEAK = 0.1 * 16 / 256  # TINY_RUN's lr at its batch of 16 (linear scaling)
WARMUP, TOTAL = 50, 1000  # TINY_RUN's 10 warm-up epochs of 5 steps, and 200 epochs


def use_clock(monkeypatch, clock):
    """The real loop with a run whose clock is ``clock``, started at 0 s."""
    real = simxent.train.time_budget

    def with_clock(cfg, steps_per_epoch, started):
        budget = real(cfg, steps_per_epoch, 0.0)
        budget.clock = clock
        return budget

    monkeypatch.setattr(simxent.train, "time_budget", with_clock)


def logged_lrs(run) -> dict:
    """Step s's lr, logged at step s + 1."""
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return {e.step - 1: e.value for e in events.Scalars("train/lr")}


@pytest.mark.usefixtures("one_thread")
def test_a_run_with_a_slow_start_anneals_at_its_deadline(shapes, tmp_path, monkeypatch, caplog):
    """The real loop on a fake clock: 2 s of decoding, 3 steps of 5 s, then 0.25 s a step (20x faster), in
    a 23 s budget: the run goes on to the deadline (3 + 24 steps), each logged lr is the formula at the
    budget's share after the step before, and the last runs at min_lr; the checkpoint saves progress 1."""
    clock = StepClock(2.0, [5.0] * 3 + [0.25] * 1000)
    use_clock(monkeypatch, clock)
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="simxent"):
        summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=200", "train.max_time=23",
                                                  "optim.min_lr=0.1")), progress=False)
    assert "train.max_time=23s: warm-up and cosine span the 21 s left" in caplog.text
    assert "training images at data.image_size=16 (views 16 px)" in caplog.text  # the size a user may not have set
    assert summary["global_step"] == 27 and summary["stopped_by_max_time"] and summary["schedule_progress"] == 1
    assert clock.times[-2] < 23 <= clock.times[-1]
    qs = [0.0] + shares(clock.times, 0.0, 23)
    lrs = logged_lrs(run)
    assert sorted(lrs) == list(range(27))
    expected = [PEAK * expected_fraction(s, TOTAL, WARMUP, qs[s], 0.1) for s in range(27)]
    assert [lrs[s] for s in range(27)] == pytest.approx(expected, rel=1e-6)
    assert lrs[26] == pytest.approx(PEAK * 0.1, rel=0.01)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"] == 1
    use_clock(monkeypatch, StepClock(2.0, [0.25] * 1000))  # resumed: its schedule is done, and it says so
    with caplog.at_level("INFO", logger="simxent"):
        again = pretrain(load_config(None, tiny(shapes, run, "train.epochs=200", "train.max_time=23",
                                                "optim.min_lr=0.1", "train.resume=auto")), progress=False)
    assert again["global_step"] == 27 and "ended annealed at its time budget" in caplog.text
    # The way on that the warning gives: a cosine over more epochs, without the budget, annealed at their end.
    caplog.clear()
    with caplog.at_level("INFO", logger="simxent"):
        on = pretrain(load_config(None, tiny(shapes, run, "train.epochs=8", "train.budget_schedule=false",
                                             "optim.min_lr=0.1", "train.resume=auto")), progress=False)
    assert on["global_step"] == 40 and on["schedule_progress"] == 1
    assert "the schedule goes back from the checkpoint's progress 1.000 to 0.675 of train.epochs=8" in caplog.text
    assert logged_lrs(run)[39] == pytest.approx(lr_at(39, 40, 4, PEAK, 0.1), rel=1e-6)  # warm-up: a tenth of 40


def stop_at(step: int):
    """A clock hook that sends this process SIGTERM while step ``step`` (from 1) runs: the loop stops after it."""
    def hook(reading):
        if reading == step:
            signal.raise_signal(signal.SIGTERM)
    return hook


OLD_PLAN = {"total": 41, "warmup": 4, "decay_end": 40, "start_step": 0, "start_fraction": 0.0}


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_anneals_from_its_saved_progress_by_its_own_deadline(shapes, tmp_path, monkeypatch, caplog):
    """Stopped (SIGTERM) after 10 steps of 1 s in a 101 s budget: p0 = 0.1 is saved. Resumed with a budget of
    23 s (3 s decoding, 2 s a step): q = p0 + (1 - p0) tau, its first lr the one the stopped run would have
    set next, and 10 steps to its deadline, where p reaches 1. A checkpoint holding an older version's step
    plan instead of p resumes from its progress through that plan: p0 = 10 / 40, its cosine's end."""
    args = ("train.epochs=200", "train.max_time=101", "optim.min_lr=0.1")
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000, stop_at(10)))
    run = tmp_path / "run"
    cut = pretrain(load_config(None, tiny(shapes, run, *args)), progress=False)
    assert cut["global_step"] == 10 and not cut["stopped_by_max_time"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["progress"] == pytest.approx(0.1, rel=1e-6)
    assert logged_lrs(run)[9] == pytest.approx(PEAK * expected_fraction(9, TOTAL, WARMUP, 0.09, 0.1), rel=1e-6)
    old, no_share = tmp_path / "old", tmp_path / "no_share"
    shutil.copytree(run, old)
    shutil.copytree(run, no_share)
    del state["time_share"]  # as the version before time shares wrote it: p0 is the progress it saved
    save_checkpoint(state, no_share / "checkpoints" / "last.pt")
    del state["progress"]  # as an older version wrote it
    save_checkpoint({**state, "schedule": OLD_PLAN}, old / "checkpoints" / "last.pt")
    for folder, p0 in ((run, 0.1), (no_share, 0.1), (old, 10 / OLD_PLAN["decay_end"])):
        clock = StepClock(3.0, [2.0] * 1000)
        use_clock(monkeypatch, clock)
        with caplog.at_level("INFO", logger="simxent"):
            summary = pretrain(load_config(None, tiny(shapes, folder, "train.epochs=200", "train.max_time=23",
                                                      "optim.min_lr=0.1", "train.resume=auto")), progress=False)
        assert summary["global_step"] == 20 and summary["stopped_by_max_time"] and summary["schedule_progress"] == 1
        qs = [p0 + (1 - p0) * tau for tau in [0.0] + shares(clock.times, 0.0, 23)]
        lrs = logged_lrs(folder)
        expected = [PEAK * expected_fraction(10 + k, TOTAL, WARMUP, qs[k], 0.1) for k in range(10)]
        assert [lrs[10 + k] for k in range(10)] == pytest.approx(expected, rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_a_run_that_finished_its_epochs_within_the_budget_goes_on_when_given_more(shapes, tmp_path, monkeypatch):
    """Two epochs (10 steps of 1 s) done in a 101 s budget: p = 1 from the steps, but the budget used only
    q = 0.1. Resumed with train.epochs=4 it goes on from p0 = max(10 / 20, q) = 0.5 to its new deadline, instead
    of stopping at once as if its budget had run out (and saying so in summary.json)."""
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000))
    run = tmp_path / "run"
    done = pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "train.max_time=101")), progress=False)
    assert done["global_step"] == 10 and not done["stopped_by_max_time"] and done["schedule_progress"] == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["time_share"] == pytest.approx(0.1, rel=1e-6)
    # Stopped (SIGTERM) after one step of 40 s: p = 0.5 + 0.5 * 0.4 = 0.7, above s / S = 11 / 20; the time share
    # is the budgets' alone, q = 0.1 + 0.9 * 0.4 = 0.46 (p0 = 0.5 came from the steps).
    more = [*tiny(shapes, run, "train.epochs=4", "train.max_time=101", "train.resume=auto")]
    use_clock(monkeypatch, StepClock(1.0, [40.0] * 1000, stop_at(1)))
    cut = pretrain(load_config(None, more), progress=False)
    assert cut["global_step"] == 11 and cut["stopped_by_signal"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["progress"], state["time_share"]) == pytest.approx((0.7, 0.46), rel=1e-6)
    # Resumed as it was: from its own p0 = 0.7, the lr the stopped session would have set next (not from
    # max(s / S, q) = 0.55, a step back up the cosine).
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000))
    rest = pretrain(load_config(None, more), progress=False)
    assert rest["global_step"] == 20 and rest["epoch"] == 4 and not rest["stopped_by_max_time"]
    lrs = logged_lrs(run)
    assert lrs[10] == pytest.approx(PEAK * expected_fraction(10, 20, WARMUP, 0.5, 0.0), rel=1e-6)
    assert lrs[11] == pytest.approx(PEAK * expected_fraction(11, 20, WARMUP, 0.7, 0.0), rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_a_run_stopped_by_a_signal_at_its_last_step_ends_once_in_tensorboard(shapes, tmp_path, monkeypatch):
    """SIGTERM during the last step: the session writes the final scalars (not the projector); the resume,
    with nothing left to train, adds the projector's due only, no second final/loss at the same step."""
    run = tmp_path / "run"
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000, stop_at(5)))
    cut = pretrain(load_config(None, tiny(shapes, run, "train.epochs=1")), progress=False)
    assert cut["global_step"] == 5 and cut["stopped_by_signal"]
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000))
    again = pretrain(load_config(None, tiny(shapes, run, "train.epochs=1", "train.resume=auto")), progress=False)
    assert again["global_step"] == 5 and not again["stopped_by_signal"]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("final/loss")] == [5]


@pytest.mark.usefixtures("one_thread")
def test_budget_schedule_false_keeps_the_epoch_schedule(shapes, tmp_path):
    run = tmp_path / "run"
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=3", "train.max_time=600",
                                              "optim.warmup_epochs=1", "train.budget_schedule=false")), progress=False)
    assert summary["global_step"] == 15 and summary["schedule_progress"] == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"] == 1
    lrs = logged_lrs(run)
    assert [lrs[s] for s in range(15)] == pytest.approx([PEAK * lr_at(s, 15, 5, 1.0) for s in range(15)], rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_a_deadline_met_at_an_epochs_last_step_ends_that_epoch(shapes, tmp_path, monkeypatch):
    """Steps of 1 s, train.max_time=11: the deadline comes at step 10, the last of epoch 2. With two epochs
    the run is done, not stopped by its deadline; with four it stopped after two whole epochs."""
    for epochs, stopped in ((2, False), (4, True)):
        use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000))
        summary = pretrain(load_config(None, tiny(shapes, tmp_path / str(epochs), f"train.epochs={epochs}",
                                                  "train.max_time=11", "train.budget_schedule=false")),
                           progress=False)
        assert summary["global_step"] == 10 and summary["epoch"] == 2 and summary["epochs_trained"] == 2
        assert summary["stopped_by_max_time"] is stopped


def test_a_checkpoints_progress_is_kept_only_for_the_same_plan():
    """Saved p = 0.25 (step 5 of 20 of batch 8), time share q0 = 0.05. Resumed over the same 20 steps of 8: p
    goes on. Over 20 steps of 16 (train.epochs doubled with the batch: the same S, another plan), its step
    5 of 8 is step 2 of 16, so p0 = max(2 / 20, q0) = 0.1, not 0.25 (the lr ahead of the run)."""
    state = {"progress": 0.25, "time_share": 0.05, "schedule_steps": 20, "config": {"train": {"batch_size": 8}},
             "position": {"epoch": 0, "step": 5, "global_step": 5}}
    assert saved_progress(state, 20, 5, 8) == (0.25, 0.05)
    assert resumed_position(state, 16).step == 2
    assert saved_progress(state, 20, 2, 16) == (pytest.approx(0.1), 0.05)
    assert saved_progress(state, 40, 10, 8) == (pytest.approx(0.25), 0.05)  # train.epochs doubled alone


@pytest.mark.usefixtures("one_thread")
def test_a_skipped_step_advances_the_schedule_so_that_the_epochs_end_annealed(shapes, tmp_path, monkeypatch):
    """Batch 3 of 10 non-finite: fp32 skips its update (as fp16's grad scaler does), and the schedule still
    moves on a batch, so every applied batch b runs at the epoch schedule's lr(b) and the run ends annealed."""
    real, calls = simxent.train.step_loss, {"n": 0}

    def third_nan(*args):
        loss, z1, z2 = real(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), z1, z2

    monkeypatch.setattr(simxent.train, "step_loss", third_nan)
    run = tmp_path / "run"
    summary = pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "optim.warmup_epochs=1")),
                       progress=False)
    assert summary["skipped_steps"] == 1 and summary["global_step"] == 9 and summary["schedule_progress"] == 1
    lrs = logged_lrs(run)  # by applied step: batches 0, 1, 3, ..., 9
    applied = [0, 1, *range(3, 10)]
    assert [lrs[s] for s in range(9)] == pytest.approx([PEAK * lr_at(b, 10, 5, 1.0) for b in applied], rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_a_run_resumed_with_another_batch_size_goes_on_from_the_same_image_and_schedule_point(shapes, tmp_path,
                                                                                             monkeypatch, caplog):
    """80 images: stopped after 3 of 5 batches of 16 (48 images), resumed with batches of 8: the epoch goes on
    at batch 6 of 10 (image 48), the schedule at 6 of its 20 steps, and the run ends after the 14 batches left."""
    run = tmp_path / "run"
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000, stop_at(3)))
    cut = pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "optim.warmup_epochs=1")), progress=False)
    assert cut["global_step"] == 3 and cut["stopped_by_signal"]
    use_clock(monkeypatch, StepClock(1.0, [1.0] * 1000))
    rest = pretrain(load_config(None, tiny(shapes, run, "train.epochs=2", "optim.warmup_epochs=1",
                                           "train.batch_size=8", "train.resume=auto")), progress=False)
    assert "resumed with train.batch_size=8" in caplog.text
    assert "after 6 steps of 8 images of the first epoch" in caplog.text
    assert "schedule goes back" not in caplog.text  # the same point of its schedule
    assert rest["global_step"] == 3 + 14 and rest["epoch"] == 2 and rest["schedule_progress"] == 1
    lrs, peak = logged_lrs(run), 0.1 * 8 / 256
    assert [lrs[s] for s in range(3, 17)] == pytest.approx([peak * lr_at(b, 20, 10, 1.0) for b in range(6, 20)],
                                                           rel=1e-6)


def test_budget_script_splits_disjointly_and_applies_overrides_last(labelled_folder, tmp_path, load_script):
    script = load_script("budget_schedule")
    train, val = script.stratified_split(labelled_folder, tmp_path / "split", per_class=20, val_per_class=4)
    for cls in ("a", "b"):
        in_train = {p.resolve() for p in (train / cls).iterdir()}
        in_val = {p.resolve() for p in (val / cls).iterdir()}
        assert (len(in_train), len(in_val)) == (20, 4) and not in_train & in_val
    cfg = script.run_config(train, val, tmp_path / "run", 5, False, ["optim.min_lr=0.25", "eval.every=3"])
    assert (cfg.train.max_time, cfg.train.budget_schedule, cfg.optim.min_lr) == (300, False, 0.25)
    assert cfg.eval.every == 3  # after the script's own eval.every=1000


def test_budget_script_refuses_bad_arms_and_its_own_keys_and_names_folders_by_overrides(tmp_path, load_script):
    script = load_script("budget_schedule")
    assert script.parse_schedules("budget, epochs") == [True, False]
    assert script.parse_schedules("epochs") == [False]
    for bad in ("budget,budget", "budget,", "epoch"):
        with pytest.raises(ValueError, match="--schedules"):
            script.parse_schedules(bad)
    script.check_overrides(["optim.min_lr=0.25"])
    with pytest.raises(ValueError, match="train.budget_schedule"):
        script.check_overrides(["optim.lr=0.001", "train.budget_schedule=false"])
    plain = script.run_folder(tmp_path, 10, True)
    changed = script.run_folder(tmp_path, 10, True, ["optim.min_lr=0.25", "augment.crop_scale=[0.2,1.0]"])
    assert plain.name == "10min_budget" and changed.parent == tmp_path
    assert changed.name == "10min_budget_optim.min_lr=0.25_augment.crop_scale=-0.2,1.0-"


@pytest.mark.usefixtures("one_thread")
def test_a_run_resumed_in_its_warm_up_warms_up_on(shapes, tmp_path, monkeypatch):
    """20 epochs of 5 steps (S = 100, W = 50) in a 3600 s budget, stopped (SIGTERM) after 10 steps of 1 s: the
    saved progress 0.1 came from the steps, not the clock (10 s of 3600), so the resumed run goes on warming up
    at (s + 1) / W, as the uninterrupted run would, instead of jumping to the peak."""
    args = ("train.epochs=20", "train.max_time=3600")
    use_clock(monkeypatch, StepClock(0.0, [1.0] * 1000, stop_at(10)))
    run = tmp_path / "run"
    assert pretrain(load_config(None, tiny(shapes, run, *args)), progress=False)["global_step"] == 10
    use_clock(monkeypatch, StepClock(0.0, [1.0] * 1000, stop_at(3)))
    pretrain(load_config(None, tiny(shapes, run, *args, "train.resume=auto")), progress=False)
    lrs = logged_lrs(run)
    for s in (10, 11):  # q_t: the 10 s before and the clock since, a share of 3600 s far below 10 %
        assert lrs[s] == pytest.approx(PEAK * (s + 1) / 50 * (1 + math.cos(math.pi * s / 100)) / 2, rel=0.01)


def test_the_study_script_split_stays_disjoint_when_called_again_with_other_counts(tmp_path, load_script):
    """scripts/budget_schedule.py links a training subset and a validation split: a second call with more
    training images per class must not keep the first call's validation links beside them."""
    script = load_script("budget_schedule")
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(10):
            (data / cls / f"{i:02d}.png").write_bytes(b"x")
    out = tmp_path / "out"
    script.stratified_split(data, out, per_class=2, val_per_class=3)
    train, val = script.stratified_split(data, out, per_class=5, val_per_class=3)
    for cls in ("a", "b"):
        in_train = sorted(p.name for p in (train / cls).iterdir())
        in_val = sorted(p.name for p in (val / cls).iterdir())
        assert in_train == [f"{i:02d}.png" for i in range(5)] and in_val == [f"{i:02d}.png" for i in range(5, 8)]
