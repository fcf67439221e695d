"""Probe metrics against their definitions, computed the slow way."""
import itertools

import pytest
import torch

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
