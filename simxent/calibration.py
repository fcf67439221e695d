"""How far a probe's confidence can be trusted, and where its loss comes from.

For a multi-class probe with softmax probabilities p_i and prediction yhat_i = argmax p_i, confidence
c_i = max p_i. Split [0, 1] into B equal bins; for the predictions whose confidence falls in bin b:

    acc(b)  = mean 1[yhat_i = y_i],      conf(b) = mean c_i
    ECE     = sum_b (|b| / N) |acc(b) - conf(b)|          (Guo et al. 2017, expected calibration error)

A calibrated probe has acc(b) = conf(b) in every bin and ECE = 0; a reliability diagram draws acc(b)
against conf(b). A binary probe's sigmoid output p is read as the two-class distribution (1 - p, p).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .evaluate import objective_named


def class_probabilities(logits: torch.Tensor, objective: str = "multiclass") -> torch.Tensor:
    """(N, C) probabilities: softmax for multi-class, (1 - p, p) for a binary probe's one logit."""
    return objective_named(objective).log_probabilities(logits).exp()


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> dict:
    """Per-bin confidence, accuracy and count, and the ECE (see the module docstring). Empty bins have
    confidence and accuracy None."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets.reshape(-1)).float()
    # A confidence of exactly 1 belongs to the last bin, not to a bin of its own.
    which = (confidence * bins).long().clamp_(max=bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=bins)
    filled = count > 0
    conf = torch.where(filled, conf_sum / count.clamp_min(1), torch.nan)
    acc = torch.where(filled, acc_sum / count.clamp_min(1), torch.nan)
    ece = ((count / len(targets)) * (acc - conf).abs()).nan_to_num().sum().item()
    return {"bins": bins, "ece": ece,
            "confidence": [None if not f else v for v, f in zip(conf.tolist(), filled.tolist())],
            "accuracy": [None if not f else v for v, f in zip(acc.tolist(), filled.tolist())],
            "count": [int(c) for c in count.tolist()]}


def per_class(logits: torch.Tensor, targets: torch.Tensor, names: list[str], objective: str = "multiclass") -> dict:
    """Mean cross entropy and accuracy over the test images of each true class, keyed by ``names`` (class c's
    at index c; a binary probe's: the negative class, then the positive one): where the loss lives. The
    loss comes from the log-probabilities, not from rounded probabilities: a confidently wrong image
    counts in full (F.cross_entropy's, or for a binary probe F.binary_cross_entropy_with_logits's, value)."""
    log_probs = objective_named(objective).log_probabilities(logits)
    targets = targets.reshape(-1).long()
    losses = F.nll_loss(log_probs, targets, reduction="none")
    correct = (log_probs.argmax(1) == targets).float()
    out = {}
    for c, name in enumerate(names):
        mask = targets == c
        n = int(mask.sum())
        out[name] = {"images": n, "loss": losses[mask].mean().item() if n else None,
                     "accuracy": correct[mask].mean().item() if n else None}
    return out
