"""Grid studies: one normal run directory per combination, then a results table, JSON, TensorBoard hparams
and a plot of kNN and probe accuracy against each swept value (``sweep.png``).

    python scripts/sweep.py cpu --grid loss.temperature=0.05,0.1,0.2,0.5,1.0 \\
        --train ../shared/data/cifar10/train --test ../shared/data/cifar10/test --minutes 2 --out runs/sweep

Every run gets the same wall time (``--minutes``, i.e. ``train.max_time``) unless the grid or the overrides set
epochs instead, so the table compares settings at equal cost.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from . import figures
from .config import ConfigError, load_config, parse_override
from .linear_eval import ProbeOptions, linear_eval
from .train import pretrain


def split_values(raw: str) -> list[str]:
    """Split ``v1,v2,...`` at the commas outside brackets, so list values such as ``[0.2,1.0]`` stay whole."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(raw + ","):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    return [v for v in values if v.strip()]


def parse_grid(specs: list[str]) -> dict[str, list]:
    """``key=v1,v2,...`` -> {key: [v1, v2, ...]}, each value read as YAML like any override."""
    grid = {}
    for spec in specs:
        key, raw = spec.split("=", 1) if "=" in spec else (spec, "")
        values = [parse_override(f"{key}={v}")[1] for v in split_values(raw)]
        if not values:
            raise ConfigError(f"--grid {spec!r}: expected key=value1,value2,...")
        grid[key.strip()] = values
    return grid


def label(value):
    """A swept value as tables, TensorBoard's hparams and plots take it: scalars as they are, lists as text."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value, separators=(",", ":"))


def run_name(combo: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}={label(v)}" for k, v in combo.items())


def sweep(config: str | None, grid: dict[str, list], train_dir: str, test_dir: str, out: str | Path,
          minutes: float, overrides: list[str] = (), probe: ProbeOptions = ProbeOptions(), progress: bool = True) -> list[dict]:
    """Run every combination of ``grid``; returns one row per run (also in OUT/results.json and .md)."""
    out = Path(out)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    runs = []
    for combo in combos:  # check every config before the first run starts
        extra = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in combo.items()]  # text verbatim
        cfg = load_config(config, [f"data.train={train_dir}", f"train.max_time={minutes * 60}", "eval.every=0",
                                   *overrides, *extra, f"out={out / run_name(combo)}"])
        runs.append((combo, cfg))
    rows = []
    writer = SummaryWriter(str(out / "hparams"))
    for combo, cfg in runs:
        summary = pretrain(cfg, progress=progress)
        results = linear_eval(Path(cfg.out) / "checkpoints" / "last.pt", train_dir, test_dir, probe,
                              json_path=Path(cfg.out) / "linear_eval.json", progress=progress)
        shown = {k: label(v) for k, v in combo.items()}
        row = {**shown, "steps": summary["global_step"], "final_loss": summary["last_loss"],
               "knn_top1": results["pretrained"]["knn"]["top1"], "linear_top1": results["pretrained"]["linear"]["top1"],
               "run": cfg.out}
        rows.append(row)
        writer.add_hparams(shown,
                           {"hparam/knn_top1": row["knn_top1"], "hparam/linear_top1": row["linear_top1"]},
                           run_name=run_name(combo))
        write_tables(rows, out)  # after every run, so a stopped sweep keeps what it measured
        figures.save(figures.sweep_plots(rows, list(grid)), out / "sweep.png")
    writer.close()
    return rows


def write_tables(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    keys = [k for k in rows[0] if k != "run"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
