#!/usr/bin/env python
"""The schedule over the time budget against the schedule over train.epochs cut by the deadline.

A stratified subset of a labelled folder (``--per-class`` training images per class, and a validation
split of ``--val-per-class`` other images of the same folder) is linked under ``--out``; the ``cpu``
preset pretrains on it for each budget in ``--minutes`` and each arm in ``--schedules`` (``budget``:
``train.budget_schedule=true``, ``epochs``: false; default both), after the preset ``--overrides`` if given;
kNN top-1 of the validation split against the training subset is scored once, after the budget (the
evaluation is outside it). Writes ``results.json`` and prints a markdown table.

    python scripts/budget_schedule.py --data ../shared/data/cifar10/train --minutes 2,5,10 --out results/budget
"""
import argparse
import json
import re
from pathlib import Path

from simxent.config import load_config, parse_override
from simxent.train import pretrain


def stratified_split(data: Path, out: Path, per_class: int, val_per_class: int) -> tuple[Path, Path]:
    """Symbolic links to the first ``per_class`` images of every class folder (sorted names) under
    ``out/train`` and the next ``val_per_class`` under ``out/val``: disjoint, the same on every call."""
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        if len(files) < per_class + val_per_class:
            raise SystemExit(f"{cls}: {len(files)} images, fewer than {per_class} + {val_per_class}")
        for split, chosen in (("train", files[:per_class]), ("val", files[per_class:per_class + val_per_class])):
            folder = out / split / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            wanted = {f.name: f for f in chosen}
            for old in folder.iterdir():  # an earlier call's other counts: its images would overlap the other split
                if old.name not in wanted:
                    old.unlink()
            for name, f in wanted.items():
                if not (folder / name).exists():
                    (folder / name).symlink_to(f.resolve())
    return out / "train", out / "val"


ARMS = {"budget": True, "epochs": False}
SET_BY_THE_SCRIPT = {"data.train", "data.val", "out", "eval.projector", "eval.every", "train.max_time",
                     "train.budget_schedule"}


def parse_schedules(text: str) -> list[bool]:
    """``budget,epochs`` -> [True, False]: ``train.budget_schedule`` of each arm, in order."""
    names = [n.strip() for n in text.split(",")]
    bad = [repr(n) for n in names if n not in ARMS]
    if bad or len(set(names)) < len(names):
        raise ValueError(f"--schedules {text!r}: give budget and/or epochs, once each"
                         + (f" ({', '.join(bad)} is not one)" if bad else ""))
    return [ARMS[n] for n in names]


def check_overrides(overrides: list[str]) -> None:
    """The script's own keys set what a row says it measured: an override of them is refused."""
    taken = sorted({parse_override(o)[0] for o in overrides} & SET_BY_THE_SCRIPT)  # a malformed one: ConfigError
    if taken:
        raise ValueError(f"--overrides: {', '.join(taken)} is set by the script (use --minutes, --schedules, --out)")


def run_folder(out: Path, minutes: float, budget_schedule: bool, overrides=()) -> Path:
    """``5min_budget``, with the overrides in the name: runs with other overrides go to other folders."""
    name = f"{minutes:g}min_{'budget' if budget_schedule else 'epochs'}"
    return out / "_".join([name, *(re.sub(r"[^A-Za-z0-9._=,-]", "-", o) for o in overrides)])


def run_config(train: Path, val: Path, out: Path, minutes: float, budget_schedule: bool, overrides=()):
    """The ``cpu`` preset for one run: the split, the budget, the schedule, then ``overrides``."""
    return load_config("cpu", [f"data.train={train}", f"data.val={val}", f"out={out}", "eval.projector=0",
                               "eval.every=1000",  # kNN once, at the stop (after the budget), not every epoch
                               f"train.max_time={minutes * 60:g}",
                               f"train.budget_schedule={str(budget_schedule).lower()}", *overrides])


def run(train: Path, val: Path, out: Path, minutes: float, budget_schedule: bool, overrides=()) -> dict:
    summary = pretrain(run_config(train, val, out, minutes, budget_schedule, overrides), progress=False)
    scored = summary["knn_top1"]  # empty when the run was stopped before its kNN
    return {"minutes": minutes, "budget_schedule": budget_schedule, "overrides": list(overrides),
            "steps": summary["global_step"], "schedule_progress": summary["schedule_progress"],
            "knn_top1": scored[-1]["top1"] if scored else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10/train", help="labelled folder, one sub-folder per class")
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--val-per-class", type=int, default=200)
    p.add_argument("--minutes", default="2", help="budgets, comma-separated")
    p.add_argument("--schedules", default="budget,epochs", help="of budget,epochs: the arms to run")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--out", default="results/budget_schedule")
    a = p.parse_args()
    try:
        schedules = parse_schedules(a.schedules)
        check_overrides(a.overrides)
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    train, val = stratified_split(Path(a.data), out / "data", a.per_class, a.val_per_class)
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []  # an earlier command's rows stay
    for minutes in (float(m) for m in a.minutes.split(",")):
        for budget_schedule in schedules:
            rows.append(run(train, val, run_folder(out, minutes, budget_schedule, a.overrides), minutes,
                            budget_schedule, a.overrides))
            print(rows[-1], flush=True)
            results.write_text(json.dumps(rows, indent=2))
    print("| budget | schedule over | overrides | steps | progress at the stop | kNN top-1 |\n" + "|---" * 6 + "|")
    for r in rows:
        knn = "stopped" if r["knn_top1"] is None else f"{r['knn_top1']:.3f}"
        print(f"| {r['minutes']:g} min | {'the budget' if r['budget_schedule'] else 'train.epochs'} | "
              f"{' '.join(r.get('overrides', [])) or '-'} | {r['steps']} | {r['schedule_progress']:.2f} | {knn} |")


if __name__ == "__main__":
    main()
