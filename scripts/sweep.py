#!/usr/bin/env python
"""Grid study over pretraining settings at equal wall time; see simxent/sweep.py."""
import argparse
import sys

from simxent.cli import report_user_errors
from simxent.linear_eval import ProbeOptions
from simxent.sweep import parse_grid, sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", help="base YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    p.add_argument("--grid", nargs="+", required=True, metavar="key=v1,v2", help="values to sweep")
    p.add_argument("--train", required=True, help="image folder for pretraining and the probe's training set")
    p.add_argument("--test", required=True, help="labelled test folder")
    p.add_argument("--minutes", type=float, default=2.0, help="pretraining wall time per run")
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_intermixed_args(argv)

    def run():
        rows = sweep(a.config, parse_grid(a.grid), a.train, a.test, a.out, a.minutes, a.overrides,
                     ProbeOptions(epochs=a.probe_epochs), progress=not a.no_progress)
        print((__import__("pathlib").Path(a.out) / "results.md").read_text())
        return 0 if rows else 1

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
