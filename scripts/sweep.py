#!/usr/bin/env python
"""Grid study over pretraining settings: choose on a validation split of --train, score --test once for the
chosen setting; see simxent/sweep.py."""
import argparse
import sys
from pathlib import Path

from simxent.cli import report_user_errors, show
from simxent.linear_eval import ProbeOptions
from simxent.sweep import METRICS, SweepOptions, parse_grid, sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", help="base YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    p.add_argument("--grid", nargs="+", required=True, metavar="key=v1,v2", help="values to sweep")
    p.add_argument("--train", required=True, help="labelled training folder; the validation split is carved from it")
    p.add_argument("--test", required=True, help="labelled test folder, scored only for the chosen setting")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out for validation")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--subset", type=int, default=0, help="first take a stratified subset of this many images")
    p.add_argument("--seeds", type=int, default=1, help="runs per setting (train.seed 0, 1, ...)")
    p.add_argument("--choose-by", choices=METRICS, default="knn_top1", help="validation score to maximise")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="equal wall time per run; 0 (default): equal steps, train.epochs of the train part")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="vary one key at a time from the base (each key's first value) instead of the product")
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_intermixed_args(argv)
    if a.probe_epochs < 1:
        p.error(f"--probe-epochs must be at least 1, got {a.probe_epochs}")
    opts = SweepOptions(minutes=a.minutes, seeds=a.seeds, val_fraction=a.val_fraction, split_seed=a.split_seed,
                        subset=a.subset, choose_by=a.choose_by,
                        one_at_a_time=a.one_at_a_time)

    def run():
        sweep(a.config, parse_grid(a.grid), a.train, a.test, a.out, opts, a.overrides,
              ProbeOptions(epochs=a.probe_epochs), progress=not a.no_progress)
        show((Path(a.out) / "results.md").read_text())
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
