"""Scoring a frozen encoder: feature extraction, weighted kNN on FAISS, and a linear probe.

Both scorers work on features extracted once; the probe never runs the encoder again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import Normalize, to_float
from .metrics import balanced_accuracy, f1_score, mean_average_precision, roc_auc
from .runtime import autocast, show_progress_bars


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
    out = []
    bars = show_progress_bars(progress)
    batches = encoder_inputs(images, normalize, device, batch_size, channels_last)
    for x in tqdm(batches, desc=desc, unit="batch", total=-(-len(images) // batch_size), disable=not bars,
                  leave=False):
        with autocast(device, dtype):
            out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


def reestimate_batchnorm(encoder: nn.Module, images: torch.Tensor, normalize: Normalize, device: torch.device,
                         dtype: Optional[torch.dtype] = None, batch_size: int = 512, channels_last: bool = True) -> int:
    """Set the running statistics of ``encoder``'s BatchNorm layers to those of their inputs over uint8 NHWC
    ``images`` (FixRes, Touvron et al. 2019, re-estimates them at the test resolution): one pass in training
    mode without gradients, each statistic the plain mean over the batches (momentum None),

        mu = mean_b mean(x_b),   sigma^2 = mean_b var(x_b)   (per channel; x_b a layer's input in batch b).

    Returns how many layers were set (those that track running statistics). Should the pass fail (out of
    memory), every layer gets its statistics back as they were before the error is raised."""
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta, was_training = [m.momentum for m in layers], encoder.training
    before = batchnorm_statistics(encoder)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    # Batches of equal size (within one image): each weighs the same in the mean, and none is a lone image,
    # which has no variance.
    batch_size = math.ceil(len(images) / math.ceil(len(images) / batch_size)) if len(images) else batch_size
    try:
        with torch.no_grad():
            for x in encoder_inputs(images, normalize, device, batch_size, channels_last) if layers else ():
                with autocast(device, dtype):
                    encoder(x)
    except BaseException:
        set_batchnorm_statistics(encoder, before)
        raise
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        encoder.train(was_training)
    return len(layers)


def batchnorm_statistics(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the running statistics (and batch counts) of ``encoder``'s BatchNorm layers, by name."""
    return {k: v.clone() for k, v in encoder.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def set_batchnorm_statistics(encoder: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`batchnorm_statistics` copied."""
    encoder.load_state_dict(saved, strict=False)


def encoder_inputs(images: torch.Tensor, normalize: Normalize, device: torch.device, batch_size: int,
                   channels_last: bool = True):
    """uint8 NHWC ``images`` as the encoder takes them, ``batch_size`` at a time: on ``device``, float,
    normalised, NCHW (channels-last in memory when asked)."""
    normalize = normalize.to(device)
    for start in range(0, len(images), batch_size):
        x = normalize(to_float(images[start : start + batch_size].permute(0, 3, 1, 2).to(device, non_blocking=True)))
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


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

        score_c(q) = sum over the k nearest bank vectors b with label c of exp((cos(q, b) - m_q) / T)

    where m_q is the query's largest similarity: the formula's exp(cos / T) divided by exp(m_q / T), which
    ranks the classes the same while no weight overflows at a small T (in float32 exp(0.95 / 0.01) is inf,
    and inf - inf NaN); the nearest neighbour weighs 1. Scores are float64 (N, C).

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
    # FAISS returns each row's best first; float64, so that far neighbours do not underflow to 0 and tie
    sims = sims.double()
    weights = ((sims - sims[:, :1]) / temperature).exp()
    # An IVF search that finds fewer than k fills the rest with index -1 (and a query that finds none
    # would weigh each at exp(0) = 1): they vote for no class.
    missing = idx < 0
    weights[missing], idx = 0.0, idx.clamp(min=0)
    # Summed into (N, C) directly: a one-hot (N, k, C) tensor would need 155 GB for ImageNet's 50,000
    # queries, k = 200 and 1,000 classes.
    scores = torch.zeros(len(query), num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, bank_labels[idx].long(), weights)


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


def recall_against_exact(index, vectors: np.ndarray, rows: np.ndarray, k: int) -> float:
    """recall@k of an approximate ``index`` over ``vectors``, queried with its own ``rows``: the fraction of
    each query's exact k nearest other rows (largest inner product, by brute force) that the index returns
    among its own k, averaged over queries:

        recall@k = (1 / |Q|) sum over q of |A_k(q) & E_k(q)| / k

    Each query's own row is left out of both lists: an indexed row always finds itself, its own list being
    probed, which would overstate the recall a new image gets."""
    k = min(k, len(vectors) - 1)
    queries = vectors[rows]
    _, exact = build_index(vectors, "flat").search(queries, k + 1)
    _, found = index.search(queries, k + 1)

    def others(lists: np.ndarray) -> list[list[int]]:
        return [[j for j in lst if j != r][:k] for lst, r in zip(lists.tolist(), rows.tolist())]

    hits = [len(set(e) & set(f)) for e, f in zip(others(exact), others(found))]
    return float(np.mean(hits)) / k


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1, floor: float = -math.inf) -> float:
    """Share of rows whose true class is among the ``k`` highest scores and scores above ``floor``. kNN votes
    take ``floor=0``: a class no neighbour voted for is never a hit, however ``topk`` orders the tied zeros
    that fill its k places when fewer than k classes have votes (nor is one whose votes all underflow
    float64, more than 745 T below the best similarity). Top-1 is the ``argmax``'s (the first of tied
    classes), the prediction the confusion matrix counts; ``topk`` may break that tie the other way."""
    k = min(k, scores.shape[1])
    if k == 1:
        in_top = scores.argmax(dim=1).eq(labels)
    else:
        in_top = scores.topk(k, dim=1).indices.eq(labels.unsqueeze(1)).any(dim=1)
    above = scores.gather(1, labels.unsqueeze(1)).squeeze(1) > floor
    return (in_top & above).float().mean().item()


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def classification_report(scores: torch.Tensor, labels: torch.Tensor, classes: list[str],
                          floor: float = -math.inf) -> dict:
    """Top-1, top-5 (None with five classes or fewer, where every image would count as right; ``floor``: see
    :func:`topk_accuracy`), per-class accuracy (None for a class with no test image: undefined, not 0) and
    the confusion matrix."""
    pred = scores.argmax(dim=1)
    cm = confusion_matrix(pred, labels, len(classes))
    per_class = [(right / n if n else None) for right, n in zip(cm.diag().tolist(), cm.sum(dim=1).tolist())]
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5, floor) if len(classes) > 5 else None,
        "per_class": dict(zip(classes, per_class)),
        "confusion": cm.tolist(),
    }


class LabelError(ValueError):
    """Targets that do not fit the objective: out of range, wrong type, or one-hot where indices belong."""


def check_class_indices(y: torch.Tensor, num_classes: int, name: str = "labels") -> None:
    """Multi-class targets must be a 1-d integer tensor of indices in [0, C). A (N, C) 0/1 matrix with one
    1 per row is a one-hot encoding passed by mistake, and is named as such."""
    if y.dim() == 2 and y.shape[1] == num_classes and ((y == 0) | (y == 1)).all() and (y.sum(1) == 1).all():
        raise LabelError(f"{name} is a one-hot matrix of shape {tuple(y.shape)}; pass class indices "
                         f"(e.g. {name}.argmax(1))")
    if y.dim() != 1:
        raise LabelError(f"{name} must be a 1-d tensor of class indices, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise LabelError(f"{name} must hold integer class indices, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise LabelError(f"{name} must lie in [0, {num_classes - 1}], found values in [{int(y.min())}, {int(y.max())}]")


def check_binary_targets(y: torch.Tensor, num_labels: int, name: str = "targets") -> None:
    """Binary and multi-label targets: an (N, labels) tensor of 0 and 1."""
    if y.dim() != 2 or y.shape[1] != num_labels:
        raise LabelError(f"{name} must have shape (N, {num_labels}) for {num_labels} label(s), got {tuple(y.shape)}")
    if not ((y == 0) | (y == 1)).all():
        raise LabelError(f"{name} must hold only 0 and 1, found {sorted(set(y.unique().tolist()) - {0, 1})[:5]}")


def softmax_loss(weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
    """Cross entropy over exclusive classes, -sum_c w_c q_c log softmax(z)_c averaged with the class weights
    w (``F.cross_entropy``), q the one-hot target smoothed to (1 - s) onehot + s / C."""
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)


def sigmoid_loss(weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
    """Binary cross entropy per label, -(w y log sigma(z) + (1 - y) log(1 - sigma(z))) averaged over images
    and labels, w the positive weight; label smoothing does not apply to it."""
    return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weight)


def softmax_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=1)


def sigmoid_pair_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """A binary probe's one logit z read as the two-class distribution (1 - sigma(z), sigma(z)), in logs:
    log sigma(-z) and log sigma(z), exact where 1 - sigma(z) rounds to 0 (z above about 17 in float32)."""
    z = logits.float().reshape(-1)
    return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)


def multiclass_metrics(logits: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict:
    """Top-1/top-5, per-class accuracy, confusion matrix and balanced accuracy."""
    report = classification_report(logits, y, names)
    report["balanced_accuracy"] = balanced_accuracy(logits.argmax(1), y, len(names))
    return report


def binary_metrics(logits: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict:
    """Accuracy and balanced accuracy at logit 0, ROC AUC and F1 of the positive class ``names[0]``."""
    pred = (logits > 0).long()
    return {"accuracy": (pred == y).float().mean().item(),
            "balanced_accuracy": balanced_accuracy(pred.flatten(), y.flatten(), 2),
            "roc_auc": roc_auc(logits, y), "f1": f1_score(pred, y), "positive_class": names[0]}


def multilabel_metrics(logits: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict:
    """mAP over the labels that have test positives, each label's AP, and micro F1 at logit 0."""
    mean_ap, per_label = mean_average_precision(logits, y)
    # A label without test positives has no AP (NaN): null in the JSON, listed, and left out of mAP.
    undefined = [n for n, ap in zip(names, per_label) if ap != ap]
    return {"mAP": mean_ap, "ap_undefined": undefined,
            "per_label_ap": {n: None if n in undefined else ap for n, ap in zip(names, per_label)},
            "f1_micro": f1_score(logits > 0, y)}


@dataclass(frozen=True)
class Objective:
    """What a linear probe predicts and how it is scored. ``exclusive``: each image has exactly one class, so
    the probe gives a distribution over classes (``log_probabilities``, per-class loss, calibration) and kNN
    on the class folders applies. ``outputs`` = len(names) logits
    in every case (binary: the positive class only). ``columns``: the results table's (section, key)."""

    name: str
    exclusive: bool
    smoothing: bool  # label smoothing applies to the loss
    check_targets: Callable[[torch.Tensor, int], None]
    loss: Callable  # loss(weight, label_smoothing) -> loss(logits, targets)
    predict: Callable[[torch.Tensor], torch.Tensor]  # logits -> class indices, or 0/1 per label
    metrics: Callable[[torch.Tensor, torch.Tensor, list], dict]
    columns: tuple
    log_probabilities: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 for exclusive classes, else the fraction of (image, label) pairs right at logit 0."""
        return (self.predict(logits) == y.long()).float().mean().item()


OBJECTIVES = {
    "multiclass": Objective(
        "multiclass", exclusive=True, smoothing=True, check_targets=check_class_indices, loss=softmax_loss,
        predict=lambda logits: logits.argmax(1), metrics=multiclass_metrics,
        columns=(("linear", "top1"), ("linear", "top5"), ("linear", "balanced_accuracy"), ("knn", "top1"),
                 ("knn", "top5")),
        log_probabilities=softmax_log_probabilities),
    "binary": Objective(
        "binary", exclusive=True, smoothing=False, check_targets=check_binary_targets, loss=sigmoid_loss,
        predict=lambda logits: (logits > 0).long(), metrics=binary_metrics,
        columns=(("linear", "accuracy"), ("linear", "balanced_accuracy"), ("linear", "roc_auc"), ("linear", "f1"),
                 ("knn", "top1")),
        log_probabilities=sigmoid_pair_log_probabilities),
    "multilabel": Objective(
        "multilabel", exclusive=False, smoothing=False, check_targets=check_binary_targets, loss=sigmoid_loss,
        predict=lambda logits: (logits > 0).long(), metrics=multilabel_metrics,
        columns=(("linear", "mAP"), ("linear", "f1_micro"))),
}


def objective_named(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown probe objective '{name}' ({', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def probe_loss(objective: str, weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
    """The probe's loss as ``loss(logits, targets)``."""
    return objective_named(objective).loss(weight, label_smoothing)


class ProbeDivergedError(ArithmeticError):
    """The probe's training loss or weights became non-finite: too high a learning rate, or extreme weights."""


def check_finite_probe(loss: float, probe: nn.Module, epoch: int, lr: float) -> None:
    """Stop a diverging probe at once, naming the options to change, rather than score NaN logits."""
    if not (math.isfinite(loss) and all(torch.isfinite(p).all() for p in probe.parameters())):
        raise ProbeDivergedError(f"linear probe diverged at epoch {epoch + 1} (loss {loss:g}): lower --lr "
                                 f"(now {lr:g}), or check --class-weight, --weight-decay and --label-smoothing")


CONSTANT_FEATURE_RTOL = 1e-6


def standardisation(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature ``mean`` and ``scale`` for z = (x - mean) / scale, fitted on the training features:

        mean_j = (1/N) sum_i x_ij,    std_j = sqrt((1/N) sum_i (x_ij - mean_j)^2)    (as StandardScaler)
        scale_j = 1      if std_j <= 1e-6 * max(|mean_j|, rms),   rms = sqrt(mean over i, j of x_ij^2)
        scale_j = std_j  otherwise.

    A feature that is (near) constant over the training images carries nothing to standardise: dividing by
    its tiny std would multiply any test deviation by a million or more and let that one feature decide the
    prediction. Like scikit-learn's StandardScaler it gets scale 1 (z = x - mean). The threshold differs:
    StandardScaler only catches a variance lost in float64 rounding, while encoder features are float32
    (often computed in bf16), whose own rounding is about 1e-7 of their magnitude; a std below a millionth
    of the features' size (or of the feature's own mean) is treated as constant. The rule is unchanged by
    rescaling all features. Statistics are computed in float64 so that a constant column has std exactly 0,
    in blocks of rows: a float64 copy of ImageNet's ResNet-50 features would take 21 GB."""
    n = len(train_x)
    mean = column_sums(train_x, lambda x: x) / n
    var = column_sums(train_x, lambda x: (x - mean).square()) / n
    std = var.sqrt()
    rms = (var + mean.square()).mean().sqrt()  # mean over j of (1/N) sum_i x_ij^2, without a third pass
    constant = std <= CONSTANT_FEATURE_RTOL * torch.maximum(mean.abs(), rms)
    scale = torch.where(constant, torch.ones_like(std), std)
    return mean.to(train_x.dtype), scale.to(train_x.dtype)


ROW_BLOCK = 1 << 16  # rows per block where whole feature matrices would be copied


def column_sums(x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_i f(x_i) per column, in float64, ``ROW_BLOCK`` rows at a time."""
    return sum(f(x[i : i + ROW_BLOCK].double()).sum(0) for i in range(0, len(x), ROW_BLOCK))


def probe_logits(probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``probe(x)``, ``ROW_BLOCK`` rows at a time: its standardised copy of x is one block, not all of it."""
    return torch.cat([probe(x[i : i + ROW_BLOCK]) for i in range(0, len(x), ROW_BLOCK)])


class LinearProbe(nn.Module):
    """Standardise features with the training set's statistics (:func:`standardisation`), then one linear
    layer."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.linear = nn.Linear(len(mean), num_classes)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(x))


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_outputs: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 0.05,
    batch_size: int = 256,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, LinearProbe], None]] = None,
    progress: bool = True,
    objective: str = "multiclass",
) -> LinearProbe:
    """Fit a linear classifier on cached features with AdamW and a cosine learning rate.

    - ``multiclass``: ``F.cross_entropy`` over ``num_outputs`` classes, optional class ``weight`` and label
      smoothing; targets are class indices;
    - ``binary`` / ``multilabel``: ``F.binary_cross_entropy_with_logits`` with one logit per label
      (``num_outputs`` = 1 for binary), ``weight`` used as ``pos_weight``; targets are 0/1, shape (N, labels).

    ``on_epoch(epoch, probe)``, called after every epoch with the probe as it stands, lets the caller log
    curves. A non-finite loss or weight stops the fit with :class:`ProbeDivergedError`."""
    kind = objective_named(objective)
    kind.check_targets(train_y, num_outputs)
    loss_fn = kind.loss(weight, label_smoothing)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(*standardisation(train_x), num_outputs)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not show_progress_bars(progress),
                      leave=False):
        order, total = torch.randperm(len(train_x), generator=generator), 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        check_finite_probe(total, probe, epoch, lr)
        if on_epoch is not None:
            on_epoch(epoch, probe)
    return probe.eval()
