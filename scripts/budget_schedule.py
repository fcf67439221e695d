#!/usr/bin/env python
"""The schedule over the time budget against the schedule over train.epochs cut by the deadline.

A stratified subset of a labelled folder (``--per-class`` training images per class, and a validation
split of ``--val-per-class`` other images of the same folder) is linked under ``--out``; the ``cpu``
preset pretrains on it for each budget in ``--minutes``, with ``train.budget_schedule`` true and false;
kNN top-1 of the validation split against the training subset is scored once, after the budget (the
evaluation is outside it). ``--schedules`` picks the arms, ``--overrides`` changes the preset for both.
Writes ``results.json`` and prints a markdown table.

    python scripts/budget_schedule.py --data ../shared/data/cifar10/train --minutes 2,5,10 --out results/budget
"""
import argparse
import json
from pathlib import Path

from simxent.config import load_config
from simxent.train import pretrain


def stratified_split(data: Path, out: Path, per_class: int, val_per_class: int) -> tuple[Path, Path]:
    """Symbolic links to the first ``per_class`` images of every class folder (sorted names) under
    ``out/train`` and the next ``val_per_class`` under ``out/val``: disjoint, the same on every call."""
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        if len(files) < per_class + val_per_class:
            raise SystemExit(f"{cls}: {len(files)} images, fewer than {per_class} + {val_per_class}")
        for split, chosen in (("train", files[:per_class]), ("val", files[per_class:per_class + val_per_class])):
            (out / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                link = out / split / cls.name / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return out / "train", out / "val"


def run_config(train: Path, val: Path, out: Path, minutes: float, budget_schedule: bool, overrides=()):
    """The ``cpu`` preset for one run: the split, the budget, the schedule, then ``overrides``."""
    return load_config("cpu", [f"data.train={train}", f"data.val={val}", f"out={out}", "eval.projector=0",
                               "eval.every=1000",  # kNN once, at the stop (after the budget), not every epoch
                               f"train.max_time={minutes * 60:g}",
                               f"train.budget_schedule={str(budget_schedule).lower()}", *overrides])


def run(train: Path, val: Path, out: Path, minutes: float, budget_schedule: bool, overrides=()) -> dict:
    summary = pretrain(run_config(train, val, out, minutes, budget_schedule, overrides), progress=False)
    return {"minutes": minutes, "budget_schedule": budget_schedule, "overrides": list(overrides),
            "steps": summary["global_step"],
            "schedule_progress": summary["schedule_progress"], "knn_top1": summary["knn_top1"][-1]["top1"]}


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
    arms = {"budget": True, "epochs": False}
    unknown = sorted(set(a.schedules.split(",")) - set(arms))
    if unknown:
        p.error(f"--schedules: {', '.join(unknown)} not among budget, epochs")
    schedules = [arms[s] for s in a.schedules.split(",")]
    out = Path(a.out)
    train, val = stratified_split(Path(a.data), out / "data", a.per_class, a.val_per_class)
    rows = []
    for minutes in (float(m) for m in a.minutes.split(",")):
        for budget_schedule in schedules:
            rows.append(run(train, val, out / f"{minutes:g}min_{'budget' if budget_schedule else 'epochs'}",
                            minutes, budget_schedule, a.overrides))
            print(rows[-1], flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("| budget | schedule over | steps | progress at the stop | kNN top-1 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']:g} min | {'the budget' if r['budget_schedule'] else 'train.epochs'} | {r['steps']} | "
              f"{r['schedule_progress']:.2f} | {r['knn_top1']:.3f} |")


if __name__ == "__main__":
    main()
