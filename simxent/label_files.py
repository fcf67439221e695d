"""Multi-label targets from CSV files of ``file,label;label;...`` rows, and the checks that keep a label file
from giving silently wrong scores.

Rows are read with the ``csv`` module, so a file name holding a comma is written quoted
(``"a,b.png",cat;dog``). A header is recognised by its file column: a first row whose file is not an image
of the folder, while later rows name images of the folder, is a header and is skipped (said in the log).
Every other mistake stops with a line naming the file and line: a row of some other number of fields, a
file that is not in the folder, the same file on two lines, a label the training file lacks.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError
from .data import IMAGE_SUFFIXES, ImageArray, names_base
from .files import missing_file

log = logging.getLogger("simxent")


def read_rows(path: Path) -> list[tuple[int, str, set[str]]]:
    """``(line number, file, labels)`` per row; blank rows and rows starting with ``#`` are skipped. The file
    is normalised (``./a/b.png`` is ``a/b.png``); an empty label field is an image with no label."""
    try:
        return parse_rows(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 label file (byte {e.start} is not UTF-8)") from None
    except csv.Error as e:  # e.g. a field over csv's size limit
        raise ConfigError(f"{path}: not a readable CSV label file ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot read the label file {path}: {e.strerror}") from None


def parse_rows(path: Path) -> list[tuple[int, str, set[str]]]:
    """:func:`read_rows` without turning the csv and decoding errors into messages."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is no file name
        reader = csv.reader(f, skipinitialspace=True)
        start = 1
        for fields in reader:
            number, start = start, reader.line_num + 1  # a quoted field may span lines: report the first
            if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith("#"):
                continue
            if len(fields) != 2:
                raise ConfigError(f"{path}:{number}: expected 'file,label;label;...' (2 fields; quote a file name "
                                  f"that holds a comma), got {len(fields)} field(s): {fields!r}")
            labels = {x.strip() for x in fields[1].split(";") if x.strip()}
            rows.append((number, Path(fields[0].strip()).as_posix(), labels))
    return rows


def drop_header(rows: list, known: set[str], path: Path, root: Path) -> list:
    """Without its first row when that row's file is not an image of ``root`` while a later row's is, and is
    not named like an image: a stale first row (``old.jpg,cat``) is an error like any other row's."""
    first = rows[0][1] if rows else ""
    if (len(rows) > 1 and first not in known and Path(first).suffix.lower() not in IMAGE_SUFFIXES
            and any(file in known for _, file, _ in rows[1:])):
        number, file, labels = rows[0]
        log.info("%s:%d: first row (%s,%s) taken as a header: %r is not an image of %s, the later rows name "
                 "images of it", path, number, file, ";".join(sorted(labels)), file, root)
        return rows[1:]
    return rows


def image_name(file: str | Path, base: Path) -> str:
    """How a label file names ``file``: its path relative to ``base``, or as it is when not below ``base``
    (an absolute path in an image list)."""
    try:
        return Path(file).relative_to(base).as_posix()
    except ValueError:  # an absolute path, named as a label row naming it is (a relative ``base`` included)
        return folder_name(str(file), base) if Path(file).is_absolute() else Path(file).as_posix()


def folder_name(file: str, root: Path) -> str:
    """A label row's ``file`` relative to the image folder ``root`` when it is an absolute path below it;
    else as written."""
    if not Path(file).is_absolute():
        return file
    lexical = os.path.relpath(os.path.abspath(file), os.path.abspath(root))  # symlinked images keep their name
    if not lexical.startswith(".."):
        return Path(lexical).as_posix()
    try:
        return Path(file).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return file


def read_label_csv(path: str | Path, data: ImageArray, root: str | Path, names: Optional[list[str]] = None):
    """The (N, labels) 0/1 matrix of ``data``'s images from ``path`` and the label names (sorted, from this
    file unless given: the training file's). ``root`` is the image folder, or the image list (a text file)
    ``data`` was read from; file names are relative to the folder, or written as in the list (relative to
    its folder, or absolute). Every image needs exactly one row; rows of images skipped as unreadable are
    ignored."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise ConfigError(missing_file(path, "label file"))
    base = names_base(root)
    images = [image_name(f, base) for f in data.files]
    unreadable = {image_name(f, base) for f in data.skipped}
    # An absolute path to an image below the folder (of the images, or of the list) names it as the images do.
    rows = [(number, folder_name(file, base), labels) for number, file, labels in read_rows(path)]
    image_set = set(images)
    rows = drop_header(rows, image_set | unreadable, path, root)
    labels, line_of = {}, {}
    for number, file, row_labels in rows:
        if file in line_of:
            raise ConfigError(f"{path}: {file} is labelled on lines {line_of[file]} and {number}; give each image "
                              f"one row")
        if file not in unreadable and file not in image_set:
            raise ConfigError(f"{path}:{number}: {file} is not an image of {root}")
        line_of[file] = number
        if file not in unreadable:
            labels[file] = row_labels
    names = names if names is not None else sorted(set().union(*labels.values()))
    index = {n: i for i, n in enumerate(names)}
    for file, row_labels in labels.items():
        if row_labels - set(index):
            raise ConfigError(f"{path}:{line_of[file]}: {file} has label(s) {sorted(row_labels - set(index))} "
                              f"that the training labels lack")
    missing = [f for f in images if f not in labels]
    if missing:
        raise ConfigError(f"{path}: no labels for {len(missing)} image(s) of {root}, e.g. {', '.join(missing[:3])}")
    y = torch.zeros(len(images), len(names), dtype=torch.long)
    for i, file in enumerate(images):
        y[i, [index[n] for n in labels[file]]] = 1
    return y, names


def check_label_sets(y_test: torch.Tensor, names: list[str], train_path, test_path) -> list[str]:
    """Refuse label sets that leave every score undefined; return the labels whose AP is undefined.

    AP_j = mean over label j's test positives of the precision at their rank: a label with no positive in
    the test set has none, so its AP is undefined; it is reported as such and left out of mAP. With no
    test positive at all, mAP is undefined and so is micro F1 = 2 TP / (2 TP + FP + FN) when the probe
    predicts no positive either: refused. (Every label has a training positive: the names are those of
    the training file's rows.)"""
    if not names:
        raise ConfigError(f"{train_path}: no image has a label; a multi-label probe needs at least one label")
    undefined = [n for n, p in zip(names, y_test.sum(0).tolist()) if p == 0]
    if len(undefined) == len(names):
        raise ConfigError(f"{test_path}: no test image has any label ({', '.join(names)}): average precision, "
                          f"mAP and micro F1 are undefined")
    if undefined:
        log.warning("%s: label(s) %s have no positive test image: their average precision is undefined "
                    "(reported as null) and mAP is the mean over the other %d label(s)", test_path,
                    ", ".join(undefined), len(names) - len(undefined))
    return undefined
