"""Scoring a frozen encoder: feature extraction, weighted kNN on FAISS, and a linear probe.

Both scorers work on features extracted once; the probe never runs the encoder again.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import Normalize, to_float


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast context for ``dtype`` (bf16/fp16) on ``device``; a no-op for fp32 (``None``)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    normalize: Normalize,
    device: torch.device,
    batch_size: int = 512,
    dtype: Optional[torch.dtype] = None,
    channels_last: bool = True,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Encoder features (N, D) float32 on the CPU for uint8 NHWC ``images``, in eval mode."""
    was_training = encoder.training
    encoder.eval()
    normalize = normalize.to(device)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = images[start : start + batch_size].permute(0, 3, 1, 2).to(device, non_blocking=True)
        x = normalize(to_float(x))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    exclude_self: bool = False,
    index: str = "flat",
    nprobe: int = 16,
) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018) with cosine similarity on a FAISS index:

        score_c(q) = sum over the k nearest bank vectors b with label c of exp(cos(q, b) / T)

    ``index="flat"`` searches exactly; ``"ivf"`` (for banks above a million vectors) clusters the bank
    into about 4 sqrt(n) lists and searches the ``nprobe`` nearest, trading recall for speed.
    ``exclude_self`` drops each query's own entry when the query set is the bank (leave-one-out).
    """
    bank = np.ascontiguousarray(F.normalize(bank.float(), dim=1).numpy())
    query = np.ascontiguousarray(F.normalize(query.float(), dim=1).numpy())
    k = min(k, len(bank) - int(exclude_self))
    if k < 1:
        raise ValueError("kNN needs at least 2 bank vectors for leave-one-out, 1 otherwise")
    searcher = build_index(bank, index, nprobe)
    sims, idx = searcher.search(query, k + int(exclude_self))
    sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
    if exclude_self:
        own = idx == torch.arange(len(query)).unsqueeze(1)
        # Drop the query itself where found, else the last (least similar) neighbour.
        own[~own.any(dim=1), -1] = True
        sims = sims[~own].view(len(query), k)
        idx = idx[~own].view(len(query), k)
    weights = (sims / temperature).exp()
    votes = F.one_hot(bank_labels[idx], num_classes).float() * weights.unsqueeze(-1)
    return votes.sum(dim=1)


def build_index(vectors: np.ndarray, kind: str = "flat", nprobe: int = 16):
    """A FAISS inner-product index over unit vectors: exact (``flat``) or inverted-file (``ivf``)."""
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(len(vectors) // 39, int(4 * len(vectors) ** 0.5)))  # FAISS wants ~39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"unknown kNN index '{kind}' (flat or ivf)")
    index.add(vectors)
    return index


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices.eq(labels.unsqueeze(1)).any(dim=1).float().mean().item()


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def classification_report(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    pred = scores.argmax(dim=1)
    cm = confusion_matrix(pred, labels, len(classes))
    per_class = (cm.diag().float() / cm.sum(dim=1).clamp_min(1)).tolist()
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "per_class": dict(zip(classes, per_class)),
        "confusion": cm.tolist(),
    }


class ClassWeightError(ValueError):
    """Class weights that do not fit the classes: wrong length, unknown name, non-positive, non-finite."""


def class_weights(spec: str, labels: torch.Tensor, classes: list[str]) -> Optional[torch.Tensor]:
    """Per-class weights for the probe's cross entropy.

    - ``none``: no weights;
    - ``balanced``: w_c = n / (C * n_c), so every class contributes equally to the loss;
    - a file: one weight per line, either ``<weight>`` in class order or ``<class name> <weight>``.
    """
    C = len(classes)
    if spec == "none":
        return None
    if spec == "balanced":
        counts = torch.bincount(labels, minlength=C)
        empty = [classes[c] for c in range(C) if counts[c] == 0]
        if empty:
            raise ClassWeightError(f"balanced class weights: no training images for class(es) {', '.join(empty)}")
        return (len(labels) / (C * counts.double())).float()
    path = Path(spec)
    if not path.is_file():
        raise ClassWeightError(f"--class-weight: expected none, balanced or a file; no file {path}")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    try:
        if all(len(r) == 1 for r in rows):
            values = [float(r[0]) for r in rows]
        elif all(len(r) == 2 for r in rows):
            named = {name: float(w) for name, w in rows}
            unknown = sorted(set(named) - set(classes))
            missing = [c for c in classes if c not in named]
            if unknown or missing:
                raise ClassWeightError(
                    f"{path}: class names do not match the training folder"
                    + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                    + (f"; missing: {', '.join(missing)}" if missing else "")
                )
            values = [named[c] for c in classes]
        else:
            raise ClassWeightError(f"{path}: each line must be '<weight>' or '<class name> <weight>'")
    except ValueError as e:
        if isinstance(e, ClassWeightError):
            raise
        raise ClassWeightError(f"{path}: cannot read a number: {e}") from None
    if len(values) != C:
        raise ClassWeightError(f"{path}: {len(values)} weights for {C} classes ({', '.join(classes)})")
    bad = [f"{classes[i]}={v}" for i, v in enumerate(values) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ClassWeightError(f"{path}: class weights must be finite and > 0, got {', '.join(bad)}")
    return torch.tensor(values, dtype=torch.float32)


class LinearProbe(nn.Module):
    """Standardise features with the training set's mean and std, then one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, LinearProbe, float], None]] = None,
    progress: bool = True,
) -> LinearProbe:
    """Fit a linear classifier on cached features with ``F.cross_entropy`` (optional class weights and
    label smoothing), AdamW and a cosine learning rate. ``on_epoch(epoch, probe, train_loss)`` lets the
    caller log curves."""
    if train_y.min() < 0 or train_y.max() >= num_classes:
        raise ValueError(f"probe labels must lie in [0, {num_classes - 1}]")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(train_x.mean(0), train_x.std(0).clamp_min(1e-6), num_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx], weight=weight, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, probe, total / len(order))
    return probe.eval()
