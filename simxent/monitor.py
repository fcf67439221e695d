"""TensorBoard output: scalars, histograms, figures, view-pair grids, confusion matrices, the embedding
projector, the run's config and its hyperparameters, written by one process only."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from google.protobuf import text_format
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from . import figures
from .files import write_text_atomic

PROJECTOR_CONFIG = "projector_config.pbtxt"  # where TensorBoard's projector lists the embeddings of a log dir


class Monitor:
    """A SummaryWriter that does nothing when ``enabled`` is False (every rank but 0)."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        # purge_step drops events a killed run wrote past its last checkpoint, so a resumed run draws
        # one continuous curve.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step) if enabled else None
        self.earlier_embeddings = read_projector_config(Path(log_dir)) if enabled else []

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, v, step)

    def view_pairs(self, tag: str, v1: torch.Tensor, v2: torch.Tensor, mean, std, step: int, n: int = 8) -> None:
        """A grid with each image's two views side by side (de-normalised for display)."""
        if not self.writer:
            return
        n = min(n, len(v1))
        mean = torch.tensor(mean).view(1, 3, 1, 1)
        std = torch.tensor(std).view(1, 3, 1, 1)
        pairs = torch.stack([v1[:n].float().cpu(), v2[:n].float().cpu()], dim=1).flatten(0, 1)
        self.writer.add_image(tag, tile((pairs * std + mean).clamp(0, 1), columns=2 * min(n, 4)), step)

    def confusion(self, tag: str, cm: torch.Tensor | list, classes: list[str], step: int = 0) -> None:
        """Row-normalised confusion matrix drawn with its axes and class names
        (:func:`simxent.figures.confusion_matrix`), plus the counts as a markdown table for up to
        ``figures.NAMED_CLASSES`` classes (beyond, the results' JSON holds them)."""
        if not self.writer:
            return
        cm = torch.as_tensor(cm, dtype=torch.float32)
        self.figure(tag, figures.confusion_matrix(cm.numpy(), classes, tag), step)
        self.confusion_counts(tag, cm, classes, step)

    def confusion_counts(self, tag: str, cm: torch.Tensor | list, classes: list[str], step: int = 0) -> None:
        """The counts of a confusion matrix as the markdown table ``{tag}_counts``, for up to
        ``figures.NAMED_CLASSES`` classes."""
        if not self.writer or len(classes) > figures.NAMED_CLASSES:
            return
        cm = torch.as_tensor(cm, dtype=torch.float32)
        header = "| true \\ pred | " + " | ".join(classes) + " |\n|" + "---|" * (len(classes) + 1) + "\n"
        rows = "\n".join(f"| {c} | " + " | ".join(str(int(x)) for x in row) + " |" for c, row in zip(classes, cm))
        self.writer.add_text(tag + "_counts", header + rows, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_histogram(tag, values.float().cpu(), step)

    def figure(self, tag: str, fig, step: int) -> None:
        """A matplotlib figure, or the pixels :func:`simxent.figures.render` drew of it, as an image."""
        if self.writer:
            pixels = figures.render(fig) if isinstance(fig, figures.Figure) else fig
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def embedding(self, features: torch.Tensor, labels: list[str], thumbnails: torch.Tensor, step: int,
                  tag: str = "val") -> None:
        """Features for TensorBoard's projector, each point labelled and drawn as its image (NCHW in [0, 1]).
        A folder already there for this step and tag is a superseded branch's (a run resumed from an older
        checkpoint ends at a step it ended at before): it is replaced, not written into."""
        if self.writer:
            stale = Path(self.writer.get_logdir()) / str(step).zfill(5) / tag  # as add_embedding names it
            if stale.is_dir():
                shutil.rmtree(stale)
            self.writer.add_embedding(features.float().cpu(), metadata=labels, label_img=thumbnails.float().cpu(),
                                      global_step=step, tag=tag)
            self._keep_earlier_embeddings()

    def _keep_earlier_embeddings(self) -> None:
        """add_embedding rewrites the projector's list with this session's embeddings only: a resumed run's
        earlier ones, still on disk, would drop out of the projector. They are listed again, before this
        session's, but for one whose folder this session replaced."""
        log_dir = Path(self.writer.get_logdir())
        ours = read_projector_config(log_dir)
        paths = {e.tensor_path for e in ours}
        kept = [e for e in self.earlier_embeddings if e.tensor_path not in paths and (log_dir / e.tensor_path).exists()]
        if kept:
            merged = ProjectorConfig()
            merged.embeddings.extend(kept + list(ours))
            write_text_atomic(log_dir / PROJECTOR_CONFIG, text_format.MessageToString(merged))

    def config_text(self, config_yaml: str, step: int = 0) -> None:
        """The resolved config, in the TEXT tab (indented: markdown shows it as a code block)."""
        if self.writer:
            self.writer.add_text("config", "".join(f"    {line}\n" for line in config_yaml.splitlines()), step)

    def hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        """``hparams`` and final ``metrics`` for the HPARAMS tab, in this run's own event file: each run
        directory is one row there, so runs compare side by side (SummaryWriter.add_hparams would write them
        to a new sub-folder instead). The metrics are also scalars, which is where the tab reads them."""
        if not self.writer:
            return
        for summary in hparams_summaries(hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def tile(images: torch.Tensor, columns: int, padding: int = 1) -> torch.Tensor:
    """(N, C, H, W) images as one (C, rows * (H + p) + p, columns * (W + p) + p) grid, row by row, at most
    N columns, with ``padding`` p black pixels around each: torchvision's ``make_grid``, whose import costs
    seconds."""
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = images.new_zeros(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    return grid


def read_projector_config(log_dir: Path) -> list:
    """The embeddings ``log_dir``'s projector config lists (none without one, or with one unreadable)."""
    try:
        return list(text_format.Parse((log_dir / PROJECTOR_CONFIG).read_text(), ProjectorConfig()).embeddings)
    except (OSError, text_format.ParseError):
        return []
