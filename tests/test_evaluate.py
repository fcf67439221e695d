"""kNN against brute force, the probe, class weights, and a frozen encoder that stays frozen."""
import math

import pytest
import torch
import torch.nn.functional as F

from simxent.augment import Normalize
from simxent.class_weights import ClassWeightError, class_weights, effective, rises_with_frequency
from simxent.evaluate import (LabelError, check_class_indices, classification_report, extract_features, knn_scores,
                              topk_accuracy, train_linear_probe)
from simxent.models import ConvNet


def knn_reference(bank, labels, query, C, k, T):
    """Brute-force weighted kNN with torch: cosine similarities, top-k, exp(s/T) votes."""
    sims = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    top, idx = sims.topk(k, dim=1)
    scores = torch.zeros(len(query), C)
    for q in range(len(query)):
        for s, i in zip(top[q], idx[q]):
            scores[q, labels[i]] += math.exp(s / T)
    return scores


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(100, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 4, (100,), generator=g)
    got = knn_scores(bank, labels, query, 4, k=7, temperature=0.1)
    torch.testing.assert_close(got, knn_reference(bank, labels, query, 4, 7, 0.1), rtol=1e-4, atol=1e-4)


def test_knn_leave_one_out_excludes_self():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(30, 5, generator=g)
    labels = torch.arange(30) % 3
    scores = knn_scores(bank, labels, bank, 3, k=1, temperature=0.1, exclude_self=True)
    sims = F.normalize(bank, dim=1) @ F.normalize(bank, dim=1).T
    sims.fill_diagonal_(-2)
    assert torch.equal(scores.argmax(1), labels[sims.argmax(1)])


def test_knn_k_larger_than_bank_is_clipped():
    bank = torch.eye(3)
    scores = knn_scores(bank, torch.tensor([0, 1, 2]), bank, 3, k=200)
    assert topk_accuracy(scores, torch.tensor([0, 1, 2])) == 1.0


def test_report_top5_and_per_class():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    r = classification_report(scores, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert r["top1"] == pytest.approx(2 / 3) and r["top5"] == 1.0
    assert r["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert r["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_balanced_weights_from_counts():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights("balanced", labels, ["a", "b", "c"])
    torch.testing.assert_close(w, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert class_weights("none", labels, ["a", "b", "c"]) is None
    with pytest.raises(ClassWeightError, match="no training images for class.*c"):
        class_weights("balanced", torch.tensor([0, 1]), ["a", "b", "c"])


def test_weight_files_are_keyed_by_class_name(tmp_path):
    classes = ["cat", "dog"]
    labels = torch.tensor([0, 1])
    f = tmp_path / "w.txt"
    f.write_text("# weights\ndog 3\ncat 1  # rare\n")  # by name, in any order
    torch.testing.assert_close(class_weights(str(f), labels, classes), torch.tensor([1.0, 3.0]))
    for text, match in [("2.0\n0.5\n", r"w.txt:1: expected '<class name> <weight>'"),
                        ("cat 1\ndog 0\n", "finite and > 0, got dog=0"), ("cat 1\ndog nan\n", "finite and > 0"),
                        ("cat -1\ndog 1\n", "finite and > 0"), ("cat 1\nbird 2\n", "unknown: bird; missing: dog"),
                        ("cat 1\ndog abc\n", "w.txt:2: cannot read a number")]:
        f.write_text(text)
        with pytest.raises(ClassWeightError, match=match):
            class_weights(str(f), labels, classes)
    with pytest.raises(ClassWeightError, match="no file"):
        class_weights(str(tmp_path / "missing.txt"), labels, classes)


def test_effective_number_weights():
    """Cui et al. 2019: w_c proportional to (1 - b) / (1 - b^n_c), summing to C; b = 0 is uniform, b -> 1 balanced."""
    counts = torch.tensor([1000, 100, 10])
    b = 0.99
    raw = torch.tensor([(1 - b) / (1 - b**n) for n in (1000, 100, 10)], dtype=torch.float64)
    torch.testing.assert_close(effective(counts, b), raw * 3 / raw.sum())
    torch.testing.assert_close(effective(counts, 0.0), torch.ones(3, dtype=torch.float64))
    labels = torch.repeat_interleave(torch.arange(3), counts)
    near_one = class_weights("effective", labels, ["a", "b", "c"], beta=0.999999)
    torch.testing.assert_close(near_one, class_weights("balanced", labels, ["a", "b", "c"]) * 3
                               / class_weights("balanced", labels, ["a", "b", "c"]).sum(), rtol=2e-3, atol=0)
    with pytest.raises(ClassWeightError, match="beta must lie in"):
        class_weights("effective", labels, ["a", "b", "c"], beta=1.0)


def test_weight_table_and_inverted_weights_warning(tmp_path, caplog):
    labels = torch.tensor([0] * 8 + [1] * 2)
    f = tmp_path / "w.txt"
    f.write_text("common 4\nrare 1\n")
    with caplog.at_level("INFO", logger="simxent"):
        class_weights(str(f), labels, ["common", "rare"])
    assert "common" in caplog.text and "8" in caplog.text and "inverted" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="simxent"):
        class_weights("balanced", labels, ["common", "rare"])
    assert "inverted" not in caplog.text
    assert not rises_with_frequency(torch.ones(3), torch.tensor([5, 3, 1]))


def test_label_checks_name_the_mistake():
    check_class_indices(torch.tensor([0, 2, 1]), 3)
    with pytest.raises(LabelError, match="one-hot matrix of shape \\(3, 3\\)"):
        check_class_indices(torch.eye(3, dtype=torch.long), 3)
    with pytest.raises(LabelError, match=r"must lie in \[0, 2\], found values in \[0, 3\]"):
        check_class_indices(torch.tensor([0, 3]), 3)
    with pytest.raises(LabelError, match="-1"):
        check_class_indices(torch.tensor([-1, 0]), 3)
    with pytest.raises(LabelError, match="integer class indices"):
        check_class_indices(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(LabelError, match="one-hot"):
        train_linear_probe(torch.randn(4, 2), F.one_hot(torch.tensor([0, 1, 2, 0]), 3), 3, epochs=1, progress=False)


def test_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 16, generator=g)
    probe = train_linear_probe(x, y, 3, epochs=100, progress=False)
    assert (probe(x).argmax(1) == y).float().mean() > 0.95


def test_class_weights_shift_the_probe_towards_the_weighted_class():
    """Overlapping classes, 9:1 imbalance: balanced weights raise the minority class's recall."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    x = torch.randn(1000, 2, generator=g) + y.unsqueeze(1).float() * 1.0
    plain = train_linear_probe(x, y, 2, epochs=50, progress=False)
    weighted = train_linear_probe(x, y, 2, epochs=50, weight=class_weights("balanced", y, ["a", "b"]), progress=False)
    recall = lambda p: (p(x).argmax(1)[y == 1] == 1).float().mean()  # noqa: E731
    assert recall(weighted) > recall(plain) + 0.2


def test_feature_extraction_leaves_encoder_untouched():
    """moco's sanity check, as a test: weights and BatchNorm statistics do not move."""
    torch.manual_seed(0)
    enc = ConvNet()
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randint(0, 256, (10, 16, 16, 3), dtype=torch.uint8)
    feats = extract_features(enc, x, Normalize((0.5,) * 3, (0.25,) * 3), torch.device("cpu"), batch_size=4,
                             progress=False)
    assert feats.shape == (10, 512) and enc.training
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_ivf_index_finds_most_true_neighbours():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(20, 16, generator=g)
    bank = centers[torch.randint(0, 20, (4000,), generator=g)] + 0.3 * torch.randn(4000, 16, generator=g)
    labels = torch.randint(0, 5, (4000,), generator=g)
    query = bank[:200] + 0.05 * torch.randn(200, 16, generator=g)
    exact = knn_scores(bank, labels, query, 5, k=10)
    approx = knn_scores(bank, labels, query, 5, k=10, index="ivf", nprobe=8)
    assert (exact.argmax(1) == approx.argmax(1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="unknown kNN index"):
        knn_scores(bank, labels, query, 5, index="hnsw")
