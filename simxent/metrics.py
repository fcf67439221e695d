"""Scores for the probe's three objectives, from raw scores and targets (no thresholds hidden inside).

- multi-class: balanced accuracy, the mean of per-class recalls;
- binary: ROC-AUC (probability that a random positive outscores a random negative, ties counting half)
  and F1 at a threshold;
- multi-label: average precision per label, the step-wise area under the precision-recall curve
  (scikit-learn's definition), and its mean over labels (mAP).
"""
from __future__ import annotations

import torch


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the fraction of their images predicted right."""
    recalls = [(pred[labels == c] == c).double().mean() for c in range(num_classes) if (labels == c).any()]
    return torch.stack(recalls).mean().item()


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mann-Whitney U / (n_pos * n_neg), with average ranks for ties."""
    scores, targets = scores.double().flatten(), targets.bool().flatten()
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    unique, inverse = scores.unique(return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(unique)).double()
    ranks = mean_rank[inverse]
    return ((ranks[targets].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def f1_score(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """2 TP / (2 TP + FP + FN) over all entries (micro F1 for several labels). With no positives and none
    predicted (0 / 0) every entry is right and F1 is 1 (scikit-learn's ``zero_division=1.0``)."""
    pred, targets = pred.bool(), targets.bool()
    tp = (pred & targets).sum().item()
    wrong = (pred ^ targets).sum().item()
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 1.0


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The area under the step-wise precision-recall curve, over the distinct score thresholds t taken in
    descending order (scikit-learn's definition):

        AP = sum_t (R_t - R_{t-1}) P_t,   P_t, R_t = precision and recall of predicting score >= t.

    Without ties this is the mean, over the positives, of the precision at each one's rank; images that
    tie on a score enter together, so their order cannot change the result."""
    scores, targets = scores.double().flatten(), targets.bool().flatten()
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = scores.argsort(descending=True)
    scores, hits = scores[order], targets[order].double().cumsum(0)
    # The last image of each run of equal scores closes a threshold.
    last = torch.ones(len(scores), dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    tp = hits[last]
    precision = tp / (torch.arange(1, len(scores) + 1, dtype=torch.float64)[last])
    recall_step = torch.diff(tp, prepend=tp.new_zeros(1)) / n_pos
    return (recall_step * precision).sum().item()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float]]:
    """mAP over the labels (columns) that have at least one positive, and every label's AP."""
    per_label = [average_precision(scores[:, j], targets[:, j]) for j in range(targets.shape[1])]
    present = [ap for ap in per_label if ap == ap]
    return (sum(present) / len(present) if present else float("nan")), per_label
