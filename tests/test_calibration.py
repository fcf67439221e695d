"""Reliability bins, expected calibration error and per-class loss, against loops written from the formulas."""
import math

import torch
import torch.nn.functional as F

from simxent.calibration import class_probabilities, per_class, reliability


def ece_by_loop(probs, targets, bins):
    total, n = 0.0, len(targets)
    for b in range(bins):
        members = [i for i in range(n) if min(int(probs[i].max() * bins), bins - 1) == b]
        if members:
            conf = sum(probs[i].max().item() for i in members) / len(members)
            acc = sum(float(probs[i].argmax() == targets[i]) for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def test_ece_equals_the_formula_computed_slowly():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(300, 5, generator=g), dim=1)
    targets = torch.randint(0, 5, (300,), generator=g)
    rel = reliability(probs, targets, bins=10)
    assert math.isclose(rel["ece"], ece_by_loop(probs, targets, 10), abs_tol=1e-6)
    assert sum(rel["count"]) == 300


def test_calibrated_predictions_have_small_ece_and_overconfident_ones_do_not():
    """Labels drawn from the predicted distribution: calibrated by construction. Sharpening the same
    logits makes the probe overconfident and the ECE large."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20_000, 4, generator=g)
    probs = torch.softmax(logits, dim=1)
    targets = torch.multinomial(probs, 1, generator=g).squeeze(1)
    assert reliability(probs, targets)["ece"] < 0.02
    overconfident = torch.softmax(5 * logits, dim=1)
    assert reliability(overconfident, targets)["ece"] > 0.2


def test_confidence_of_one_lands_in_the_last_bin():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rel = reliability(probs, torch.tensor([0, 0]), bins=5)
    assert rel["count"] == [0, 0, 0, 0, 2] and rel["accuracy"][-1] == 0.5 and rel["confidence"][0] is None


def test_per_class_loss_is_the_cross_entropy_of_that_class_images():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 3, generator=g)
    targets = torch.randint(0, 3, (50,), generator=g)
    table = per_class(logits, targets, ["a", "b", "c"])
    for c, name in enumerate("abc"):
        mask = targets == c
        assert math.isclose(table[name]["loss"], F.cross_entropy(logits[mask], targets[mask]).item(), rel_tol=1e-5)
        assert math.isclose(table[name]["accuracy"], (logits[mask].argmax(1) == c).float().mean().item())
        assert table[name]["images"] == int(mask.sum())


def test_per_class_loss_counts_confidently_wrong_images_in_full():
    """Logits far apart put probabilities of 0 (or 1 - p of 0) in float32: the per-class loss must still be
    the cross entropy of the logits (120 for a logit 120 above the true class's), not a clamped log."""
    logits = torch.tensor([[0.0, 120.0], [50.0, 0.0], [0.0, 30.0]])
    targets = torch.tensor([0, 0, 1])
    table = per_class(logits, targets, ["a", "b"])
    assert math.isclose(table["a"]["loss"], F.cross_entropy(logits[:2], targets[:2]).item(), rel_tol=1e-6)
    assert table["a"]["loss"] > 59 and table["b"]["loss"] < 1e-6
    z, y = torch.tensor([[20.0], [30.0], [-5.0], [25.0]]), torch.tensor([0, 0, 0, 1])
    binary = per_class(z, y, ["dog", "cat"], "binary")
    want = F.binary_cross_entropy_with_logits(z[:3, 0], y[:3].float()).item()
    assert math.isclose(binary["dog"]["loss"], want, rel_tol=1e-6) and want > 16.6
    assert binary["cat"]["loss"] < 1e-6


def test_binary_probe_probabilities_are_sigmoid_pairs():
    logits = torch.tensor([[0.0], [2.0], [-1.0]])
    probs = class_probabilities(logits, "binary")
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(logits.flatten()))
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    table = per_class(logits, torch.tensor([0, 1, 0]), ["dog", "cat"], "binary")
    assert set(table) == {"dog", "cat"} and table["cat"]["accuracy"] == 1.0
