"""The ``lightly`` section of scripts/benchmark.py: simxent's ``cpu`` preset beside lightly's standard SimCLR
pipeline (scripts/lightly_peer.py) on the same model, at equal wall time or at equal epochs, every encoder
scored by the same kNN and linear probe (:func:`simxent.linear_eval`).

lightly runs in its own virtual environment, which sees this interpreter's packages through a ``.pth`` file
(the same torch and torchvision builds) and adds only lightly and its small dependencies: simxent never
depends on it. The two trainings run one after the other, never at once.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LIGHTLY_VERSION = "1.6.0"
DEFAULT_VENV = Path.home() / ".cache" / "simxent" / "lightly-venv"
REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "scripts" / "lightly_peer.py"
SIDES = ("lightly", "simxent")


@dataclass
class Versus:
    """What to compare: ``minutes`` marks (equal wall time), or ``epochs`` > 0 (equal epochs, no time limit)."""

    data: Path  # holds train/ and test/, one sub-folder per class
    work: Path  # run folders, snapshots, evaluations, details.json
    image_size: int = 32
    minutes: tuple[float, ...] = (2, 5, 10, 30)
    epochs: int = 0
    venv: Path = DEFAULT_VENV
    simxent_overrides: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return "epoch" if self.epochs else "minutes"


# --- lightly's environment and run ------------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_lightly(python: Path) -> bool:
    """Whether ``python`` imports lightly at LIGHTLY_VERSION."""
    check = f"import lightly, sys; sys.exit(lightly.__version__ != {LIGHTLY_VERSION!r})"
    return python.is_file() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def lightly_python(venv: Path) -> Path:
    """The venv's Python, made when it lacks lightly: ``python -m venv``, a ``.pth`` file adding this
    interpreter's site-packages (so lightly runs on the very same torch and torchvision), then ``pip install
    lightly==LIGHTLY_VERSION``, which then installs only lightly's own small dependencies."""
    python = venv_python(venv)
    if has_lightly(python):
        return python
    print(f"making {venv} with lightly=={LIGHTLY_VERSION} (about a minute)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "simxent_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"lightly=={LIGHTLY_VERSION}"], check=True)
    return python


def run_lightly(python: Path, v: Versus) -> list[dict]:
    """lightly_peer.py in a subprocess (output in WORK/lightly/log.txt); its snapshots as points
    {mark, step, epochs, seconds, images_per_s, checkpoint}, one per minute mark or per epoch."""
    out = v.work / "lightly"
    out.mkdir(parents=True, exist_ok=True)
    limit = ["--epochs", str(v.epochs)] if v.epochs else ["--minutes", f"{max(v.minutes):g}",
                                                           "--marks", ",".join(f"{m:g}" for m in v.minutes)]
    command = [str(python), str(PEER), "--train", str(v.data / "train"), "--out", str(out),
               "--image-size", str(v.image_size), *limit]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode:
        tail = (out / "log.txt").read_text()[-2000:]
        raise RuntimeError(f"lightly_peer.py failed (exit {done.returncode}); {out / 'log.txt'} ends:\n{tail}")
    return peer_points(json.loads((out / "progress.json").read_text()), out, v.key)


def peer_points(progress: dict, out: Path, key: str) -> list[dict]:
    """lightly_peer.py's progress.json as points: its minute marks (``key`` "minutes") or epochs ("epoch")."""
    entries = progress["marks"] if key == "minutes" else progress["epochs"]
    return [{"mark": e["minutes"] if key == "minutes" else round(e["epoch"]), "step": e["step"],
             "epochs": e["epoch"], "seconds": e["seconds"], "images_per_s": e["images_per_s"],
             "checkpoint": out / e["file"]} for e in entries]


# --- simxent's runs ----------------------------------------------------------------------------------------------

def simxent_config(v: Versus, out: Path, minutes: Optional[float] = None):
    """The cpu preset on WORK's data at ``v.image_size``: for ``minutes``, its time-budget schedule over
    minutes x 60 s (epochs never the limit); else ``v.epochs`` epochs, every epoch-end checkpoint kept.
    ``v.simxent_overrides`` come last, so they can change any of it."""
    from simxent.config import load_config

    # A cache of its own: the run decodes its folder inside its time, as lightly's workers decode inside theirs.
    common = [f"data.train={v.data / 'train'}", f"data.image_size={v.image_size}", f"out={out}", "eval.every=0",
              "train.overwrite=true", f"data.cache_dir={out.with_name(out.name + '-cache')}"]
    if minutes is not None:
        common += [f"train.max_time={60 * minutes:g}", "train.budget_schedule=true", "train.epochs=100000"]
    else:
        common += [f"train.epochs={v.epochs}", "train.max_time=0", "train.checkpoint_every=0",
                   f"train.keep_checkpoints={v.epochs}"]
    return load_config("cpu", common + list(v.simxent_overrides))


def training_images(cfg) -> int:
    """The images in the training folder, from the decoded cache the run left behind."""
    from simxent.data import load_configured

    return len(load_configured(cfg.data.train, cfg.data, progress=False))


def run_simxent_marks(v: Versus) -> list[dict]:
    """One simxent run per minute mark, each with its own time budget; a point per run."""
    from simxent.train import pretrain

    points = []
    for minutes in v.minutes:
        cfg = simxent_config(v, v.work / f"simxent-{minutes:g}min", minutes)
        shutil.rmtree(cfg.data.cache_dir, ignore_errors=True)  # a rerun decodes inside its time again
        summary = pretrain(cfg, progress=False)
        per_epoch = training_images(cfg) // cfg.train.batch_size
        step, seconds = summary["global_step"], summary["seconds"]
        points.append({"mark": minutes, "step": step, "epochs": step / per_epoch, "seconds": seconds,
                       "images_per_s": step * cfg.train.batch_size / seconds,
                       "checkpoint": Path(summary["checkpoint"])})
        print({"simxent_minutes": minutes, "steps": step, "seconds": round(seconds, 1)}, flush=True)
    return points


def run_simxent_epochs(v: Versus) -> list[dict]:
    """One simxent run of ``v.epochs`` epochs; a point per epoch-end checkpoint. Its seconds are the
    checkpoint file's modification time less the run's start (both wall-clock)."""
    import time

    from simxent.checkpoint import step_files
    from simxent.train import pretrain

    cfg = simxent_config(v, v.work / f"simxent-{v.epochs}epochs")
    shutil.rmtree(cfg.data.cache_dir, ignore_errors=True)
    started = time.time()
    summary = pretrain(cfg, progress=False)
    per_epoch = training_images(cfg) // cfg.train.batch_size
    points = []
    for epoch, path in enumerate(step_files(Path(summary["checkpoint"]).parent, summary["run_id"]), 1):
        step, seconds = int(path.name.split("-")[1]), path.stat().st_mtime - started  # step-<step>-<run id>.pt
        points.append({"mark": epoch, "step": step, "epochs": step / per_epoch, "seconds": seconds,
                       "images_per_s": step * cfg.train.batch_size / seconds, "checkpoint": path})
    return points


# --- scoring and the table ----------------------------------------------------------------------------------------

def score(checkpoint: Path, v: Versus, plain: bool) -> dict:
    """kNN (k 200, T 0.1; bank: the train folder, queries: the test folder) and linear-probe top-1 of an
    encoder: a plain state dict of the cpu preset's encoder (lightly's snapshots, of
    ``lightly_peer.cpu_preset_model``) or a simxent checkpoint; the same :func:`simxent.linear_eval` for both."""
    from simxent.config import load_config
    from simxent.linear_eval import ProbeOptions, linear_eval

    name = load_config("cpu").model.backbone if plain else None  # a simxent checkpoint names its own
    with tempfile.TemporaryDirectory() as out:
        r = linear_eval(checkpoint, v.data / "train", v.data / "test", ProbeOptions(knn_k=200, knn_temperature=0.1),
                        out=out, progress=False, image_size=v.image_size, backbone_name=name)
    return {"knn_top1": r["pretrained"]["knn"]["top1"], "linear_top1": r["pretrained"]["linear"]["top1"]}


def versus_rows(points: dict, scores: dict, key: str) -> list[dict]:
    """One row per mark (or epoch) that both sides reached: for each side images/s, epochs, kNN and linear
    top-1. ``points`` and ``scores``: per side, lists in mark order (scores[side][i] scores points[side][i])."""
    by_side = {side: {p["mark"]: (p, s) for p, s in zip(points[side], scores[side])} for side in SIDES}
    rows = []
    for mark in sorted(set(by_side["lightly"]) & set(by_side["simxent"])):
        row = {key: mark}
        for side in SIDES:
            p, s = by_side[side][mark]
            row |= {f"{side}_images_per_s": p["images_per_s"], f"{side}_epochs": p["epochs"],
                    f"{side}_knn_top1": s["knn_top1"], f"{side}_linear_top1": s["linear_top1"]}
        rows.append(row)
    return rows


def first_reaching(rows: list[dict]) -> dict:
    """Per side, the first mark (or epoch) whose kNN top-1 is at least lightly's at the last row; None
    where it never is. ``target``: that kNN top-1."""
    key = next(iter(rows[0]))
    target = rows[-1]["lightly_knn_top1"]
    first = {side: next((r[key] for r in rows if r[f"{side}_knn_top1"] >= target), None) for side in SIDES}
    return {"key": key, "target": target, "at": rows[-1][key], **first}


def reaching_line(rows: list[dict]) -> str:
    """The table's last line: where each side first reaches lightly's kNN top-1 at the longest mark."""
    if not rows:
        return "No mark was reached by both sides."
    r = first_reaching(rows)

    def when(mark):
        return f"{mark:g} min" if r["key"] == "minutes" else f"epoch {mark:g}"

    said = {side: when(r[side]) if r[side] is not None else "not reached" for side in SIDES}
    return (f"First {'mark' if r['key'] == 'minutes' else 'epoch'} reaching lightly's kNN top-1 at {when(r['at'])} "
            f"({r['target']:.4f}): lightly {said['lightly']}, simxent {said['simxent']}.")


def bench_lightly(v: Versus) -> list[dict]:
    """Train lightly, then simxent, then score every encoder; the table's rows. Every point and score is also
    written to WORK/details.json."""
    v.work.mkdir(parents=True, exist_ok=True)
    points = {"lightly": run_lightly(lightly_python(v.venv), v),
              "simxent": run_simxent_epochs(v) if v.epochs else run_simxent_marks(v)}
    scores = {side: [score(p["checkpoint"], v, plain=side == "lightly") for p in points[side]] for side in SIDES}
    details = {side: [{**p, "checkpoint": str(p["checkpoint"]), **s} for p, s in zip(points[side], scores[side])]
               for side in SIDES}
    details["settings"] = {"data": str(v.data), "image_size": v.image_size, "minutes": v.minutes, "epochs": v.epochs,
                           "lightly": LIGHTLY_VERSION, "simxent_overrides": v.simxent_overrides}
    (v.work / "details.json").write_text(json.dumps(details, indent=2))
    rows = versus_rows(points, scores, v.key)
    for row in rows:
        print(row, flush=True)
    print(reaching_line(rows), flush=True)
    return rows
