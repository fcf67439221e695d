"""Grid studies that choose on a validation split and report the test split once.

    python scripts/sweep.py cpu train.epochs=2 --grid loss.temperature=0.1,0.2,0.5 --seeds 2 \\
        --train ../shared/data/cifar10/train --test ../shared/data/cifar10/test --val-fraction 0.1 --out runs/sweep

The training folder is split once, stratified by class and seeded (``--split-seed``), into a train part and a
validation part, written as folders of symbolic links under ``OUT/split/`` (no image is copied). Every
combination of the grid (or, ``one_at_a_time``, the first values and each other value of one key alone) is
pretrained ``--seeds`` times (``train.seed`` = 0, 1, ...) on the train part only,
and scored by kNN and a linear probe fitted on the train part and measured on the validation part. The setting
with the best mean validation score (``--choose-by``) is chosen, and only its runs are then scored on the test
folder. Outputs: a normal run directory per run, ``results.md``, ``results.json``, TensorBoard hparams and
``sweep.png`` (validation accuracy against each swept value, averaged over seeds and the other keys).

Every run gets the same step budget (the config's ``train.epochs`` over the same train part), or the same wall
time with ``minutes`` > 0 (``train.max_time``); equal steps are the fair budget on a shared machine. A sweep
into the OUT of an earlier one with ``train.resume=auto`` reuses its finished runs and trains the rest; a run
whose checkpoint was trained with other settings is refused (:func:`check_resumed_settings`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from . import figures
from .checkpoint import CheckpointError, changed_settings, last_in_folder, load_checkpoint
from .config import ConfigError, load_config, parse_override
from .data import DataError, find_images, naming_the_key, shared_files
from .files import write_text_atomic
from .evaluate import ProbeDivergedError
from .linear_eval import ProbeOptions, check_probe_options, check_same_classes, linear_eval
from .rundir import has_checkpoints, holds_run
from .train import TrainingError, pretrain

log = logging.getLogger("simxent")

METRICS = ("knn_top1", "linear_top1")


@dataclass
class SweepOptions:
    minutes: float = 0.0  # wall time per run; 0: the config's train.epochs is the budget (equal steps)
    seeds: int = 1  # runs per setting, train.seed = 0 .. seeds - 1
    val_fraction: float = 0.1  # of the (subset of the) training folder, per class
    split_seed: int = 0  # the same split for every run, so settings are compared on the same images
    subset: int = 0  # use a stratified subset of this many training images first; 0: all
    choose_by: str = "knn_top1"  # knn_top1 | linear_top1, mean over seeds on the validation part
    one_at_a_time: bool = False  # each key's other values alone, the rest at their first values; else the product

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        if self.subset < 0 or self.minutes < 0:
            raise ConfigError("--subset and --minutes must be >= 0")
        if self.choose_by not in METRICS:
            raise ConfigError(f"--choose-by must be one of {', '.join(METRICS)}, got {self.choose_by!r}")


def allocate(counts: list[int], total: int) -> list[int]:
    """Share ``total`` images among classes of sizes ``counts`` in proportion (largest remainder).

    Class c gets floor(total * n_c / N), and the images still unassigned go to the classes with the largest
    remainders, so every share is within one image of its exact value total * n_c / N and they sum to total.
    """
    n = sum(counts)
    shares = [total * c // n for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(total * counts[i] % n), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def stratified_split(labels: list[int], val_fraction: float, seed: int, subset: int = 0) -> tuple[list, list]:
    """Sorted indices of a train part and a validation part of images with these class labels.

    Each class's images are shuffled by one generator seeded with ``seed``. With ``subset`` > 0 the first
    allocate(counts, subset) of each class are kept, else all; the validation part takes the first
    allocate(kept, round(val_fraction * kept images)) of each class's kept images, the train part the rest.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in sorted(set(labels.tolist()))]
    kept = allocate([len(m) for m in members], subset) if subset else [len(m) for m in members]
    n_val = allocate(kept, round(val_fraction * sum(kept)))
    train = sorted(int(i) for m, k, v in zip(members, kept, n_val) for i in m[v:k])
    val = sorted(int(i) for m, v in zip(members, n_val) for i in m[:v])
    return train, val


def link_files(root: Path, files: list[Path], dest: Path) -> None:
    """``dest/<path relative to root>``: a symbolic link to each file's real path, so no image is copied."""
    if dest.exists():
        shutil.rmtree(dest)  # removes the links, never what they point to
    for f in files:
        link = dest / f.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.realpath(f), link)


def carve_validation(train_dir: str | Path, dest: str | Path, opts: SweepOptions, runs: list[Path] = (),
                     test_dir: str | Path | None = None) -> dict:
    """Split the labelled ``train_dir`` into DEST/train and DEST/val (see :func:`stratified_split`); the
    counts per class go to DEST/split.json and are returned. A split other than the one DEST holds is refused
    before DEST is touched while ``runs`` (the sweep's run folders) hold checkpoints: :func:`check_same_split`.
    ``test_dir``, scored after all the training, is checked first: it must hold the same classes."""
    with naming_the_key("--train"):
        found = find_images(train_dir)
    if not found.labelled:
        raise DataError(f"--train: {train_dir}: a validation split is carved by class, so it needs one "
                        f"sub-folder per class with every image inside one")
    if test_dir is not None:
        with naming_the_key("--test"):
            test = find_images(test_dir)
        check_same_classes(found, test, train_dir, test_dir)
        shared = shared_files(test, found)
        if shared.any():  # the test scores would be training scores; said before anything trains
            raise ConfigError(f"--test {test_dir} shares {int(shared.sum())} of its {len(test.files)} images with "
                              f"--train {train_dir} (e.g. {test.files[int(shared.nonzero()[0, 0])]}): give a held-out "
                              f"test folder")
    if opts.subset > len(found.files):
        raise ConfigError(f"--subset {opts.subset} is more than the {len(found.files)} images of {train_dir}")
    if 0 < opts.subset < 2 * len(found.classes):
        raise ConfigError(f"--subset {opts.subset} leaves fewer than two images for each of the {len(found.classes)} "
                          f"classes of {train_dir} (one for the train part, one for validation)")
    parts = dict(zip(("train", "val"), stratified_split(found.labels, opts.val_fraction, opts.split_seed,
                                                         opts.subset)))
    counts = {name: [0] * len(found.classes) for name in parts}
    for name, part in parts.items():
        for i in part:
            counts[name][found.labels[i]] += 1
        if 0 in counts[name]:
            missing = found.classes[counts[name].index(0)]
            raise ConfigError(f"--val-fraction {opts.val_fraction:g}: the {name} part of {train_dir} would have no "
                              f"image of class {missing!r}; use a fraction that leaves each class both parts")
    dest = Path(dest)
    # Names inside the folder: the same split whether the folder is given relative, absolute or by a link.
    members = "\n".join(f"{name}\t{found.files[i].relative_to(found.root).as_posix()}"
                        for name, part in parts.items() for i in part)
    split = {"train_dir": str(train_dir), "train_real": os.path.realpath(train_dir),
             "val_fraction": opts.val_fraction, "split_seed": opts.split_seed,
             "subset": opts.subset, "classes": found.classes, "train_per_class": counts["train"],
             "val_per_class": counts["val"], "train_images": len(parts["train"]), "val_images": len(parts["val"]),
             "parts_digest": hashlib.blake2b(os.fsencode(members), digest_size=16).hexdigest()}
    check_same_split(read_split(dest), split, dest.parent, runs)
    for name, part in parts.items():
        link_files(found.root, [found.files[i] for i in part], dest / name)
    write_text_atomic(dest / "split.json", json.dumps(split, indent=2))
    return split


def read_split(dest: Path) -> dict | None:
    """DEST/split.json of an earlier sweep into the same out, or None."""
    try:
        return json.loads((dest / "split.json").read_text())
    except (OSError, ValueError):
        return None


def check_same_split(earlier: dict | None, split: dict, out: Path, runs: list[Path]) -> None:
    """Refuse a sweep run again into its out with another split, or a split of another folder (its real
    path), while runs of the earlier one are there: a run resumed there was trained on the earlier train
    part, so its validation scores would count images it trained on, or scores of other images. A
    split.json written before the digest compares by its options and counts."""
    if earlier is None or not any(has_checkpoints(run) for run in runs):
        return
    if earlier.get("train_real", split["train_real"]) != split["train_real"]:  # the same names, other images
        raise ConfigError(f"--out {out} holds runs trained on a split of {earlier['train_real']}, not of this "
                          f"--train ({split['train_real']}): give that folder again, or another --out")
    keys = ("parts_digest",) if "parts_digest" in earlier else \
        ("val_fraction", "split_seed", "subset", "train_images", "val_images")
    if any(earlier.get(k) != split[k] for k in keys):
        raise ConfigError(f"--out {out} holds runs trained on another split of "
                          f"{earlier.get('train_dir')} (validation fraction {earlier.get('val_fraction')}, split seed "
                          f"{earlier.get('split_seed')}, subset {earlier.get('subset')}, "
                          f"{earlier.get('train_images')} train images); their scores would count validation images "
                          f"they trained on: give that split's options again, or another --out")


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
    """``key=v1,v2,...`` -> {key: [v1, v2, ...]}, each value read as YAML like any override; a key or a value
    given twice is refused (each setting trains into a folder of its own)."""
    grid = {}
    for spec in specs:
        key, raw = spec.split("=", 1) if "=" in spec else (spec, "")
        values = [parse_override(f"{key}={v}")[1] for v in split_values(raw)]
        if not values:
            raise ConfigError(f"--grid {spec!r}: expected key=value1,value2,...")
        # Compared as numbers: 0.5 and 0.50, or [0.2,1] and [0.2,1.0], are one setting trained twice.
        same = [json.dumps(json.loads(json.dumps(v), parse_int=float), sort_keys=True) for v in values]
        twice = [label(v) for i, v in enumerate(values) if same[i] in same[:i]]
        if twice or key.strip() in grid:
            what = f"value {twice[0]} given twice" if twice else "the key given twice"
            raise ConfigError(f"--grid {key.strip()}: {what} (each setting is one run)")
        grid[key.strip()] = values
    return grid


def label(value):
    """A swept value as tables, TensorBoard's hparams and plots take it: scalars as they are, lists as text."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value, separators=(",", ":"))


def run_name(combo: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}={label(v)}" for k, v in combo.items())


def combinations(grid: dict[str, list], one_at_a_time: bool = False) -> list[dict]:
    """The settings a grid asks for: every combination of its values or, one at a time, the base (each key's
    first value) and then each other value of one key with the rest at the base, as an ablation varies one
    thing from a fixed recipe: 1 + sum(len(values) - 1) settings instead of prod(len(values))."""
    if not one_at_a_time:
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    base = {k: values[0] for k, values in grid.items()}
    return [base] + [{**base, k: v} for k, values in grid.items() for v in values[1:]]


# What the sweep sets in every run itself: given as an override or a grid key, data.train would put the
# validation images into pretraining, train.seed would make a setting's seeds one run repeated (an override
# would be ignored), and train.max_time would cut the runs of an equal-steps budget.
SWEEP_SETS = {"data.train": "--train", "out": "--out", "train.seed": "--seeds", "train.max_time": "--minutes"}
RUN_CONTROL = ("train.resume", "train.overwrite")


def check_sweep_keys(overrides, grid: dict[str, list], seeds: int) -> None:
    """Refuse an override or a grid key that sets what the sweep sets (:data:`SWEEP_SETS`), naming the option
    that does; a train.seed grid stays allowed with one seed per setting (it then names each run's seed)."""
    given = [(o.split("=", 1)[0].strip(), "an override") for o in overrides if "=" in o]
    for key, where in given + [(k, "--grid") for k in grid]:
        if key in SWEEP_SETS and not (key == "train.seed" and where == "--grid" and seeds == 1):
            raise ConfigError(f"{key} ({where}): the sweep sets it in every run; use {SWEEP_SETS[key]}")
        if key in RUN_CONTROL and where == "--grid":  # an override written after --grid's values lands there
            raise ConfigError(f"--grid {key}: it says how runs start, not what they learn; give it as an override, "
                              f"before --grid (key=value after --grid is read as one more grid key)")
    resume = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "train.resume"]
    if resume and resume[-1] not in ("", "auto"):
        raise ConfigError(f"train.resume={resume[-1]}: a sweep resumes each run from its own folder; give "
                          f"train.resume=auto")


def plan_runs(config: str | None, grid: dict[str, list], out: Path, opts: SweepOptions, overrides) -> list:
    """``(combo, seed, config)`` for every setting and seed, each pretraining on OUT/split/train; every
    config is built (and so checked) before the first run starts."""
    check_sweep_keys(overrides, grid, opts.seeds)
    runs = []
    for combo in combinations(grid, opts.one_at_a_time):
        extra = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in combo.items()]  # text verbatim
        for seed in range(opts.seeds):
            cfg = load_config(config, [f"data.train={out / 'split' / 'train'}", f"train.max_time={opts.minutes * 60}",
                                       "eval.every=0", *overrides, f"train.seed={seed}", *extra,
                                       f"out={out / run_name(combo) / f'seed={seed}'}"])
            runs.append((combo, seed, cfg))
    return runs


def evaluate_run(cfg, train_dir: Path, eval_dir: str | Path, probe: ProbeOptions, name: str,
                 progress: bool) -> dict:
    """kNN and linear-probe top-1 of the frozen encoder of the run ``cfg`` configures, fitted on ``train_dir``,
    measured on ``eval_dir`` (details in RUN/<name>_eval.json and RUN/<name>_eval/), decoded as the run's
    config says (its cache folder, workers, device and evaluation crop)."""
    run, data = Path(cfg.out), cfg.data
    results = linear_eval(run / "checkpoints" / "last.pt", train_dir, eval_dir, probe, out=run / f"{name}_eval",
                          json_path=run / f"{name}_eval.json", progress=progress, device=cfg.train.device,
                          workers=data.workers, cache=data.cache, cache_dir=data.cache_dir or None,
                          crop_ratio=cfg.eval.crop_ratio)
    return {"knn_top1": results["pretrained"]["knn"]["top1"], "linear_top1": results["pretrained"]["linear"]["top1"]}


def summarise(rows: list[dict], keys: list[str]) -> list[dict]:
    """One row per setting: mean and standard deviation (n - 1) over its seeds of each validation score (None,
    shown as "-", for one seed: a spread needs two)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    settings = []
    for values, runs in groups.items():
        row = {**dict(zip(keys, values)), "seeds": len(runs)}
        whole = not any(r.get("diverged") for r in runs)  # a setting a seed of which diverged has no mean
        for m in METRICS:
            scores = [r[f"val_{m}"] for r in runs]
            row[f"val_{m}_mean"] = statistics.fmean(scores) if whole else None
            row[f"val_{m}_sd"] = statistics.stdev(scores) if whole and len(scores) > 1 else None
        settings.append(row)
    return settings


def choose(settings: list[dict], choose_by: str) -> dict:
    """The setting with the best mean validation score (the first in grid order on a tie).

    With several seeds, settings whose mean is within 2 * s * sqrt(2 / n) of the chosen one are marked
    ``within_noise`` (s: the seed-to-seed standard deviation pooled over settings, n: seeds per setting; about
    two standard errors of a difference of two means)."""
    key = f"val_{choose_by}_mean"
    scored = [s for s in settings if s[key] is not None]
    if not scored:
        raise TrainingError("every setting of the sweep diverged (see the warnings above): nothing to choose")
    best = max(scored, key=lambda s: s[key])
    n = best["seeds"]
    margin = None
    if n > 1:
        spreads = [s[f"val_{choose_by}_sd"] for s in settings if s[f"val_{choose_by}_sd"] is not None]
        pooled = math.sqrt(statistics.fmean(sd**2 for sd in spreads))
        margin = 2 * pooled * math.sqrt(2 / n)
    for s in settings:
        s["within_noise"] = None if margin is None or s[key] is None else best[key] - s[key] <= margin
    return {"setting": best, "criterion": f"mean validation {choose_by} over {n} seed(s)", "noise_margin": margin}


def check_earlier_runs(runs: list) -> None:
    """A sweep into the OUT of an earlier one finds its runs: refused before anything trains unless
    train.resume=auto (reuse and continue them, train the new settings) or train.overwrite=true is given."""
    held = [cfg.out for _, _, cfg in runs
            if not cfg.train.resume and not cfg.train.overwrite and holds_run(Path(cfg.out))]
    if held:
        raise ConfigError(f"--out: {held[0]} holds a run of an earlier sweep ({len(held)} of this sweep's "
                          f"{len(runs)} runs are there): add train.resume=auto to reuse finished runs, continue "
                          f"unfinished ones and train only the new settings, train.overwrite=true to train "
                          f"them all again, or choose another --out")


# What a reused run may differ in from the sweep that reuses it: where and how it runs, what it logs and
# monitors, and data.train (the sweep sets it; check_same_split guards it). Any other setting changes what the
# run learns (its model, data, recipe) or the budget every run gets.
SWEEP_MAY_DIFFER = ("out", "data.train", "data.val", "data.cache", "data.cache_dir", "data.workers",
                    "data.on_bad_image", "eval.", "model.matmul_convs", "train.channels_last", "train.compile",
                    "train.device", "train.threads", "train.log_every", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.max_bad_steps", *RUN_CONTROL)


def check_resumed_settings(runs: list) -> None:
    """With train.resume=auto, refuse a run folder whose checkpoint was trained with other settings
    (any outside :data:`SWEEP_MAY_DIFFER`) than the sweep now gives it: its scores would be reported under settings or a
    budget it did not train with. A checkpoint that does not load is left to the run, which falls back."""
    for _, _, cfg in runs:
        path = last_in_folder(Path(cfg.out)) if cfg.train.resume else None
        try:
            state = load_checkpoint(path, map_location="cpu") if path else None
        except (CheckpointError, OSError):
            continue
        changed = [c for c in changed_settings(state, cfg) if not c[0].startswith(SWEEP_MAY_DIFFER)] if state else []
        if changed:
            key, was, now = changed[0]
            raise ConfigError(f"--out: {cfg.out} was trained with {key}={was!r}, this sweep gives it {now!r} "
                              f"({len(changed)} setting(s) differ): its scores would be labelled with settings it "
                              f"did not train with; give the earlier settings, train.overwrite=true instead of "
                              f"train.resume=auto, or another --out")


def sweep(config: str | None, grid: dict[str, list], train_dir: str, test_dir: str, out: str | Path,
          opts: SweepOptions = SweepOptions(), overrides: list[str] = (), probe: ProbeOptions = ProbeOptions(),
          progress: bool = True) -> dict:
    """Run every setting (:func:`combinations`) and seed, choose on the validation part, score the test folder
    for the chosen setting's runs only; returns what OUT/results.json holds."""
    opts.check()
    check_probe_options(probe)
    out = Path(out)
    for option, folder in (("--train", train_dir), ("--test", test_dir)):
        if out.resolve().is_relative_to(Path(folder).resolve()):
            raise ConfigError(f"--out {out} is inside {option} {folder}: the sweep's split and runs would be read "
                              f"as images of it; choose a folder outside it")
    runs = plan_runs(config, grid, out, opts, overrides)
    check_earlier_runs(runs)
    check_resumed_settings(runs)
    split = carve_validation(train_dir, out / "split", opts, [Path(cfg.out) for _, _, cfg in runs], test_dir)
    train_part, val_part = out / "split" / "train", out / "split" / "val"
    results = {"split": split, "budget": budget_text(opts, runs[0][2]), "runs": [],
               "tested_before": tested_before(out)}
    with SummaryWriter(str(out / "hparams")) as writer:  # closed however the loop ends (a signal, an error)
        for combo, seed, cfg in runs:
            row = train_and_score(cfg, train_part, val_part, probe, progress)
            shown = {k: label(v) for k, v in combo.items()}
            results["runs"].append({**shown, "seed": seed, **row, "run": cfg.out})
            if not row["diverged"]:
                writer.add_hparams({**shown, "seed": seed}, {f"hparam/val_{m}": row[f"val_{m}"] for m in METRICS},
                                   run_name=f"{run_name(combo)}_seed={seed}")
            write_results(results, out)  # after every run, so a stopped sweep keeps what it measured
            base = {k: label(values[0]) for k, values in grid.items()} if opts.one_at_a_time else None
            figures.save(figures.sweep_plots(results["runs"], list(grid), [f"val_{m}" for m in METRICS], base),
                         out / "sweep.png")
    results["settings"] = summarise(results["runs"], list(grid))
    results["chosen"] = choose(results["settings"], opts.choose_by)
    chosen = {k: results["chosen"]["setting"][k] for k in grid}
    configs = {cfg.out: cfg for _, _, cfg in runs}
    tests = [{"seed": r["seed"], **evaluate_run(configs[r["run"]], train_part, test_dir, probe, "test", progress)}
             for r in results["runs"] if {k: r[k] for k in grid} == chosen]
    results["chosen"]["test"] = tests
    results["chosen"]["test_mean"] = {m: statistics.fmean(t[m] for t in tests) for m in METRICS}
    write_results(results, out)
    return results


def train_and_score(cfg, train_part: Path, val_part: Path, probe: ProbeOptions, progress: bool) -> dict:
    """Pretrain one run and score it on the validation part: its row of the results. A run whose training or
    probe diverges is a row without scores (``diverged``), left out of the choice, and the sweep goes on: one
    unstable value (too high an lr, say) must not stop every other setting's runs."""
    try:
        summary = pretrain(cfg, progress=progress)
        if summary["stopped_by_signal"]:  # a run cut short would be compared with whole ones: stop here
            log.warning("the sweep stops with %s (checkpointed at step %d); the same command with "
                        "train.resume=auto goes on from there", cfg.out, summary["global_step"])
            raise KeyboardInterrupt
        scores = evaluate_run(cfg, train_part, val_part, probe, "val", progress)
    except (TrainingError, ProbeDivergedError) as e:
        log.warning("%s diverged (%s): its setting is left out of the choice", cfg.out, e)
        return {"steps": None, "final_loss": None, "diverged": True, **{f"val_{m}": None for m in METRICS}}
    return {"steps": summary["global_step"], "final_loss": summary["last_loss"], "diverged": False,
            **{f"val_{m}": scores[m] for m in METRICS}}


def tested_before(out: Path) -> list[dict]:
    """The settings whose runs earlier sweeps into ``out`` scored on the test folder (results.json's chosen
    setting, and those it lists as tested before): a sweep extended and run again looks at the test folder
    once more, which its results say."""
    try:
        earlier = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return []
    tested = list(earlier.get("tested_before", []))
    if "test" in earlier.get("chosen", {}):
        tested.append(setting_keys(earlier["chosen"]["setting"]))
    return [t for i, t in enumerate(tested) if t not in tested[:i]]


def setting_keys(setting: dict) -> dict:
    """A summarised setting's swept values, without its scores."""
    return {k: v for k, v in setting.items() if not k.startswith(("val_", "seeds", "within"))}


def budget_text(opts: SweepOptions, cfg) -> str:
    budget = (f"{opts.minutes:g} minutes of wall time per run" if opts.minutes else
              f"{cfg.train.epochs} epochs of the train part per run (batch {cfg.train.batch_size})")
    return budget + ("; one key varied at a time from each key's first value" if opts.one_at_a_time else "")


def markdown_table(rows: list[dict], keys: list[str]) -> list[str]:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)

    return lines + ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]


def write_results(results: dict, out: Path) -> None:
    """OUT/results.json (everything) and OUT/results.md (the split, the runs, the settings, the choice and its
    test score), as far as the sweep has got."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    s = results["split"]
    subset = f" (a stratified subset of {s['subset']})" if s["subset"] else ""
    # Files as listed: one that cannot be decoded is counted here and skipped (named) by the runs.
    lines = [f"Split of {s['train_dir']}{subset}: {s['train_images']} train / {s['val_images']} validation image "
             f"files, stratified over {len(s['classes'])} classes, validation fraction {s['val_fraction']:g}, "
             f"split seed {s['split_seed']}. Budget: {results['budget']}.",
             "", "## Runs (scored on the validation part)", ""]
    lines += markdown_table(results["runs"], [k for k in results["runs"][0] if k != "run"])
    if "chosen" in results:
        chosen = results["chosen"]
        lines += ["", "## Settings (mean and standard deviation over seeds, validation part)", ""]
        lines += markdown_table(results["settings"], list(results["settings"][0]))
        margin = chosen["noise_margin"]
        noise = "" if margin is None else f"; settings within {margin:.4f} of it are within run-to-run noise"
        shown = ", ".join(f"{k}={v}" for k, v in setting_keys(chosen["setting"]).items())
        lines += ["", f"Chosen: {shown}, by {chosen['criterion']}{noise}.", "",
                  "## Test folder (the chosen setting only, scored once per seed)", ""]
        others = [t for t in results.get("tested_before", []) if t != setting_keys(chosen["setting"])]
        if others:
            earlier = "; ".join(", ".join(f"{k}={v}" for k, v in t.items()) for t in others)
            lines += [f"Earlier sweeps into this --out also scored the test folder, for: {earlier}. It has been "
                      f"looked at for {len(others) + 1} settings: its score is no longer an untouched estimate.", ""]
        lines += markdown_table(chosen["test"] + [{"seed": "mean", **chosen["test_mean"]}], ["seed", *METRICS])
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
