"""kNN against brute force, the probe, class weights, and a frozen encoder that stays frozen."""
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.preprocessing import StandardScaler

from simxent import figures
from simxent.augment import Normalize
from simxent.class_weights import ClassWeightError, class_weights, effective, rises_with_frequency
from simxent.evaluate import (LabelError, LinearProbe, check_class_indices, classification_report, extract_features,
                              knn_scores, standardisation, topk_accuracy, train_linear_probe)
from simxent.linear_eval import ProbeCurves, Targets, objective_label
from simxent.models import ConvNet
from simxent.monitor import Monitor


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
    """The formula's scores, each query's divided by exp(its largest similarity / T)."""
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(100, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 4, (100,), generator=g)
    got = knn_scores(bank, labels, query, 4, k=7, temperature=0.1)
    best = (F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T).max(dim=1).values
    expected = knn_reference(bank, labels, query, 4, 7, 0.1) / (best / 0.1).exp().unsqueeze(1)
    torch.testing.assert_close(got, expected.double(), rtol=1e-4, atol=1e-5)


def test_knn_memory_does_not_grow_with_queries_times_k_times_classes():
    """2,000 queries, k = 200 and 1,000 classes: a one-hot of the votes would peak at 6.4 GB (int64 and
    float64 copies); the scores themselves are 16 MB. Measured as the peak memory of a fresh process."""
    code = """
import resource, torch
from simxent.evaluate import knn_scores
g = torch.Generator().manual_seed(0)
bank, labels = torch.randn(4000, 16, generator=g), torch.randint(0, 1000, (4000,), generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scores = knn_scores(bank, labels, torch.randn(2000, 16, generator=g), 1000, k=200)
assert scores.shape == (2000, 1000) and (scores > 0).sum(1).le(200).all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(run.stdout.split()[-1]) < 400, run.stdout  # MB above the process's peak before the call


def test_knn_top5_counts_no_class_without_a_vote():
    """k = 1: one class has the only vote, and topk fills top-5 with tied zeros in its own order; those are
    not hits. Reference: the true class has a vote and fewer than five classes score above it."""
    bank, labels = torch.eye(8)[:1].repeat(10, 1), torch.zeros(10, dtype=torch.long)
    query, query_labels = torch.randn(16, 8), torch.arange(8).repeat(2)
    scores = knn_scores(bank, labels, query, 8, k=1)
    report = classification_report(scores, query_labels, list("abcdefgh"), floor=0.0)
    true = scores.gather(1, query_labels.unsqueeze(1))
    expected = ((true.squeeze(1) > 0) & ((scores > true).sum(1) < 5)).double().mean().item()
    assert report["top5"] == pytest.approx(expected) == pytest.approx(2 / 16)
    assert topk_accuracy(scores, query_labels, 5) > report["top5"]  # without the floor, tied zeros count


def test_knn_at_a_small_temperature_votes_without_overflow():
    """At T = 0.002 exp(cos / T) overflows float32 (cos > 0.18), and exp((cos - best) / T) underflows it for
    neighbours 0.18 below the best: the scores stay finite, rank the classes as the float64 formula does, and
    no class with a neighbour among the k scores 0."""
    g = torch.Generator().manual_seed(3)
    bank, query = torch.randn(200, 4, generator=g), torch.randn(50, 4, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    got = knn_scores(bank, labels, query, 5, k=20, temperature=0.002)
    sims = F.normalize(query.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    top, idx = sims.topk(20, dim=1)
    exact = torch.zeros(50, 5, dtype=torch.float64).scatter_add_(1, labels[idx], ((top - top[:, :1]) / 0.002).exp())
    assert torch.isfinite(got).all() and torch.equal(got.argmax(1), exact.argmax(1))
    assert torch.equal(got > 0, exact > 0) and (exact > 0).sum() > 50


def test_knn_leave_one_out_excludes_self():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(30, 5, generator=g)
    labels = torch.arange(30) % 3
    scores = knn_scores(bank, labels, bank, 3, k=1, temperature=0.1, exclude_self=True)
    sims = F.normalize(bank, dim=1) @ F.normalize(bank, dim=1).T
    sims.fill_diagonal_(-2)
    assert torch.equal(scores.argmax(1), labels[sims.argmax(1)])


def test_top5_against_scikit_learn():
    from sklearn.metrics import top_k_accuracy_score
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(40, 7, generator=g), torch.randint(0, 7, (40,), generator=g)
    r = classification_report(scores, labels, list("abcdefg"))
    assert r["top5"] == pytest.approx(top_k_accuracy_score(labels.numpy(), scores.numpy(), k=5, labels=range(7)))
    assert r["top5"] < 1.0


def test_results_table_leaves_out_top5_for_five_classes():
    from simxent.linear_eval import format_results
    row = {"linear": {"top1": 0.5, "top5": None, "balanced_accuracy": 0.4}, "knn": {"top1": 0.3, "top5": None}}
    table = format_results({"objective": "multiclass", "pretrained": row, "random_init": row})
    assert "top5" not in table and "linear top1" in table and "knn top1" in table
    assert table.splitlines()[1].split() == ["pretrained", "0.5000", "0.4000", "0.3000"]


def test_knn_k_larger_than_bank_is_clipped():
    bank = torch.eye(3)
    scores = knn_scores(bank, torch.tensor([0, 1, 2]), bank, 3, k=200)
    assert topk_accuracy(scores, torch.tensor([0, 1, 2])) == 1.0


def test_knn_neighbours_an_ivf_search_did_not_find_vote_for_no_class(monkeypatch):
    """FAISS fills what an IVF search did not find with index -1 and similarity -FLT_MAX: read as the bank's
    last label, and for a query that found nothing each at weight exp(0) = 1, they voted for that label."""
    import numpy as np

    import simxent.evaluate as evaluate

    class Partial:  # the first query finds the bank's first vector only, the second finds nothing
        def search(self, query, k):
            sims = np.full((2, k), -np.finfo(np.float32).max, dtype=np.float32)
            idx = np.full((2, k), -1, dtype=np.int64)
            sims[0, 0], idx[0, 0] = 1.0, 0
            return sims, idx
    monkeypatch.setattr(evaluate, "build_index", lambda *args: Partial())
    scores = knn_scores(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3)[:2], 3, k=3, index="ivf")
    assert scores.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_top1_counts_the_prediction_the_confusion_matrix_counts_when_classes_tie():
    """Two classes tied for the most votes (an image filed under two classes, a collapsed encoder): top-1,
    per-class accuracy and the confusion matrix judge the same prediction, the first of the tied classes."""
    scores = torch.tensor([[2.0, 2.0, 0.0, 0.0]] * 3 + [[0.0, 0.0, 1.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 2])
    r = classification_report(scores, labels, ["a", "b", "c", "d"])
    assert r["top1"] == pytest.approx(torch.tensor(r["confusion"]).trace().item() / len(labels)) == 0.5
    assert r["per_class"] == {"a": 1.0, "b": 0.0, "c": 1.0, "d": None}


def test_report_top5_and_per_class():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    r = classification_report(scores, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert r["top1"] == pytest.approx(2 / 3)
    assert r["top5"] is None  # three classes: every image would count as right, so it is not reported
    assert r["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    # a class with no test image has no accuracy (not 0)
    assert classification_report(scores[:2], torch.tensor([0, 1]), ["a", "b", "c"])["per_class"]["c"] is None
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
    with pytest.raises(ClassWeightError, match="class-weight file not found"):
        class_weights(str(tmp_path / "missing.txt"), labels, classes)
    # Names with spaces or a '#' (the folders of ImageNet-style data sets), and Notepad's byte-order mark.
    classes = ["golden retriever", "cat#2"]
    f.write_text("\ufeff# weights\ngolden retriever  2.5   # common\ncat#2 1#rare\n", encoding="utf-8")
    torch.testing.assert_close(class_weights(str(f), labels, classes), torch.tensor([2.5, 1.0]))


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


def features_with_constant_columns(n, g, constants):
    """Ordinary features at scales from 1e-2 to 1e2, then columns fixed at ``constants``."""
    scale, shift = torch.tensor([1e-2, 1.0, 30.0, 1e2]), torch.tensor([0.0, 2.0, -5.0, 40.0])
    ordinary = torch.randn(n, 4, generator=g) * scale + shift
    return torch.cat([ordinary, torch.tensor(constants).expand(n, len(constants))], dim=1)


def test_standardisation_matches_sklearn_standard_scaler_with_constant_features():
    """A feature constant over the training images gets scale 1, so a test value off that constant moves
    its standardised value by the same amount, not by a million times it."""
    g = torch.Generator().manual_seed(0)
    train = features_with_constant_columns(50, g, [0.0, 3.7])
    test = features_with_constant_columns(20, g, [0.0, 3.7]) + torch.tensor([0.0] * 4 + [0.01, 0.2])
    probe = LinearProbe(*standardisation(train), 2)
    scaler = StandardScaler().fit(train.double().numpy())
    for x in (train, test):
        expected = torch.from_numpy(scaler.transform(x.double().numpy())).float()
        torch.testing.assert_close(probe.standardise(x), expected, rtol=1e-5, atol=1e-5)
    assert probe.scale[4:].tolist() == [1.0, 1.0]


def test_standardisation_and_logits_in_blocks_of_rows(monkeypatch):
    """Blocks of 7 rows give the statistics and logits of the whole matrix; and the memory of fitting
    300,000 x 256 float32 features (300 MB) stays within one block's float64 copies, far below the three
    whole float64 copies (1.8 GB) of an unblocked fit, measured as a fresh process's peak."""
    from simxent import evaluate
    g = torch.Generator().manual_seed(0)
    x = features_with_constant_columns(50, g, [0.0, 3.7])
    whole = standardisation(x)
    monkeypatch.setattr(evaluate, "ROW_BLOCK", 7)
    for a, b in zip(standardisation(x), whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    probe = LinearProbe(*whole, 3)
    with torch.no_grad():
        torch.testing.assert_close(evaluate.probe_logits(probe, x), probe(x))
    code = """
import resource, torch
from simxent.evaluate import standardisation
x = torch.randn(300_000, 256)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mean, scale = standardisation(x)
assert mean.abs().max() < 0.02 and (scale - 1).abs().max() < 0.02
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(run.stdout.split()[-1]) < 600, run.stdout  # MB above the peak before the fit


def test_near_constant_features_get_scale_one():
    """Below a millionth of the features' size (here a std of 1e-9 beside features of size 1 to 100) a
    feature is constant, wherever it sits; above that it is standardised as usual."""
    g = torch.Generator().manual_seed(1)
    train = features_with_constant_columns(50, g, [0.0, 5.0, 0.0])
    train[:, 4:6] += 1e-9 * torch.randn(50, 2, generator=g, dtype=torch.float64).float()
    train[:, 6] += 1e-3 * torch.randn(50, generator=g)
    mean, scale = standardisation(train)
    assert scale[4:6].tolist() == [1.0, 1.0]
    torch.testing.assert_close(scale[[0, 1, 2, 3, 6]], train[:, [0, 1, 2, 3, 6]].std(0, correction=0))
    # Rescaling every feature changes no decision: standardised features are the same.
    mean_small, scale_small = standardisation(train * 1e-6)
    torch.testing.assert_close(((train * 1e-6 - mean_small) / scale_small)[:, :4], ((train - mean) / scale)[:, :4])
    assert scale_small[4:6].tolist() == [1.0, 1.0]


def test_a_feature_constant_in_training_cannot_take_over_the_probe():
    """Three separable classes plus one unit that never fires on the training images but fires slightly
    (0.05) on half the test images: those images must be classified as well as the others."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4

    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return torch.cat([centers[y] + torch.randn(n, 8, generator=g), torch.zeros(n, 1)], dim=1), y

    (train_x, train_y), (test_x, test_y) = split(300), split(200)
    test_x[::2, 8] = 0.05
    probe = train_linear_probe(train_x, train_y, 3, epochs=30, progress=False)
    correct = probe(test_x).argmax(1) == test_y
    assert correct[::2].float().mean() >= 0.95 and correct[1::2].float().mean() >= 0.95


def test_class_weights_shift_the_probe_towards_the_weighted_class():
    """Overlapping classes, 9:1 imbalance: balanced weights raise the minority class's recall."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    x = torch.randn(1000, 2, generator=g) + y.unsqueeze(1).float() * 1.0
    plain = train_linear_probe(x, y, 2, epochs=50, progress=False)
    weighted = train_linear_probe(x, y, 2, epochs=50, weight=class_weights("balanced", y, ["a", "b"]), progress=False)
    recall = lambda p: (p(x).argmax(1)[y == 1] == 1).float().mean()  # noqa: E731
    assert recall(weighted) > recall(plain) + 0.2


def test_probe_curves_record_plain_cross_entropy_apart_from_the_objective():
    """With class weights and label smoothing on, the recorded train and test CE are the plain cross entropy
    of the probe's logits on each split (comparable with each other); the objective is recorded apart."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g)

    def split(n):
        y = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), n, replacement=True, generator=g)
        return centers[y] + torch.randn(n, 6, generator=g), y

    (train_x, train_y), (test_x, test_y) = split(200), split(60)
    weight = class_weights("balanced", train_y, ["a", "b", "c"])
    curves = ProbeCurves(train_x, test_x, Targets("multiclass", ["a", "b", "c"], train_y, test_y), weight, 0.2)
    probe = train_linear_probe(train_x, train_y, 3, epochs=4, weight=weight, label_smoothing=0.2,
                               on_epoch=curves.record, progress=False)
    history = curves.history
    assert history["epoch"] == [0, 1, 2, 3]
    assert set(history) == {"epoch", "train_ce", "test_ce", "train_objective", "train_accuracy", "test_accuracy"}
    with torch.no_grad():
        train_logits, test_logits = probe(train_x), probe(test_x)
    train_ce = F.cross_entropy(train_logits, train_y).item()
    objective = F.cross_entropy(train_logits, train_y, weight=weight, label_smoothing=0.2).item()
    assert history["train_ce"][-1] == pytest.approx(train_ce, rel=1e-6)
    assert history["test_ce"][-1] == pytest.approx(F.cross_entropy(test_logits, test_y).item(), rel=1e-6)
    assert history["train_objective"][-1] == pytest.approx(objective, rel=1e-6)
    assert abs(objective - train_ce) > 0.05
    assert history["test_accuracy"][-1] == pytest.approx((test_logits.argmax(1) == test_y).float().mean().item())


def test_binary_probe_curves_record_plain_bce_apart_from_the_positive_weighted_objective():
    g = torch.Generator().manual_seed(1)
    train_y, test_y = ((torch.rand(n, 1, generator=g) < 0.2).long() for n in (100, 40))
    train_x = train_y.float() + torch.randn(100, 4, generator=g)
    test_x = test_y.float() + torch.randn(40, 4, generator=g)
    pos_weight = torch.tensor([4.0])
    curves = ProbeCurves(train_x, test_x, Targets("binary", ["yes"], train_y, test_y), pos_weight)
    probe = train_linear_probe(train_x, train_y, 1, epochs=3, weight=pos_weight, on_epoch=curves.record,
                               progress=False, objective="binary")
    with torch.no_grad():
        logits = probe(train_x)
    plain = F.binary_cross_entropy_with_logits(logits, train_y.float()).item()
    weighted = F.binary_cross_entropy_with_logits(logits, train_y.float(), pos_weight=pos_weight).item()
    assert curves.history["train_ce"][-1] == pytest.approx(plain, rel=1e-6)
    assert curves.history["train_objective"][-1] == pytest.approx(weighted, rel=1e-6) and weighted > plain + 0.05


def test_probe_curve_figure_names_each_curve():
    history = {"epoch": [0, 1], "train_ce": [1.0, 0.8], "test_ce": [1.1, 0.9], "train_objective": [1.2, 1.0],
               "train_accuracy": [0.5, 0.6], "test_accuracy": [0.4, 0.5]}
    label = objective_label(torch.ones(3), 0.1, multiclass=True)
    assert label == "train objective (weighted, smoothed)"
    fig = figures.probe_curves(history, "pretrained: linear probe", label)
    assert [ax.get_title() for ax in fig.axes] == ["plain cross entropy (train and test)", "training objective",
                                                   "accuracy"]
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes] == [
        ["train CE", "test CE"], ["train objective (weighted, smoothed)"], ["train", "test"]]
    assert fig.axes[1].get_lines()[0].get_ydata().tolist() == [1.2, 1.0]
    assert all(line.get_marker() == "o" for ax in fig.axes for line in ax.get_lines())  # one epoch: a point each
    assert objective_label(None, 0.0, multiclass=True) == "train objective (= train CE)"
    assert objective_label(None, 0.1, multiclass=False) == "train objective (= train CE)"  # no smoothing for BCE


def test_the_reliability_gap_spans_accuracy_to_confidence_either_way_up():
    rel = {"bins": 4, "accuracy": [None, 0.2, 0.7, 0.9], "confidence": [None, 0.4, 0.6, 0.9], "count": [0, 3, 3, 3],
           "ece": 0.1}
    ax = figures.reliability_diagram(rel).axes[0]
    gap = [p for p in ax.patches if p.get_hatch()]  # the accuracy bars are filled, the gaps hatched
    assert [(round(p.get_y(), 6), round(p.get_height(), 6)) for p in gap] == [(0, 0), (0.2, 0.2), (0.6, 0.1), (0.9, 0)]


def test_figures_leave_the_callers_matplotlib_backend_and_pyplot_alone(tmp_path):
    """``import simxent`` in a notebook: its inline backend (here svg, chosen by the caller) stays, and
    simxent's figures join no pyplot window list, while each still saves a PNG without a display."""
    code = ("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt; import simxent\n"
            "from simxent import figures\n"
            "fig = figures.similarity_over_time([{'step': 1, 'pos': [0.1, 0.5, 0.9], 'neg': [-0.2, 0.0, 0.2]}])\n"
            f"figures.save(fig, {str(tmp_path / 'bars.png')!r})\n"
            "print(matplotlib.get_backend(), len(plt.get_fignums()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["svg", "0"], done.stderr
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_figure_is_drawn_once_at_its_size_for_the_png_and_tensorboard(tmp_path, monkeypatch):
    """render's pixels are the figure at DPI; save writes exactly them, and the monitor logs exactly them."""
    from matplotlib.figure import Figure
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig = figures.confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], "probe")
    draws, original = [], Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: draws.append(1) or original(self, renderer))
    pixels = figures.render(fig)
    assert len(draws) == 1
    width, height = fig.get_size_inches() * figures.DPI
    assert pixels.dtype == np.uint8 and pixels.shape == (round(height), round(width), 3)
    assert pixels.min() < 50 and pixels.max() == 255  # drawn: dark text on white
    figures.save(pixels, tmp_path / "cm.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cm.png")), pixels)
    monitor = Monitor(tmp_path / "tb")
    monitor.figure("cm", pixels, 3)
    monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("cm")
    assert image.step == 3
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), pixels)
    assert len(draws) == 1


@pytest.mark.parametrize("n, length", [(2, 35), (3, 60), (10, 12)])
def test_long_class_names_grow_the_figure_and_stay_inside_it(n, length):
    """A binary probe's two folder names can be long: the figure grows to hold them, where a fixed size
    shrank the matrix to a sliver and left the names, or the title, cut off at the edge."""
    names = [f"{i}_" + "patient_scan_posteroanterior_view_" * 2 for i in range(n)]
    names = [name[:length] for name in names]
    short = figures.confusion_matrix(np.eye(n), [str(i) for i in range(n)], "pretrained: linear probe")
    for fig in (figures.confusion_matrix(np.eye(n), names, "pretrained: linear probe"),
                figures.per_class_bars({c: {"loss": 1.0, "accuracy": 0.5} for c in names}, "pretrained: linear probe"),
                figures.per_label_ap_bars(dict.fromkeys(names, 0.5), [0.1] * n, "pretrained: linear probe")):
        figures.render(fig)
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())
        width, height = fig.get_size_inches()
        assert drawn.x0 >= -0.02 and drawn.y0 >= -0.02 and drawn.x1 <= width + 0.02 and drawn.y1 <= height + 0.02
    long = figures.confusion_matrix(np.eye(n), names)
    for fig in (short, long):
        figures.render(fig)
    assert long.axes[0].get_window_extent().width >= 0.9 * short.axes[0].get_window_extent().width  # not a sliver


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    """Between two "$" matplotlib reads math notation: such a class or folder name failed to parse when the
    figure was saved, after the probe had trained, and the evaluation stopped before writing its JSON."""
    names = ["price_$1_to_$5", "price_$5_to_$10"]
    cm = figures.confusion_matrix([[3, 1], [0, 4]], names, "run_$a$: linear probe")
    figures.save(cm, tmp_path / "confusion.png")
    bars = figures.per_class_bars({n: {"loss": 0.5, "accuracy": 0.5} for n in names}, "run_$a$")
    figures.save(bars, tmp_path / "bars.png")
    drawn = [t.get_text() for t in cm.axes[0].get_xticklabels()]
    assert [t.replace("\\$", "$") for t in drawn] == names and all(t.count("$") == t.count("\\$") for t in drawn)


def test_figures_of_many_classes_stop_growing_and_drop_the_names(tmp_path):
    """At 0.45 inch per class a 1,000-class confusion matrix would be a 452-inch (gigapixel) image, and its
    counts a million-cell TensorBoard table: beyond NAMED_CLASSES classes the figures keep that size, with
    class indices for names, and the counts stay in the results' JSON."""
    n = 200  # 92 inches at 0.45 each
    names = [f"class{i}" for i in range(n)]
    cm = figures.confusion_matrix(torch.eye(n).numpy(), names)
    assert max(cm.get_size_inches()) <= 0.45 * figures.NAMED_CLASSES + 2
    assert not any(t.get_text().startswith("class") for t in cm.axes[0].get_xticklabels() + cm.axes[0].get_yticklabels())
    bars = figures.per_class_bars({c: {"loss": 1.0, "accuracy": 0.5} for c in names})
    assert bars.get_size_inches()[0] <= 0.6 * figures.NAMED_CLASSES + 3
    empty = figures.per_class_bars({"cat": {"loss": 0.5, "accuracy": 0.0}, "dog": {"loss": None, "accuracy": None}})
    heights = [[p.get_height() for p in ax.patches] for ax in empty.axes]  # cat always wrong; dog: no test image
    assert heights[1][0] == 0.0 and all(math.isnan(h[1]) for h in heights)
    ap = figures.per_label_ap_bars({c: 0.5 for c in names}, [0.1] * n)
    assert ap.get_size_inches()[0] <= 0.4 * figures.NAMED_CLASSES + 2
    ap = figures.per_label_ap_bars({"cat": 0.75, "dog": None}, [0.25, 0.0]).axes[0]  # dog: no test positive
    assert ap.patches[0].get_height() == 0.75 and math.isnan(ap.patches[1].get_height())
    assert ap.collections[0].get_offsets()[:, 1].tolist() == [0.25, 0.0]  # a ranking at random: the positive share
    few = figures.confusion_matrix(torch.eye(3).numpy(), ["cat", "dog", "eel"])
    assert [t.get_text() for t in few.axes[0].get_xticklabels()] == ["cat", "dog", "eel"]
    monitor, texts = Monitor(tmp_path / "tb"), []
    monitor.writer.add_text = lambda tag, text, step: texts.append(tag)
    monitor.confusion("probe/confusion", torch.eye(3), ["cat", "dog", "eel"])
    monitor.confusion("probe/confusion", torch.eye(n), names)
    monitor.close()
    assert texts == ["probe/confusion_counts"]  # the 3-class table only


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
