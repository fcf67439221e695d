"""Probe metrics against their definitions, computed the slow way, and against scikit-learn."""
import itertools

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from simxent.metrics import average_precision, balanced_accuracy, f1_score, mean_average_precision, roc_auc


def test_roc_auc_is_the_pairwise_win_rate():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    targets = torch.randint(0, 2, (40,), generator=g)
    pos, neg = scores[targets == 1], scores[targets == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert roc_auc(scores, targets) == pytest.approx(wins / (len(pos) * len(neg)))
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0


def test_average_precision_by_hand():
    # ranked: + - + - -  -> precisions at positives 1/1 and 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert average_precision(scores, torch.tensor([1, 0, 1, 0, 0])) == pytest.approx((1 + 2 / 3) / 2)
    m, per = mean_average_precision(scores.view(5, 1).repeat(1, 2), torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0], [0, 1]]))
    assert per[1] == pytest.approx(1 / 5) and m == pytest.approx(((1 + 2 / 3) / 2 + 1 / 5) / 2)


def test_f1_and_balanced_accuracy():
    assert f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    pred, labels = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])
    assert balanced_accuracy(pred, labels, 2) == pytest.approx((1.0 + 0.5) / 2)


# Against scikit-learn, on seeded random cases; scores drawn from a few levels half the time, so that many tie.

def random_scores(g, shape, ties):
    if ties:
        return torch.randint(0, 4, shape, generator=g).double() / 4
    return torch.rand(shape, generator=g, dtype=torch.float64)


def both_classes(g, n):
    targets = torch.randint(0, 2, (n,), generator=g)
    targets[0], targets[1] = 0, 1
    return targets[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("seed", range(40))
def test_roc_auc_and_average_precision_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 50, (1,), generator=g))
    targets = both_classes(g, n)
    scores = random_scores(g, (n,), ties=seed % 2 == 0)
    assert roc_auc(scores, targets) == pytest.approx(sk.roc_auc_score(targets.numpy(), scores.numpy()), abs=1e-12)
    assert average_precision(scores, targets) == pytest.approx(
        sk.average_precision_score(targets.numpy(), scores.numpy()), abs=1e-12)


def test_average_precision_of_tied_scores_is_sklearns_step_wise_area():
    """Tied images enter the ranking together: one threshold at precision 1/2 and recall 1, whatever the order."""
    for targets in ([0, 1], [1, 0]):
        assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor(targets)) == pytest.approx(0.5)
    # + (+ - -) -: thresholds 0.9 (P 1, R 1/2) and 0.5 (P 2/4, R 1)
    scores, targets = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1]), torch.tensor([1, 0, 1, 0, 0])
    assert average_precision(scores, targets) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert average_precision(scores, targets) == pytest.approx(sk.average_precision_score(targets, scores))


@pytest.mark.parametrize("seed", range(20))
def test_mean_average_precision_matches_sklearn_macro(seed):
    g = torch.Generator().manual_seed(seed)
    n, labels = int(torch.randint(4, 40, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    targets = torch.stack([both_classes(g, n) for _ in range(labels)], dim=1)
    scores = random_scores(g, (n, labels), ties=seed % 2 == 0)
    m, per_label = mean_average_precision(scores, targets)
    expected = np.atleast_1d(sk.average_precision_score(targets.numpy(), scores.numpy(), average=None))
    assert per_label == pytest.approx(expected.tolist(), abs=1e-12)
    assert m == pytest.approx(sk.average_precision_score(targets.numpy(), scores.numpy(), average="macro"), abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(20))
def test_balanced_accuracy_matches_sklearn(seed):
    """Classes absent from the labels (here often one) are left out of the mean, as scikit-learn does."""
    g = torch.Generator().manual_seed(seed)
    classes = int(torch.randint(2, 7, (1,), generator=g))
    n = int(torch.randint(1, 40, (1,), generator=g))
    labels = torch.randint(0, classes - seed % 2, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.5, labels, torch.randint(0, classes, (n,), generator=g))
    assert balanced_accuracy(pred, labels, classes) == pytest.approx(
        sk.balanced_accuracy_score(labels.numpy(), pred.numpy()), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_binary_f1_and_micro_f1_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n, labels = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
    targets, pred = torch.randint(0, 2, (n, labels), generator=g), torch.randint(0, 2, (n, labels), generator=g)
    assert f1_score(pred, targets) == pytest.approx(
        sk.f1_score(targets.numpy(), pred.numpy(), average="micro", zero_division=1.0), abs=1e-12)
    assert f1_score(pred[:, :1], targets[:, :1]) == pytest.approx(
        sk.f1_score(targets[:, 0].numpy(), pred[:, 0].numpy(), zero_division=1.0), abs=1e-12)
    zeros = torch.zeros(n, dtype=torch.long)  # nothing positive, nothing predicted: 0 / 0
    assert f1_score(zeros, zeros) == sk.f1_score(zeros.numpy(), zeros.numpy(), zero_division=1.0) == 1.0
