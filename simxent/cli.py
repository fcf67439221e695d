"""Command-line entry points: ``simxent-pretrain``, ``simxent-linear-eval``, ``simxent-demo``,
``simxent-cache``, ``simxent-embed`` and ``simxent-search``."""
from __future__ import annotations

import argparse
import io
import logging
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import yaml

from . import cache_admin, dist
from .checkpoint import CheckpointError
from . import __version__
from .config import CHOICES, MAX_IMAGE_SIZE, Config, ConfigError, config_keys, format_config, load_config, preset_names
from .data import DataError, default_cache_dir
from .class_weights import ClassWeightError
from .evaluate import LabelError, ProbeDivergedError
from .files import is_disk_full, json_text
from .linear_eval import ProbeOptions, check_probe_options, format_results, linear_eval
from .search import EmbedOptions, duplicate_pairs, embed_folder, read_store, search_files, unrelated_similarity
from .train import TrainingError, point_name, pretrain

log = logging.getLogger("simxent")
USER_ERRORS = (ConfigError, DataError, CheckpointError, ClassWeightError, LabelError, ProbeDivergedError,
               TrainingError, dist.MainProcessStopped)


def in_one_process(command: str) -> None:
    """Refuse a command that runs in one process when torchrun started several: each would evaluate, write
    and draw the same files (two TensorBoard runs and figure folders, one JSON written twice)."""
    if dist.launched_by_torchrun():
        raise ConfigError(f"{command} runs in one process: start it without torchrun, with WORLD_SIZE unset (it "
                          f"is {os.environ['WORLD_SIZE']}; only simxent-pretrain trains across processes)")


def report_user_errors(main):
    """``main()``'s exit status; an error a user can fix (USER_ERRORS) becomes one line on stderr and exit
    status 2, not a traceback. File names that are not UTF-8 print as their own bytes, as ls does."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        return main()
    except USER_ERRORS as e:
        say(f"simxent: error: {e}")
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        say(f"simxent: error: {e.strerror}{where}: free some space and run the command again")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C in training, or the first elsewhere: no traceback
        say("simxent: interrupted")
        return 128 + signal.SIGINT
    except ReaderLeft:  # stop quietly, as ls does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit flushes stdout: into nothing
        except (OSError, ValueError, io.UnsupportedOperation):  # a stdout without a file descriptor
            pass
        return 128 + signal.SIGPIPE


def say(line: str) -> None:
    """One line on stderr in one write: under torchrun every process may say it at once, and two processes'
    text and newline written apart would join their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ReaderLeft(Exception):
    """The reader of stdout left before the output ended (``| head``)."""


def show(text: str, end: str = "\n") -> None:
    """Print a command's output; a reader that left ends the command quietly (:func:`report_user_errors`),
    where a broken pipe elsewhere (a worker's, a FIFO's) stays an error."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        raise ReaderLeft from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless it is unset or a flag's False); the description and epilog
    kept as written."""

    def _get_help_string(self, action):
        if not action.option_strings or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _pretrain_parser() -> argparse.ArgumentParser:
    p = _parser("simxent-pretrain", "SimCLR pretraining. Example: simxent-pretrain cpu data.train=DIR out=runs/x",
                epilog="Configuration keys, with their defaults and meanings (set any of them as key=value):\n\n"
                       + format_config(Config()))
    p.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help=f"an optional YAML file or preset name ({', '.join(preset_names())}), "
                        "then dotted.key=value overrides")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file, then overrides) as YAML with each key's meaning, and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _refuse_habits(p: argparse.ArgumentParser, args: list[str], unknown: list[str]) -> None:
    """Name the spelling simxent wants for other tools' habits: ``--key=v`` (``--epochs=3`` too, when one key
    ends in ``.epochs``) and ``key value``."""
    keys = set(config_keys())
    for arg in (a for a in unknown if a.startswith("-")):  # argparse may hand on the argument after it too
        name, _, value = arg.lstrip("-").partition("=")
        matches = [k for k in keys if k == name or k.endswith("." + name)]
        if len(matches) == 1:
            p.error(f"'{arg}': config keys take no leading dashes; write {matches[0]}={value or 'VALUE'}")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    for i, arg in enumerate(args):
        if "=" not in arg and arg in keys and not Path(arg).exists():
            value = args[i + 1] if i + 1 < len(args) and "=" not in args[i + 1] else "VALUE"
            p.error(f"'{arg}' is a config key: write {arg}={value} (key=value, no space)")


def format_summary(summary: dict, out: Path) -> str:
    """A few lines for the console at the end of pretraining; every figure is in ``out/summary.json``."""
    stop = (" (stopped by train.max_time)" if summary["stopped_by_max_time"]
            else " (stopped by a signal)" if summary["stopped_by_signal"] else "")
    knn = summary.get("knn_top1") or []
    lines = [f"checkpoint: {summary['checkpoint']}",
             f"trained: {summary.get('epochs_trained', summary['epoch']):g} epoch(s), {summary['global_step']} "
             f"steps in {summary['seconds']:.0f} s{stop}",
             "final loss: " + ("-" if summary["last_loss"] is None else f"{summary['last_loss']:.4f}")]
    if knn:
        last = knn[-1]  # named as the log names it (an older summary's entries hold no epoch_step)
        lines.append(f"kNN top-1: {last['top1']:.4f} ({point_name(last['epoch'], last.get('epoch_step', 0))})")
    if summary.get("skipped_images"):
        lines.append(f"skipped images: {len(summary['skipped_images'])} (listed in {out / 'skipped_images.txt'})")
    tb = shlex.quote(str(out / "tb"))  # pasted into a shell as it is: a path with spaces is quoted
    lines.append(f"summary: {out / 'summary.json'}; TensorBoard: tensorboard --logdir {tb}")
    return "\n".join(lines)


def pretrain_main(argv=None) -> int:
    p = _pretrain_parser()
    a, unknown = p.parse_known_intermixed_args(argv)
    _refuse_habits(p, a.args, unknown)
    # A sweep's run folders hold "=" (seed=0/config.yaml): an existing file is a config, not an override.
    config = [x for x in a.args if "=" not in x or Path(x).is_file()]
    overrides = [x for x in a.args if x not in config]
    if len(config) > 1:
        p.error(f"one config file or preset name at most, got {config}")

    def main():
        cfg = load_config(config[0] if config else None, overrides)
        if a.print_config:
            show(format_config(cfg), end="")
            return 0
        try:
            summary = pretrain(cfg, progress=not a.no_progress)
            main_process = dist.is_main()
        finally:
            dist.cleanup()
        if main_process:
            show(format_summary(summary, Path(cfg.out)))
        return 0

    return report_user_errors(main)


def _probe_parser(p: argparse.ArgumentParser) -> None:
    d = ProbeOptions()
    p.add_argument("--epochs", type=int, default=d.epochs, help="probe epochs on cached features")
    p.add_argument("--lr", type=float, default=d.lr, help="probe AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="probe AdamW weight decay")
    p.add_argument("--probe-batch-size", type=int, default=d.batch_size, help="probe training batch")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="probe cross-entropy label smoothing")
    p.add_argument("--class-weight", default=d.class_weight,
                   help="none | balanced (n / (C * n_c)) | effective (Cui et al. 2019, --beta) | FILE of "
                        "'class_name weight' lines")
    p.add_argument("--beta", type=float, default=d.beta, help="beta of effective class weights")
    p.add_argument("--knn-k", type=int, default=d.knn_k, help="kNN neighbours")
    p.add_argument("--knn-temperature", type=float, default=d.knn_temperature, help="kNN vote temperature")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="probe initialisation and batch order, and the --random-init encoder's weights")


def _probe_options(a) -> ProbeOptions:
    opts = ProbeOptions(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, batch_size=a.probe_batch_size,
                        label_smoothing=a.label_smoothing, class_weight=a.class_weight, beta=a.beta, knn_k=a.knn_k,
                        knn_temperature=a.knn_temperature, seed=a.seed)
    check_probe_options(opts, flags=True)
    return opts


def _encoder_options(p: argparse.ArgumentParser, verb: str) -> None:
    """The options that say which encoder to use: linear evaluation and embedding share them."""
    p.add_argument("--checkpoint", required=True,
                   help="a simxent checkpoint (e.g. RUN/checkpoints/last.pt), or with --backbone a plain state dict")
    p.add_argument("--backbone",
                   help=f"{verb} a plain state dict of this architecture (any model.backbone name: docs/backbones.md; "
                        "a torchvision model's, an export, another tool's; ImageNet normalisation) instead of a "
                        "simxent checkpoint")
    p.add_argument("--cifar-stem", action="store_true", help="with --backbone: a ResNet with the 3x3 CIFAR stem")
    p.add_argument("--image-size", type=int,
                   help=f"decode size in px, 8 to {MAX_IMAGE_SIZE} (default: the checkpoint's data.image_size; "
                        f"32 with --backbone)")


def linear_eval_main(argv=None) -> int:
    p = _parser("simxent-linear-eval", "Linear probe and weighted kNN on a frozen pretrained encoder.")
    _encoder_options(p, "score")
    p.add_argument("--precision", choices=CHOICES["train.precision"],
                   help="feature precision (default: the checkpoint's train.precision; auto with --backbone)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: $SIMXENT_CACHE or ~/.cache/simxent)")
    p.add_argument("--train", required=True, help="labelled training folder (one sub-folder per class)")
    p.add_argument("--test", required=True, help="labelled test folder with the same classes")
    _probe_parser(p)
    p.add_argument("--objective", default="multiclass", choices=("multiclass", "binary", "multilabel"),
                   help="multiclass: softmax cross entropy over class folders; binary: one logit over two class "
                        "folders; multilabel: one logit per label from --train-labels/--test-labels")
    p.add_argument("--positive-class", help="binary: the class folder that is label 1 (default: the second)")
    p.add_argument("--train-labels", help="multilabel: CSV of 'file,label;label' rows, files relative to --train")
    p.add_argument("--test-labels", help="multilabel: the same for --test")
    p.add_argument("--random-init", action="store_true", help="also score an untrained encoder as the baseline")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--out", help="folder for TensorBoard and figures; none: RUN/linear_eval for "
                                "RUN/checkpoints/last.pt, RUN/linear_eval/STEM for another checkpoint there (a step "
                                "file), else linear_eval beside the checkpoint")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where features are computed")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--no-cache", action="store_true", help="do not keep decoded images in the cache")
    p.add_argument("--crop-ratio", type=float, default=0.875,
                   help="images larger than the view: shorter side to size / ratio, then the centre crop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)

    def main():
        in_one_process("simxent-linear-eval")
        results = linear_eval(a.checkpoint, a.train, a.test, _probe_options(a), a.random_init, a.out, a.json,
                              a.device, a.workers, not a.no_cache, not a.no_progress, objective=a.objective,
                              positive_class=a.positive_class, train_labels=a.train_labels,
                              test_labels=a.test_labels, backbone_name=a.backbone, cifar_stem=a.cifar_stem,
                              image_size=a.image_size, cache_dir=a.cache_dir, precision=a.precision,
                              crop_ratio=a.crop_ratio)
        show(format_results(results))
        return 0

    return report_user_errors(main)


def check_demo_out(out: Path, train: Path) -> None:
    """Refuse an ``out`` whose run trained on other images than the demo's (its config.yaml says): the
    demo replaces the earlier demo run in its folder (train.overwrite=true), never a user's run."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except OSError:
        return
    except yaml.YAMLError:
        saved = None
    trained = saved.get("data", {}).get("train") if isinstance(saved, dict) else None
    if not trained or Path(trained).expanduser().resolve() != train.expanduser().resolve():
        raise ConfigError(f"--out {out} holds a run that is not the demo's (trained on {trained or 'unknown images'}); "
                          f"the demo replaces the run in its folder: give another --out")


def demo_main(argv=None) -> int:
    p = _parser("simxent-demo", "Draw a small labelled shape set, pretrain on it for a few minutes on the CPU "
                "(the packaged preset 'demo'), then print linear probe and kNN accuracy beside an untrained encoder.")
    p.add_argument("--data", default="demo_data", help="where the generated images go")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining wall time (> 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    a = p.parse_intermixed_args(argv)
    from .demo import make_shapes

    def main():
        in_one_process("simxent-demo")
        if not 0 < a.minutes < math.inf:  # train.max_time=0 would mean no limit: the preset's 30 epochs
            raise ConfigError(f"--minutes must be a number of minutes > 0, got {a.minutes:g}")
        data = Path(a.data)
        if not (data / "train").is_dir():
            show(f"drawing the demo image set in {data} ...")
            make_shapes(data)
        # The demo's folder is the demo's own: running it again replaces the previous demo run.
        cfg = load_config("demo", [f"data.train={data / 'train'}", f"out={a.out}", "train.overwrite=true",
                                   f"train.max_time={a.minutes * 60}", *a.overrides])
        check_demo_out(Path(cfg.out).expanduser(), Path(cfg.data.train))
        t = time.monotonic()
        pretrain(cfg)
        out = Path(cfg.out)  # an out= override names it too; pretrain expanded ~
        show(f"pretrained for {time.monotonic() - t:.0f} s; scoring the frozen encoder ...")
        results = linear_eval(out / "checkpoints" / "last.pt", data / "train", data / "test", ProbeOptions(),
                              random_init=True, json_path=out / "linear_eval.json")
        show(format_results(results))
        show(f"all figures: {out / 'linear_eval.json'}; plots: {results['figures']}, "
             f"{out / 'figures'}; TensorBoard: tensorboard --logdir {shlex.quote(str(out))}")
        return 0

    return report_user_errors(main)


def cache_main(argv=None) -> int:
    p = _parser("simxent-cache", "See and clear the decoded-image cache ($SIMXENT_CACHE, else ~/.cache/simxent).")
    where = "the cache folder (a run's data.cache_dir); default: $SIMXENT_CACHE or ~/.cache/simxent"
    p.add_argument("--dir", help=where)
    commands = p.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="each entry's key, size on disk, age and source folder")
    clear = commands.add_parser("clear", help="delete entries by key, or all of them with --all (never a file "
                                              "a running decoder is writing)")
    for command in (listing, clear):  # --dir after the command too; SUPPRESS: absent there keeps the first's
        command.add_argument("--dir", default=argparse.SUPPRESS, help=where)
    clear.add_argument("keys", nargs="*", metavar="KEY", help="entries to delete (from simxent-cache list)")
    clear.add_argument("--all", action="store_true", help="every entry")
    a = p.parse_args(argv)
    if a.command == "clear" and a.all == bool(a.keys):
        p.error("clear takes KEY... or --all (one of them)")
    cache_dir = Path(a.dir) if a.dir else default_cache_dir()

    def main():
        in_one_process("simxent-cache")
        if a.dir and not cache_dir.is_dir():  # a mistyped --dir is no empty cache (the default may not exist yet)
            raise ConfigError(f"--dir {a.dir}: no such folder")
        if a.command == "list":
            show(cache_admin.format_listing(cache_dir))
            return 0
        removed, freed, in_use = cache_admin.clear(cache_dir, None if a.all else a.keys)
        show(f"removed {len(removed)} file(s), {cache_admin.human_bytes(freed)}, from {cache_dir}")
        for t in in_use:
            show(f"kept {t.path.name}: process {t.pid} is writing it")
        return 0

    return report_user_errors(main)


def embed_main(argv=None) -> int:
    d = EmbedOptions()
    p = _parser("simxent-embed", "Write the L2-normalised embeddings of every image in a folder, their file names "
                "and a FAISS index, for simxent-search.")
    _encoder_options(p, "embed with")
    p.add_argument("--images", required=True, help="folder of images, at any depth, or a text file listing image paths")
    p.add_argument("--out", required=True, help="folder for embeddings.npy, names.json, index.faiss, meta.json")
    p.add_argument("--crop-ratio", type=float, default=d.crop_ratio,
                   help="images larger than the view: shorter side to size / ratio, then the centre crop")
    p.add_argument("--ivf-above", type=int, default=d.ivf_above,
                   help="an IVF index (approximate; its recall@10 against exact search goes to meta.json) above "
                        "this many images, else exact search")
    p.add_argument("--nprobe", type=int, default=d.nprobe, help="IVF lists searched per query")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per encoder batch")
    p.add_argument("--projector", type=int, default=d.projector,
                   help="show this many images (evenly spaced) in TensorBoard's projector, OUT/projector; 0: none")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"), help="where the encoder runs")
    p.add_argument("--workers", type=int, default=d.workers, help="image decoding processes")
    p.add_argument("--cache-dir", help="decoded-image cache (default: $SIMXENT_CACHE or ~/.cache/simxent)")
    p.add_argument("--no-cache", action="store_true", help="do not keep decoded images in the cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)

    def main():
        in_one_process("simxent-embed")
        opts = EmbedOptions(a.image_size, a.crop_ratio, a.backbone, a.cifar_stem, a.device, a.workers,
                            not a.no_cache, a.cache_dir, a.batch_size, a.ivf_above, a.nprobe, a.projector,
                            not a.no_progress)
        meta = embed_folder(a.checkpoint, a.images, a.out, opts)
        index = meta["index"]
        recall = f", recall@{index['recall']['k']} {index['recall']['value']:.4f}" if index["type"] == "ivf" else ""
        show(f"{meta['count']} images embedded ({meta['dim']} dims, {index['type']} index{recall}) in {a.out}")
        if meta["skipped"]:
            show(f"{len(meta['skipped'])} unreadable file(s) skipped in {a.images}:\n  " + "\n  ".join(meta["skipped"]))
        return 0

    return report_user_errors(main)


def search_main(argv=None) -> int:
    p = _parser("simxent-search", "The most similar images of a folder embedded by simxent-embed, with their cosine "
                "similarity; or its near-duplicate pairs.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to look up")
    p.add_argument("--index", required=True, help="a folder written by simxent-embed --out")
    p.add_argument("--k", type=int, default=10, help="neighbours per image")
    p.add_argument("--duplicates", type=float, metavar="THRESHOLD",
                   help="list every pair of the folder's images with cosine similarity >= THRESHOLD (in (-1, 1])")
    p.add_argument("--checkpoint", help="the encoder for IMAGE (default: the checkpoint in the index's meta.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if not a.images and a.duplicates is None:
        p.error("give IMAGE files to look up, or --duplicates THRESHOLD")

    def main():
        in_one_process("simxent-search")
        if a.k < 1:
            raise ConfigError(f"--k must be >= 1, got {a.k}")
        if a.duplicates is not None and not -1 < a.duplicates <= 1:
            raise ConfigError(f"--duplicates must be in (-1, 1], got {a.duplicates}")
        store = read_store(a.index)
        results = {}
        if a.images:
            results["neighbours"] = search_files(store, a.images, a.k, a.checkpoint)
        if a.duplicates is not None:
            pairs = duplicate_pairs(store.index, store.vectors, a.duplicates, progress=not a.no_progress)
            results["duplicates"] = [{"a": store.names[i], "b": store.names[j], "similarity": s} for i, j, s in pairs]
            results["unrelated"] = unrelated_similarity(store.vectors)
            warn_if_unrelated_pass(a.duplicates, results["unrelated"])
        show(json_text(results, indent=2) if a.json else format_search(results))
        return 0

    return report_user_errors(main)


def warn_if_unrelated_pass(threshold: float, unrelated: dict | None) -> None:
    """Warn when more than 1 random pair in 1,000 of the folder reaches the --duplicates threshold."""
    if unrelated and threshold <= unrelated["p99.9"]:
        log.warning("--duplicates %g: 1 in 1,000 random pairs of this folder score %.4f or more (median %.4f), so "
                    "most pairs listed are likely different images: raise the threshold, or embed with an encoder "
                    "trained longer", threshold, unrelated["p99.9"], unrelated["median"])


def format_search(results: dict) -> str:
    """Text lines: each query, then its neighbours as ``similarity<TAB>name``; then duplicate pairs as
    ``similarity<TAB>name<TAB>name`` (--json for names holding tabs or line breaks)."""
    lines = []
    for found in results.get("neighbours", []):
        lines.append(found["query"])
        lines += [f"  {n['similarity']:.6f}\t{n['name']}" for n in found["neighbours"]]
    if "duplicates" in results:
        unrelated, line = results.get("unrelated"), f"{len(results['duplicates'])} near-duplicate pair(s)"
        if unrelated:
            line += (f" (random pairs of the folder: median cosine {unrelated['median']:.4f}, 1 in 1,000 above "
                     f"{unrelated['p99.9']:.4f})")
        lines.append(line)
        lines += [f"{d['similarity']:.6f}\t{d['a']}\t{d['b']}" for d in results["duplicates"]]
    return "\n".join(lines)


COMMANDS = {"pretrain": pretrain_main, "linear-eval": linear_eval_main, "demo": demo_main, "cache": cache_main,
            "embed": embed_main, "search": search_main}
USAGE = f"""usage: python -m simxent {{{','.join(COMMANDS)}}} ... | --version
  pretrain      as simxent-pretrain (SimCLR pretraining)
  linear-eval   as simxent-linear-eval (linear probe and kNN on a frozen encoder)
  demo          as simxent-demo (draw shapes, pretrain, score)
  cache         as simxent-cache (list or clear the decoded-image cache)
  embed         as simxent-embed (embeddings and a FAISS index of a folder)
  search        as simxent-search (similar images, near-duplicate pairs)
Each command takes --help."""


def main(argv=None) -> int:
    """``python -m simxent COMMAND ...``: dispatch to a console script's entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv[:1] == ["--version"]:
        print(f"simxent {__version__}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    say(f"simxent: error: {f'unknown command {argv[0]!r}' if argv else 'no command given'}")
    return 2
