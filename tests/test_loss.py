"""NT-Xent against a loop written from the formula, and its gradient against float64 autograd."""
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from simxent.config import LEARNT_TEMPERATURE_RANGE
from simxent.loss import SYMMETRIC_MAX_INV_T, Temperature, contrastive_stats, nt_xent, symmetric_nt_xent

# One process on a CPU takes the symmetric form; any gather (here one that returns its input, as a single
# process would) takes the one-matrix form that data parallelism and GPUs use. Both must be the same loss.
FORMS = {"symmetric": {}, "one_matrix": {"gather": lambda z: z}}


def nt_xent_reference(z1, z2, t):
    """SimCLR Algorithm 1 as a loop: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), averaged over
    all 2N ordered positive pairs."""
    z = torch.cat([z1, z2])
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sim = lambda a, b: torch.dot(z[a], z[b]) / (z[a].norm() * z[b].norm())  # noqa: E731
        denominator = sum(torch.exp(sim(i, k) / t) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(sim(i, j) / t) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n,d,t", [(1, 4, 0.5), (2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (3, 128, 0.07)])
def test_matches_formula(n, d, t, form):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = nt_xent_reference(z1, z2, t)
    got = nt_xent(z1.float(), z2.float(), t, **FORMS[form])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_public_symmetric_form_matches_formula_and_its_temperature_gradient():
    """symmetric_nt_xent on [z1; z2] at 1/t: the formula's loss, and d/d(1/t) from float64 autograd."""
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    inv_t = torch.tensor(1 / 0.2, dtype=torch.float64, requires_grad=True)
    reference = nt_xent_reference(z1, z2, 1 / inv_t)
    (expected,) = torch.autograd.grad(reference, inv_t)
    inv_t32 = inv_t.detach().float().requires_grad_()
    got = symmetric_nt_xent(torch.cat([z1, z2]).float(), inv_t32)
    got.backward()
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    assert inv_t32.grad.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_gradient_matches_float64_autograd(form):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    nt_xent_reference(z1, z2, 0.2).backward()
    a, b = z1.detach().float().requires_grad_(), z2.detach().float().requires_grad_()
    nt_xent(a, b, 0.2, **FORMS[form]).backward()
    torch.testing.assert_close(a.grad.double(), z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), z2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3, **FORMS[form]), (z1, z2))


@pytest.mark.parametrize("t", [1 / SYMMETRIC_MAX_INV_T, 0.01])
def test_low_temperatures_with_an_outlier_keep_float32_precision(t):
    """The symmetric form's exp(S - 1/t) reaches exp(-2/t) for a view opposite to all others; at its
    limit that must stay a normal float, and below it (t = 0.01) the one-matrix form takes over."""
    g = torch.Generator().manual_seed(9)
    z1 = torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.1 + 1  # one tight cluster ...
    z2 = z1 + 0.01 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    z1[0] = -z1[0]  # ... and one view opposite to it
    z1.requires_grad_()
    expected = nt_xent_reference(z1, z2, t)
    (want,) = torch.autograd.grad(expected, z1)
    a = z1.detach().float().requires_grad_()
    got = nt_xent(a, z2.float(), t)
    (grad,) = torch.autograd.grad(got, a)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), want, rtol=1e-3, atol=1e-5)


def test_perfect_views_give_lower_loss_than_random():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 32, generator=g)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(16, 32, generator=g), 0.1)


def test_sharded_batch_with_gather_equals_whole_batch():
    """Two 'processes' each hold half the images; with the gathered candidates the mean of their losses
    is the loss of one process holding everything (the distributed path without processes)."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    whole = nt_xent(z1, z2, 0.5)
    shards = [(z1[:4], z2[:4]), (z1[4:], z2[4:])]
    everyone = torch.cat([F.normalize(torch.cat(s), dim=1) for s in shards])
    losses = [nt_xent(a, b, 0.5, gather=lambda _: everyone, rank=r) for r, (a, b) in enumerate(shards)]
    assert (sum(losses) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_learnable_temperature_gradient(form):
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    temp = Temperature(0.3, learnable=True).double()
    assert temp().item() == pytest.approx(0.3)
    nt_xent(z1, z2, temp(), **FORMS[form]).backward()
    log_t = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
    nt_xent_reference(z1, z2, log_t.exp()).backward()
    assert temp.log_t.grad.item() == pytest.approx(log_t.grad.item(), rel=1e-6)
    fixed = Temperature(0.3)
    assert not any(True for _ in fixed.parameters())


@pytest.mark.parametrize("anchors", [None, 2], ids=["all", "first-two-images"])
def test_stats_against_direct_computation(anchors):
    """Every view as an anchor, or (the main process under torchrun) the first images' views only, each
    against every other view."""
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    s = contrastive_stats(z1, z2, anchors)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2, a = len(z), anchors or 6
    rows = [i for i in range(n2) if i % 6 < a]
    pos = [(i, (i + 6) % 12) for i in rows]
    assert s["pos_sim"] == pytest.approx(sum(float(z[i] @ z[j]) for i, j in pos) / len(pos), abs=1e-6)
    assert s["alignment"] == pytest.approx(sum(float((z[i] - z[j]).pow(2).sum()) for i, j in pos) / len(pos),
                                           abs=1e-5)
    pairs = [(i, j) for i in rows for j in range(n2) if i != j]
    uniform = math.log(sum(math.exp(-2 * float((z[i] - z[j]).pow(2).sum())) for i, j in pairs) / len(pairs))
    assert s["uniformity"] == pytest.approx(uniform, abs=1e-5)
    negs = [float(z[i] @ z[j]) for i, j in pairs if abs(i - j) != 6]
    assert s["neg_sim"] == pytest.approx(sum(negs) / len(negs), abs=1e-6)
    top1 = sum(int(max((k for k in range(n2) if k != i), key=lambda k: float(z[i] @ z[k])) == j) for i, j in pos)
    assert s["top1"] == pytest.approx(top1 / len(pos))
    same = contrastive_stats(z1, z1)
    assert same["pos_sim"] == pytest.approx(1.0, abs=1e-6) and same["top1"] == 1.0
    assert same["alignment"] == pytest.approx(0.0, abs=1e-6)


def test_equals_the_two_block_formulation_and_keeps_no_more_memory():
    """The common form (per view: [a-vs-other, a-vs-self masked]) gives the same loss and gradients, and
    autograd keeps at least as much for its backward as the fused loss does."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True)

    def two_block_loss():
        an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
        mask = torch.eye(64, dtype=torch.float64) * 1e9
        labels = torch.arange(64)
        return (F.cross_entropy(torch.cat([an @ bn.T / 0.2, an @ an.T / 0.2 - mask], 1), labels)
                + F.cross_entropy(torch.cat([bn @ an.T / 0.2, bn @ bn.T / 0.2 - mask], 1), labels)) / 2

    two_block = two_block_loss()
    grads = torch.autograd.grad(two_block, (a, b))
    for form in FORMS.values():
        ours = nt_xent(a, b, 0.2, **form)
        torch.testing.assert_close(ours, two_block, rtol=1e-12, atol=1e-12)
        for mine, theirs in zip(torch.autograd.grad(ours, (a, b)), grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)

    def saved_bytes(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values())

    for form in FORMS.values():
        assert saved_bytes(lambda: nt_xent(a, b, 0.2, **form)) <= saved_bytes(two_block_loss)


def test_a_one_process_training_step_takes_the_symmetric_form():
    from simxent.train import step_loss

    loss, _, _ = step_loss(torch.nn.Linear(8, 4), torch.randn(6, 8), torch.tensor(0.5), torch.device("cpu"), torch.bfloat16)
    assert "Symmetric" in loss.grad_fn.name()
    z = torch.randn(6, 4, requires_grad=True)
    assert "Symmetric" not in nt_xent(z[:3], z[3:], 0.5, **FORMS["one_matrix"]).grad_fn.name()


@pytest.mark.parametrize("form", FORMS)
def test_inside_bf16_autocast_the_loss_and_gradients_stay_float32(form):
    """At t = 0.05 logits reach 20, where bf16 keeps steps of 0.125: a loss computed in bf16 comes out
    near 0 or negative. Called, and differentiated, inside a CPU autocast region, the loss must equal its
    float32 value and a float64 reference, gradients (the temperature's included) too."""
    g = torch.Generator().manual_seed(10)
    z1 = torch.randn(8, 16, generator=g, dtype=torch.float64)
    z2 = z1 + 1.5 * torch.randn(8, 16, generator=g, dtype=torch.float64)  # a loss near 1 at t = 0.05
    ref_inputs = [z1.clone().requires_grad_(), z2.clone().requires_grad_(), torch.tensor(0.05, dtype=torch.float64,
                                                                                          requires_grad=True)]
    expected = nt_xent_reference(*ref_inputs)
    expected.backward()

    def float32_loss_and_grads(autocast: bool):
        inputs = [x.detach().float().requires_grad_() for x in ref_inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nt_xent(*inputs, **FORMS[form])
            loss.backward()
        return loss, [x.grad for x in inputs]

    plain, plain_grads = float32_loss_and_grads(autocast=False)
    inside, inside_grads = float32_loss_and_grads(autocast=True)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(plain.item(), rel=1e-5)
    assert inside.item() == pytest.approx(expected.item(), rel=1e-5)
    for mine, flat, want in zip(inside_grads, plain_grads, (x.grad for x in ref_inputs)):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, flat, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", [((4, 8), (3, 8)), ((4, 8), (4, 6)), ((8,), (8,))])
def test_views_of_different_shapes_are_refused(shapes, form):
    """Row i of z1 and of z2 are the two views of image i: a mismatch would pair the wrong rows."""
    z1, z2 = torch.randn(shapes[0]), torch.randn(shapes[1])
    both = re.escape(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}")
    with pytest.raises(ValueError, match=both):
        nt_xent(z1, z2, 0.5, **FORMS[form])


def test_learnt_temperature_is_projected_into_its_range_and_moves_off_a_bound():
    lo, hi = LEARNT_TEMPERATURE_RANGE
    temp = Temperature(0.5, learnable=True)
    for outside, bound in ((1e-4, lo), (3.6e10, hi)):
        with torch.no_grad():
            temp.log_t.fill_(math.log(outside))
        assert temp().item() == pytest.approx(bound, rel=1e-6)
        assert temp.log_t.item() == pytest.approx(math.log(bound))  # the parameter itself, not only t
    # At the lower bound: a loss that wants t smaller still has its plain gradient d(t)/d(log t) = t; the
    # step outwards is undone at the next call, while a loss that wants t larger moves t off the bound.
    opt = torch.optim.SGD(temp.parameters(), lr=1.0)
    for sign, moved_off in ((1, False), (-1, True)):
        with torch.no_grad():
            temp.log_t.fill_(math.log(lo))
        opt.zero_grad()
        (sign * temp()).backward()
        assert temp.log_t.grad.item() == pytest.approx(sign * lo)
        opt.step()
        assert (temp().item() > lo * (1 + 1e-6)) is moved_off
    with pytest.raises(ValueError, match="learnt temperature"):
        Temperature(2.0, learnable=True)
    assert Temperature(2.0)().item() == pytest.approx(2.0)  # a fixed temperature is the user's to choose


# --- several views per image, and labels (supervised contrastive) ---------------------------------------

def multi_positive_reference(z, groups, t, decoupled=False):
    """The multi-positive cross entropy as a loop, from its formula: for each anchor i with positives
    P(i) = {p != i: same group}, -(1/|P(i)|) sum_p log( exp(s_ip/t) / sum_{a != i} exp(s_ia/t) ), averaged
    over the anchors that have positives. Decoupled (DCL): the sum runs over the negatives a (other
    groups) only, and an anchor without negatives is left out too."""
    sim = lambda a, b: torch.dot(z[a], z[b]) / (z[a].norm() * z[b].norm())  # noqa: E731
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and groups[p] == groups[i]]
        negatives = [a for a in range(len(z)) if groups[a] != groups[i]]
        if not positives or (decoupled and not negatives):
            continue
        denominator = sum(torch.exp(sim(i, a) / t) for a in (negatives if decoupled else
                                                              [a for a in range(len(z)) if a != i]))
        total = total - sum(torch.log(torch.exp(sim(i, p) / t) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def view_groups(n, n_views, labels=None):
    """The group of each row of a view-major (V n, D) batch: its image's index, or its image's label."""
    return (list(range(n)) if labels is None else list(labels)) * n_views


LABELS = [0, 1, 0, 2, 1, 0]  # six images of three classes, each class at least twice


@pytest.mark.parametrize("decoupled", [False, True], ids=["nt-xent", "decoupled"])
@pytest.mark.parametrize("labelled", [False, True], ids=["views", "labels"])
@pytest.mark.parametrize("n_views", [2, 3, 6])
def test_multi_view_matches_the_formula_loop(n_views, labelled, decoupled):
    from simxent.loss import multi_view_nt_xent

    n, t = len(LABELS), 0.3
    g = torch.Generator().manual_seed(20 + n_views)
    z = torch.randn(n_views * n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(LABELS) if labelled else None
    log_t = torch.tensor(math.log(t), dtype=torch.float64, requires_grad=True)
    expected = multi_positive_reference(z, view_groups(n, n_views, labels), log_t.exp(), decoupled)
    want_z, want_t = torch.autograd.grad(expected, (z, log_t))
    for form in FORMS.values():
        mine_z = z.detach().clone().requires_grad_()
        mine_t = log_t.detach().clone().requires_grad_()
        got = multi_view_nt_xent(mine_z, n_views, mine_t.exp(), labels=labels, decoupled=decoupled, **form)
        got_z, got_t = torch.autograd.grad(got, (mine_z, mine_t))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_z, want_z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_t, want_t, rtol=1e-6, atol=1e-6)
        # In float32 too, as training runs it.
        z32 = z.detach().float().requires_grad_()
        got32 = multi_view_nt_xent(z32, n_views, t, labels=labels, decoupled=decoupled, **form)
        (grad32,) = torch.autograd.grad(got32, z32)
        assert got32.item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(grad32.double(), want_z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_views,n_full", [(2, None), (3, None), (3, 1), (3, 2), (6, None), (6, 1), (6, 2)])
def test_pairwise_matches_the_formula_loop(n_views, n_full):
    """The mean of NT-Xent over pairs of views, against the two-view formula loop on each pair: every pair
    a < b, or (multi-crop) those whose first view is one of the first ``n_full`` (full-size) views."""
    from simxent.loss import pairwise_nt_xent

    n, t = 5, 0.3
    g = torch.Generator().manual_seed(40 + n_views)
    z = torch.randn(n_views * n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    log_t = torch.tensor(math.log(t), dtype=torch.float64, requires_grad=True)
    pairs = [(a, b) for a, b in itertools.combinations(range(n_views), 2) if n_full is None or a < n_full]
    views = z.split(n)
    expected = sum(nt_xent_reference(views[a], views[b], log_t.exp()) for a, b in pairs) / len(pairs)
    want_z, want_t = torch.autograd.grad(expected, (z, log_t))
    for form in FORMS.values():
        mine_z = z.detach().clone().requires_grad_()
        mine_t = log_t.detach().clone().requires_grad_()
        got = pairwise_nt_xent(mine_z, n_views, mine_t.exp(), n_full=n_full, **form)
        got_z, got_t = torch.autograd.grad(got, (mine_z, mine_t))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_z, want_z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_t, want_t, rtol=1e-6, atol=1e-6)


def test_pairwise_gathers_every_view_once():
    """Under DDP the pairs share one gather of all views (each pair's candidates sliced from it), not one
    gather per pair; the value is the per-pair loss (the two-process equality is tests/test_distributed.py's)."""
    from simxent.loss import pairwise_nt_xent

    z, calls = torch.randn(4 * 6, 8, generator=torch.Generator().manual_seed(3)), []
    got = pairwise_nt_xent(z, 4, 0.2, n_full=2, gather=lambda x: calls.append(x.shape) or x)
    assert calls == [(4 * 6, 8)]
    torch.testing.assert_close(got, pairwise_nt_xent(z, 4, 0.2, n_full=2))


def test_pairwise_refuses_a_selection_without_pairs():
    from simxent.loss import pairwise_nt_xent

    with pytest.raises(ValueError, match="n_full=0 leaves no pair"):
        pairwise_nt_xent(torch.randn(12, 4), 3, 0.5, n_full=0)


def test_two_views_without_labels_is_nt_xent_and_the_general_form_agrees():
    """At V = 2 the multi-view loss is today's NT-Xent (its own fast forms); the general multi-positive
    form, reached with labels that are all distinct (each image its own class), gives the same loss."""
    from simxent.loss import multi_view_nt_xent

    g = torch.Generator().manual_seed(21)
    z = torch.randn(12, 16, generator=g, requires_grad=True)
    plain = nt_xent(z[:6], z[6:], 0.2)
    (want,) = torch.autograd.grad(plain, z)
    same = multi_view_nt_xent(z, 2, 0.2)
    assert same.grad_fn.name() == plain.grad_fn.name() and same.item() == plain.item()
    general = multi_view_nt_xent(z, 2, 0.2, labels=torch.arange(6))
    assert "MultiPositive" in general.grad_fn.name()
    (grad,) = torch.autograd.grad(general, z)
    assert general.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decoupled", [False, True], ids=["nt-xent", "decoupled"])
def test_anchors_without_positives_are_left_out(decoupled):
    """One view per image with labels: a class seen once has no positive; its anchor is left out of the
    mean (not a 0/0), and with no positives at all the loss is 0 with zero gradients."""
    from simxent.loss import multi_view_nt_xent

    g = torch.Generator().manual_seed(22)
    z = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 0])  # classes 1 and 2 appear once
    expected = multi_positive_reference(z, labels.tolist(), 0.5, decoupled)
    (want,) = torch.autograd.grad(expected, z)
    got = multi_view_nt_xent(z, 1, 0.5, labels=labels, decoupled=decoupled)
    (grad,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-6)
    alone = multi_view_nt_xent(z, 1, 0.5, labels=torch.arange(5), decoupled=decoupled)
    (grad,) = torch.autograd.grad(alone, z)
    assert alone.item() == 0 and not grad.any()
    single = z[:1].detach().requires_grad_()  # one view in all: not even a candidate
    alone = multi_view_nt_xent(single, 1, 0.5, labels=torch.tensor([0]), decoupled=decoupled)
    (grad,) = torch.autograd.grad(alone, single)
    assert alone.item() == 0 and not grad.any()
    with pytest.raises(ValueError, match="no positives without labels"):
        multi_view_nt_xent(z, 1, 0.5)
    with pytest.raises(ValueError, match=r"\(n_views \* n, d\)"):
        multi_view_nt_xent(z, 2, 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        multi_view_nt_xent(z, 5, 0.5, labels=labels)


def test_decoupled_leaves_out_anchors_without_negatives_and_differs_from_nt_xent():
    """Decoupled, a batch of one class has no negatives, so no denominator: every anchor is left out and
    the loss is 0 with zero gradients (not a log of an empty sum). At V = 2 without labels the decoupled
    loss takes the general form and is below NT-Xent: the same numerators over smaller denominators."""
    from simxent.loss import multi_view_nt_xent

    g = torch.Generator().manual_seed(25)
    z = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    one_class = multi_view_nt_xent(z, 2, 0.5, labels=torch.zeros(6, dtype=torch.long), decoupled=True)
    (grad,) = torch.autograd.grad(one_class, z)
    assert one_class.item() == 0 and not grad.any()
    plain, decoupled = (multi_view_nt_xent(z, 2, 0.5, decoupled=d) for d in (False, True))
    assert decoupled.item() < plain.item()
    assert "MultiPositive" in decoupled.grad_fn.name()


def shard(z, n_views, world, rank):
    """Process ``rank``'s rows of a view-major (V N, D) batch: its slice of the images, every view."""
    n = z.shape[0] // n_views // world
    return torch.cat([view[rank * n:(rank + 1) * n] for view in z.chunk(n_views)])


@pytest.mark.parametrize("decoupled", [False, True], ids=["nt-xent", "decoupled"])
@pytest.mark.parametrize("labelled", [False, True], ids=["views", "labels"])
def test_multi_view_sharded_with_gather_equals_whole_batch(labelled, decoupled):
    """Two 'processes' in one: with the gathered candidates and groups, the mean of the local losses is
    the loss of one process holding everything (the loop at 3 views)."""
    from simxent.loss import multi_view_nt_xent

    g = torch.Generator().manual_seed(23)
    z = torch.randn(3 * 6, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor(LABELS) if labelled else None
    expected = multi_positive_reference(z, view_groups(6, 3, labels), 0.4, decoupled)
    shards = [F.normalize(shard(z, 3, 2, r), dim=1) for r in range(2)]
    label_shards = [None, None] if labels is None else [labels[:3], labels[3:]]
    groups = [torch.arange(3).repeat(3) + 3 * r if labels is None else label_shards[r].repeat(3) for r in range(2)]

    def gather(t):
        return torch.cat(shards) if t.is_floating_point() else torch.cat(groups)

    losses = [multi_view_nt_xent(shard(z, 3, 2, r), 3, 0.4, labels=label_shards[r], gather=gather, rank=r,
                                 decoupled=decoupled) for r in range(2)]
    assert (sum(losses) / 2).item() == pytest.approx(expected.item(), rel=1e-9)


def _multi_view_worker(rank, port, world, cases):
    import os

    import torch.distributed as torch_dist

    from simxent import dist
    from simxent.loss import multi_view_nt_xent

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for n_views, labels, decoupled, z, expected, want in cases:
            mine = shard(z, n_views, world, rank).requires_grad_()
            n = len(z) // n_views // world
            local_labels = None if labels is None else labels[rank * n:(rank + 1) * n]
            loss = multi_view_nt_xent(mine, n_views, 0.3, labels=local_labels, gather=dist.gather_with_grad,
                                      rank=rank, decoupled=decoupled)
            loss.backward()
            assert abs(dist.mean_over_processes(loss).item() - expected) < 1e-6, (n_views, labels)
            # The gather's backward sums every process's gradient: world times the mean loss's gradient.
            torch.testing.assert_close(mine.grad, world * shard(want, n_views, world, rank), rtol=1e-6, atol=1e-6)
    finally:
        torch_dist.destroy_process_group()


def test_multi_view_across_two_processes_matches_the_formula_loop():
    """Two gloo processes, each holding half the images (all their views): the mean of their losses and
    each one's gradients match the formula loop over the whole batch, for V = 2, 3, 6, with and without
    labels, decoupled or not."""
    import socket

    import torch.multiprocessing as mp

    cases = []
    for n_views, labels, decoupled in itertools.product((2, 3, 6), (None, torch.tensor(LABELS)), (False, True)):
        g = torch.Generator().manual_seed(24 + n_views)
        z = torch.randn(n_views * 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
        expected = multi_positive_reference(z, view_groups(6, n_views, labels), 0.3, decoupled)
        (want,) = torch.autograd.grad(expected, z)
        cases.append((n_views, labels, decoupled, z.detach(), expected.item(), want))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_multi_view_worker, args=(port, 2, cases), nprocs=2, join=True)
