"""PNG figures (matplotlib, no display needed) of what TensorBoard also shows, for reports and papers.

Each function takes plain numbers and returns a matplotlib Figure; :func:`save` writes it as a PNG.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from PIL import Image


# With more classes than this, figures name no classes (their names would overlap) and stop growing: a 1,000-class
# confusion matrix at the per-class size would be a gigapixel image.
NAMED_CLASSES = 50
DPI = 120  # of the PNG files and of TensorBoard's images alike


def _class_axis(n: int, inches_per_class: float, margin: float, least: float) -> float:
    """Inches along an axis of ``n`` classes, at most what NAMED_CLASSES classes take."""
    return max(least, inches_per_class * min(n, NAMED_CLASSES) + margin)


def _subplots(*grid: int, figsize: tuple[float, float], **options):
    """``pyplot.subplots`` without pyplot: a Figure of its own, drawn by Agg (:func:`render`), needs no display
    and leaves the caller's backend alone (a notebook's inline figures keep showing after ``import simxent``).
    The constrained layout keeps titles, labels and colour bars inside the figure as it is drawn, so no
    second drawing is needed to trim it to a tight bounding box."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(*grid, **options)


def _label_room(names: list[str]) -> float:
    """Inches that the longest of ``names`` takes as a tick label, measured in the tick labels' font: a figure
    grows by it instead of its plot shrinking, or its labels running off the edge."""
    if not names or len(names) > NAMED_CLASSES:
        return 0.0
    font = FontProperties(size=rcParams["xtick.labelsize"])
    return max(TextToPath().get_text_width_height_descent(_plain(n), font, ismath=False)[0] for n in names) / 72


def _plain(text: str) -> str:
    """``text`` as matplotlib draws it literally: between two dollar signs it reads math notation, which a
    class or folder name such as "price_$1_to_$5" is not (it fails to parse, or renders as math)."""
    return text.replace("$", r"\$")


def render(fig: Figure) -> np.ndarray:
    """``fig`` drawn once at :data:`DPI`, as (H, W, 3) uint8 pixels for the PNG file and TensorBoard alike:
    drawing costs about as much as plotting, and a PNG trimmed to its tight bounding box plus TensorBoard's
    own rendering drew each figure three times."""
    fig.set_dpi(DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save(fig: Figure | np.ndarray, path: str | Path) -> Path:
    """A figure, or the pixels :func:`render` drew of it, as a PNG file."""
    pixels = render(fig) if isinstance(fig, Figure) else fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="PNG", dpi=(DPI, DPI))
    return path


def probe_curves(history: dict, title: str = "", objective_label: str = "train objective") -> Figure:
    """Three panels per epoch: plain cross entropy on train and test (measured alike, so a test CE rising
    while the train CE falls is over-fitting, two high flat curves under-fitting), the training objective
    on its own axis (class weights and label smoothing make it a different quantity), and accuracy."""
    fig, (ax_ce, ax_obj, ax_acc) = _subplots(1, 3, figsize=(13, 3.5))
    epochs, dot = history["epoch"], {"marker": "o", "markersize": 3}  # a probe of one epoch is one point each
    ax_ce.plot(epochs, history["train_ce"], "-", label="train CE", **dot)
    ax_ce.plot(epochs, history["test_ce"], "--", label="test CE", **dot)
    ax_obj.plot(epochs, history["train_objective"], "-", color="tab:purple", label=objective_label, **dot)
    ax_acc.plot(epochs, history["train_accuracy"], "-", label="train", **dot)
    ax_acc.plot(epochs, history["test_accuracy"], "--", label="test", **dot)
    ax_ce.set(xlabel="epoch", ylabel="cross entropy", title="plain cross entropy (train and test)")
    ax_obj.set(xlabel="epoch", ylabel="loss", title="training objective")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_ce, ax_obj, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_plain(title))
    return fig


def _bar_names(ax, n: int, index_label: str) -> None:
    """Names under bars turned by 60 degrees, each ending at its bar; beyond NAMED_CLASSES bars, indices named
    by ``index_label``."""
    for label in ax.get_xticklabels():
        label.set(rotation=60, ha="right", rotation_mode="anchor")
    if n > NAMED_CLASSES:
        ax.set_xlabel(index_label)


def per_class_bars(per_class: dict, title: str = "") -> Figure:
    """Test cross entropy and accuracy of each true class; a class without test images has no bar (NaN),
    not a bar at 0, which would read as a class always wrong."""
    names = [_plain(n) for n in per_class]
    loss = [math.nan if c["loss"] is None else c["loss"] for c in per_class.values()]
    acc = [math.nan if c["accuracy"] is None else c["accuracy"] for c in per_class.values()]
    # Labels turned by 60 degrees take sin(60) of their length in height, and reach half of it left of each panel.
    room = _label_room(names)
    fig, (ax_loss, ax_acc) = _subplots(1, 2, figsize=(_class_axis(len(names), 0.6, 3, 6) + room,
                                                      3.5 + 0.87 * room))
    x = names if len(names) <= NAMED_CLASSES else range(len(names))
    ax_loss.bar(x, loss, color="tab:red")
    ax_loss.set(ylabel="mean cross entropy", title="loss per class")
    ax_acc.bar(x, acc, color="tab:blue")
    ax_acc.set(ylabel="accuracy (recall)", title="accuracy per class", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        _bar_names(ax, len(names), "class index (the classes' sorted order)")
    fig.suptitle(_plain(title))
    return fig


def per_label_ap_bars(per_label_ap: dict, positive_rate: list[float], title: str = "") -> Figure:
    """Average precision of each label of a multi-label probe, beside what a ranking at random scores (the
    label's share of positive test images); a label without test positives has no bar (NaN), not a bar at 0."""
    names = [_plain(n) for n in per_label_ap]
    ap = [math.nan if v is None else v for v in per_label_ap.values()]
    room = _label_room(names)
    fig, ax = _subplots(figsize=(_class_axis(len(names), 0.4, 2, 5) + room / 2, 3.5 + 0.87 * room))
    x = names if len(names) <= NAMED_CLASSES else range(len(names))
    ax.bar(x, ap, color="tab:blue", label="average precision")
    ax.scatter(x, positive_rate, color="black", marker="_", s=200, zorder=3, label="at random (positive share)")
    ax.set(ylabel="average precision", ylim=(0, 1))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize="small", frameon=False)  # no bar hidden
    _bar_names(ax, len(names), "label index (the labels' sorted order)")
    fig.suptitle(_plain(f"{title}: average precision per label" if title else "average precision per label"))
    return fig


def confusion_matrix(cm, classes: list[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix (each true class sums to 1), counts written in the cells of up to 20
    classes, class names on the axes of up to NAMED_CLASSES (class indices beyond)."""
    cm = np.asarray(cm, dtype=float)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side, room = _class_axis(len(classes), 0.45, 2, 4), _label_room(classes)
    fig, ax = _subplots(figsize=(side + room, side + 0.87 * room))  # names beside it, and turned 60 degrees below
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    named = len(classes) <= NAMED_CLASSES
    if named:
        ax.set_xticks(range(len(classes)), [_plain(c) for c in classes], rotation=60, ha="right",
                      rotation_mode="anchor")
        ax.set_yticks(range(len(classes)), [_plain(c) for c in classes])
    index = "" if named else " (class index)"
    ax.set(xlabel="predicted" + index, ylabel="true" + index, title=_plain(title) or "confusion matrix")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    return fig


def reliability_diagram(rel: dict, title: str = "") -> Figure:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with the ECE."""
    bins = rel["bins"]
    centers = [(b + 0.5) / bins for b in range(bins)]
    acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
    conf = [c if c is not None else 0.0 for c in rel["confidence"]]
    fig, (ax, ax_count) = _subplots(2, 1, figsize=(4.5, 5.5), sharex=True, height_ratios=(3, 1))
    ax.bar(centers, acc, width=1 / bins, edgecolor="black", color="tab:blue", label="accuracy")
    # Hatched, not shaded: where accuracy is above confidence the gap lies over the blue bar, and a shade
    # there read as a third colour the legend did not name.
    ax.bar(centers, [abs(c - a) for c, a in zip(conf, acc)], bottom=[min(c, a) for c, a in zip(conf, acc)],
           width=1 / bins, fill=False, hatch="///", edgecolor="tab:red", linewidth=0, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=_plain(f"{title} ECE = {rel['ece']:.3f}".strip()))
    ax.legend(loc="upper left")
    ax_count.bar(centers, rel["count"], width=1 / bins, color="gray")
    ax_count.set(xlabel="confidence", ylabel="images")
    return fig


def similarity_over_time(history: list[dict]) -> Figure:
    """Median and 10-90% band of positive-pair and negative-pair cosine similarity over training steps."""
    steps = [h["step"] for h in history]
    fig, ax = _subplots(figsize=(6, 3.5))
    for kind, colour in (("pos", "tab:green"), ("neg", "tab:red")):
        lo, mid, hi = ([h[kind][i] for h in history] for i in range(3))
        ax.plot(steps, mid, color=colour, label=f"{'positive' if kind == 'pos' else 'negative'} pairs (median)")
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.2)
    ax.set(xlabel="step", ylabel="cosine similarity", ylim=(-1, 1), title="similarity distributions (10-90%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def sweep_plots(rows: list[dict], keys: list[str], metrics=("knn_top1", "linear_top1"), base=None) -> Figure:
    """Each metric against each swept value; runs that share a value are averaged (other keys vary). With
    ``base`` (a one-at-a-time sweep's first values), each key's panel keeps only the runs whose other keys are
    at the base, so a panel shows that key's effect alone."""
    fig, axes = _subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        panel = [r for r in rows if not r.get("diverged")]  # no scores
        panel = panel if base is None else [r for r in panel if all(r[k] == base[k] for k in keys if k != key)]
        if not panel:
            continue
        values = sorted({r[key] for r in panel}, key=lambda v: (isinstance(v, str), v))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        x = values if numeric else list(range(len(values)))
        for metric in metrics:
            means = [statistics.fmean(r[metric] for r in panel if r[key] == v) for v in values]
            ax.plot(x, means, "o-", label=metric)
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
        ax.set(xlabel=key, ylabel="top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig
