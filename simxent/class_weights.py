"""Class weights for the probe's cross entropy, and the checks that keep them from silently going wrong.

Weights are keyed by class name wherever they come from a file, so a renamed or reordered folder cannot
swap them; every run prints the table of counts and weights and warns about a likely inverted weighting.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Optional

import torch

from .files import missing_file

log = logging.getLogger("simxent")


class ClassWeightError(ValueError):
    """Class weights that do not fit the classes: unknown or missing name, non-positive, non-finite."""


def balanced(counts: torch.Tensor) -> torch.Tensor:
    """w_c = n / (C * n_c): every class contributes equally to the loss."""
    return counts.sum() / (len(counts) * counts.double())


def effective(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019, inverse effective number of samples: w_c proportional to (1 - beta) / (1 - beta^n_c),
    scaled so that the weights sum to C. beta -> 0 gives no weighting, beta -> 1 gives ``balanced``."""
    w = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts.double()))
    return w * len(counts) / w.sum()


def from_file(path: Path, classes: list[str]) -> torch.Tensor:
    """``<class name> <weight>`` per line, every class exactly once: the weight is the line's last field, so a
    name may hold spaces (``golden retriever 2``); a ``#`` at the start of a line, after a space or after the
    weight (``dog 2#common``) begins a comment, one inside a name is part of it. UTF-8, with or without the
    byte-order mark Windows editors write."""
    named, line_of = {}, {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:  # a Windows editor's ANSI or "Unicode" (UTF-16) encoding
        raise ClassWeightError(f"{path}: not a UTF-8 class-weight file (byte {e.start}); save it as UTF-8") from None
    except OSError as e:  # unreadable (permissions, a folder): one line naming the file, as label files get
        raise ClassWeightError(f"cannot read the class-weight file {path}: {e.strerror or e}") from None
    for number, line in enumerate(text.splitlines(), 1):
        fields = re.sub(r"(^|\s)#.*", "", line).rsplit(None, 1)
        if not fields:
            continue
        if len(fields) != 2:
            raise ClassWeightError(f"{path}:{number}: expected '<class name> <weight>', got {line.strip()!r}")
        name, value = fields[0].strip(), fields[1].split("#", 1)[0]
        if name in line_of:
            raise ClassWeightError(f"{path}: class {name} is on lines {line_of[name]} and {number}; give each class "
                                   f"one line")
        try:
            named[name], line_of[name] = float(value), number
        except ValueError:
            raise ClassWeightError(f"{path}:{number}: cannot read a number from {value!r}") from None
    unknown = sorted(set(named) - set(classes))
    missing = [c for c in classes if c not in named]
    if unknown or missing:
        raise ClassWeightError(f"{path}: class names do not match the training folder"
                               + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                               + (f"; missing: {', '.join(missing)}" if missing else ""))
    return torch.tensor([named[c] for c in classes], dtype=torch.float64)


def check_spec(spec: str, per_class: bool, classes: list[str]) -> None:
    """Refuse a ``spec`` that cannot apply, from the training folder's listing (its ``classes``), before any
    image is decoded: a file that is missing or does not name those classes, or a weighting that binary and
    multi-label probes (``per_class`` false: their weights are positive weights) do not take."""
    if not per_class:
        if spec not in ("none", "balanced"):
            raise ClassWeightError(f"--class-weight {spec}: binary and multi-label probes take none or balanced")
    elif spec not in ("none", "balanced", "effective"):
        weights_from_file(spec, classes)


def weights_from_file(spec: str, classes: list[str]) -> torch.Tensor:
    """:func:`from_file` of the file ``spec`` names, or an error that says what --class-weight takes."""
    path = Path(spec)
    if not path.is_file():
        raise ClassWeightError(f"--class-weight: expected none, balanced, effective or a file; "
                               f"{missing_file(path, 'class-weight file')}")
    return from_file(path, classes)


def class_weights(spec: str, labels: torch.Tensor, classes: list[str], beta: float = 0.999) -> Optional[torch.Tensor]:
    """Per-class weights from ``spec``: ``none``, ``balanced``, ``effective`` (with ``beta``) or a file of
    ``class_name weight`` lines. Errors name the class or the file line."""
    if spec == "none":
        return None
    counts = torch.bincount(labels, minlength=len(classes))
    if spec in ("balanced", "effective"):
        empty = [classes[c] for c in range(len(classes)) if counts[c] == 0]
        if empty:
            raise ClassWeightError(f"{spec} class weights: no training images for class(es) {', '.join(empty)}")
        if spec == "effective" and not 0 <= beta < 1:
            raise ClassWeightError(f"effective class weights: beta must lie in [0, 1), got {beta}")
        weights = balanced(counts) if spec == "balanced" else effective(counts, beta)
    else:
        weights = weights_from_file(spec, classes)
    check_float32(weights, counts, classes, "" if spec in ("balanced", "effective") else f"{spec}: ")
    report(weights, counts, classes)
    return weights.float()


def check_float32(weights: torch.Tensor, counts: torch.Tensor, classes: list[str], source: str = "") -> None:
    """Weights must be finite and > 0 in float32, the dtype the loss uses (1e39 becomes inf there, 1e-50
    becomes 0), and so must sum_c n_c w_c, which bounds the weighted cross entropy's normaliser
    sum_i w_{y_i} over any batch. ``source`` leads each error (a weight file's name)."""
    as_float32 = weights.float().tolist()
    bad = [f"{c}={w:g}" + (f" ({v:g} in float32)" if f"{v:g}" != f"{w:g}" else "")
           for c, w, v in zip(classes, weights.tolist(), as_float32) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ClassWeightError(f"{source}class weights must be finite and > 0, got {', '.join(bad)} (checked in "
                               f"float32, the loss's dtype)")
    total = (weights.float() * counts.float()).sum().item()
    if not math.isfinite(total):
        raise ClassWeightError(f"{source}class weights times class counts sum to {total:g} in float32; scale the "
                               f"weights down")


def report(weights: torch.Tensor, counts: torch.Tensor, classes: list[str]) -> None:
    """Log the count/weight table, and warn when weights rise with class frequency: weighting the common
    classes up is almost always an inverted weighting."""
    width = max(len(c) for c in classes)
    rows = "\n".join(f"  {c:<{width}}  {int(n):>8}  {w:10.4g}" for c, n, w in zip(classes, counts, weights.tolist()))
    log.info("class weights:\n  %-*s  %8s  %10s\n%s", width, "class", "images", "weight", rows)
    if rises_with_frequency(weights, counts):
        log.warning("class weights rise with class frequency (the most common classes weigh most): "
                    "is the weighting inverted? balanced weights are n / (C * n_c)")


def rises_with_frequency(weights: torch.Tensor, counts: torch.Tensor) -> bool:
    """Spearman correlation of weights and counts above 0.5 (classes of unequal size only)."""
    if len(counts) < 2 or counts.min() == counts.max() or weights.min() == weights.max():
        return False
    rank = lambda v: v.double().argsort().argsort().double()  # noqa: E731
    a, b = rank(weights), rank(counts)
    a, b = a - a.mean(), b - b.mean()
    return bool((a * b).sum() / (a.norm() * b.norm()) > 0.5)


def positive_weights(spec: str, targets: torch.Tensor, names: list[str]) -> Optional[torch.Tensor]:
    """``pos_weight`` per label for binary and multi-label probes: ``none``, or ``balanced`` = n_neg / n_pos,
    which weighs each label's positives as much as its negatives."""
    check_spec(spec, False, names)
    if spec == "none":
        return None
    positives = targets.sum(0).double()
    empty = [n for n, p in zip(names, positives) if p == 0 or p == len(targets)]
    if empty:
        raise ClassWeightError(f"balanced positive weights: label(s) {', '.join(empty)} are never or always positive")
    weights = (len(targets) - positives) / positives
    log.info("positive weights (n_neg / n_pos): %s", ", ".join(f"{n}={w:.4g}" for n, w in zip(names, weights.tolist())))
    return weights.float()
