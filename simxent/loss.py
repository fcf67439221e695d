"""NT-Xent, the normalised temperature-scaled cross entropy of SimCLR, as plain cross entropy.

For 2N views z (two per image) with unit-normalised rows, anchor i, its positive p(i) (the other view of
the same image) and temperature t:

    l_i = -log( exp(z_i . z_p(i) / t) / sum_{k != i} exp(z_i . z_k / t) )
    L   = mean_i l_i

i.e. the cross entropy of the similarity matrix S = z z^T / t, diagonal masked, against targets p. Under
data parallelism each process holds 2n anchors and ``gather`` returns all 2N candidates in rank order;
the anchors' own block starts at ``rank * 2n``.

Two exact forms of it: the one-matrix form (any number of processes, any device) and, for one process on
a CPU, a symmetric form that does 1.75 instead of 3 matrix products' arithmetic (forward and backward).
Both run in float32 (or float64) whatever the autocast state: at t = 0.05, logits up to 20 rounded to
bf16's 8 bits lose the loss altogether.

With V views per image (multi-crop), or with class labels (supervised contrastive learning, Khosla et al.
2020), an anchor has several positives P(i): the other views of its image, or every other view of its
class. ``multi_view_nt_xent`` is the multi-positive cross entropy over all other views A(i),

    L = -(1/|I|) sum_{i in I} (1/|P(i)|) sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) ),

I the anchors with at least one positive; at V = 2 without labels it is NT-Xent above. Decoupled
(DCL, Yeh et al. 2022), the denominator holds the negatives only, A(i) minus P(i): a positive then no
longer damps its own gradient as its similarity grows. Once every positive is more similar than every
negative, that loss falls without bound as 1/t grows: a learnt temperature is pushed to its lower bound.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEARNT_TEMPERATURE_RANGE


def _without_autocast(backward):
    """Run an autograd Function's backward outside autocast: a ``loss.backward()`` called inside an
    autocast region would otherwise run its products in half precision."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return backward(ctx, *grads)

    return wrapped


class _MaskedSimilarityCrossEntropy(torch.autograd.Function):
    """Cross entropy over masked similarity logits, fused:

        mean_i [ logsumexp_{k != self(i)} (q_i . c_k / t) - q_i . c_pos(i) / t ]   for unit rows q (M, D), c (K, D)

    With G = (softmax - onehot(pos)) / M:  dq = G c / t,  dc = G^T q / t,  d(1/t) = sum(G * q c^T).
    Forward computes the log-softmax in one fused pass, turns it in place into M G and keeps that, so at
    most two (M, K) matrices live at once (the two-block form keeps several) and backward is two matrix
    products, recomputing nothing.
    """

    @staticmethod
    def forward(ctx, q, c, inv_t, offset: int):
        n = q.shape[0] // 2
        logits = (q * inv_t) @ c.T  # scaling the (M, D) side spares a pass over the (M, K) matrix
        # Diagonal views, not index lists: anchor i's own column is offset + i, its positive offset + (i + n) % m.
        logits.diagonal(offset).fill_(float("-inf"))
        g = torch.log_softmax(logits, dim=1)  # one fused pass into a new buffer
        del logits  # so that at most two (M, K) matrices ever live at once
        positives = (g[:n].diagonal(offset + n), g[n:].diagonal(offset))
        loss = -torch.cat(positives).mean()
        g.exp_()  # the softmax; the masked diagonal is exactly 0
        for p in positives:
            p.sub_(1)
        ctx.save_for_backward(q, c, inv_t, g)  # g = softmax - onehot(positive), the loss's gradient times M
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_loss):
        q, c, inv_t, g = ctx.saved_tensors
        m = q.shape[0]
        scale = inv_t * grad_loss / m
        grad_t = (g * (q @ c.T)).sum() * grad_loss / m if ctx.needs_input_grad[2] else None
        grad_q = (g @ c).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_c = (g.T @ q).mul_(scale) if ctx.needs_input_grad[1] else None
        return grad_q, grad_c, grad_t, None


# The symmetric form keeps exp(S - 1/t) >= exp(-2/t), a normal float32 (> e^-87) only while 1/t < 43.
SYMMETRIC_MAX_INV_T = 40.0


class _SymmetricNTXent(torch.autograd.Function):
    """The same loss when all 2n views are local (one process), from the symmetry of S = z z^T / t.

    With views a = z[:n], b = z[n:], S = [[A, B], [B^T, C]]: only [A | B] (one product) and C are
    computed, 3/4 of the arithmetic. As every S_ij <= 1/t, E = exp(S - 1/t) needs no per-row maximum
    (for 1/t <= SYMMETRIC_MAX_INV_T; the caller checks) and row sums r give lse_i = 1/t + log r_i:
    r_a sums the rows of [A | B], r_b the columns of B and the rows of C, and
    L = (sum log r - 2 sum diag(B - 1/t)) / 2n.

    Backward: S is symmetric, so with G = (softmax - onehot) / 2n, dz = (G + G^T) z / t, one product
    instead of two, and H = G + G^T is E_ij (1/r_i + 1/r_j), minus 2 on B's diagonal: no exponential,
    no transpose. 1/t's gradient needs no pass over S: sum_i z_i . dz_i = 2 (1/t) dL/d(1/t). Normalising
    the rows is folded in (dx = (dz - z (z . dz)) / |x|): on a CPU, where this form is used, every
    autograd node costs about as much as a small product.
    """

    @staticmethod
    def forward(ctx, x, inv_t):
        n = x.shape[0] // 2
        norm = x.norm(dim=1, keepdim=True).clamp_min_(1e-12)  # as F.normalize
        z = x / norm
        scaled = z * inv_t
        top = (scaled[:n] @ z.T).sub_(inv_t)  # [A | B] - 1/t
        c = (scaled[n:] @ z[n:].T).sub_(inv_t)
        positives = top.diagonal(n).double().sum()
        top.diagonal().fill_(float("-inf"))
        c.diagonal().fill_(float("-inf"))
        top.exp_()
        c.exp_()
        r_a = top.sum(1)
        r_b = top[:, n:].sum(0).add_(c.sum(1))
        # The O(n) sums in float64 cost nothing and keep the loss within an ulp of a float64 evaluation.
        loss = ((r_a.double().log().sum() + r_b.double().log().sum() - 2 * positives) / (2 * n)).to(x.dtype)
        ctx.save_for_backward(z, norm, inv_t, top, c, r_a, r_b)
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_loss):
        z, norm, inv_t, e_top, e_c, r_a, r_b = ctx.saved_tensors
        n = z.shape[0] // 2
        inv_a, inv_b = r_a.reciprocal(), r_b.reciprocal()
        h_top = (e_top * inv_a[:, None]).addcmul_(e_top, torch.cat([inv_a, inv_b]))
        h_c = (e_c * inv_b[:, None]).addcmul_(e_c, inv_b)
        h_top.diagonal(n).sub_(2)
        dz = torch.cat([h_top @ z, torch.addmm(h_c @ z[n:], h_top[:, n:].T, z[:n])])
        dz.mul_(inv_t * grad_loss / (2 * n))
        along = (z * dz).sum(dim=1, keepdim=True)
        grad_t = along.sum() / (2 * inv_t) if ctx.needs_input_grad[1] else None
        return dz.sub_(z * along).div_(norm), grad_t


class _MultiPositiveCrossEntropy(torch.autograd.Function):
    """The multi-positive cross entropy over masked similarity logits s = q c^T / t, fused:

        L = scale * sum_{i: P(i) not empty} [ logsumexp_{k != self(i)} s_ik - sum_k W_ik s_ik ]

    for unit rows q (M, D), c (K, D) and W_ik = 1/|P(i)| on i's positives (0 elsewhere, a row of zeros for
    an anchor left out). With G_ik = scale (softmax_ik - W_ik) on the anchors that count (0 on the
    others): dq = G c / t, dc = G^T q / t, d(1/t) = sum(G * q c^T), as in the one-positive form.
    ``decoupled`` also drops the positives from the logsumexp and the softmax: logsumexp_{k not in P(i) or i}.
    """

    @staticmethod
    def forward(ctx, q, c, inv_t, offset: int, weights, scale, decoupled: bool = False):
        logits = (q * inv_t) @ c.T
        positives = logits.flatten() @ weights.flatten()  # sum_i sum_k W_ik s_ik: a dot product, no (M, K) copy
        logits.diagonal(offset).fill_(float("-inf"))
        if decoupled:
            logits.masked_fill_(weights > 0, float("-inf"))
        lse = torch.logsumexp(logits, dim=1)
        # An anchor with no candidate at all (a batch of one view) has lse = -inf: 0 keeps its row's 0 * inf
        # and inf - inf out of the sums (a finite lse stays: exp(s - 0) could overflow).
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
        counts = (weights.sum(dim=1) > 0).to(q.dtype)  # 1 for anchors with a positive, 0 for the others
        loss = ((lse * counts).sum() - positives) * scale
        g = logits.sub_(lse[:, None]).exp_().sub_(weights)  # softmax - W, in place: one (M, K) matrix kept
        g.mul_((counts * scale)[:, None])
        ctx.save_for_backward(q, c, inv_t, g)
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_loss):
        q, c, inv_t, g = ctx.saved_tensors
        grad_t = (g * (q @ c.T)).sum() * grad_loss if ctx.needs_input_grad[2] else None
        grad_q = (g @ c).mul_(inv_t * grad_loss) if ctx.needs_input_grad[0] else None
        grad_c = (g.T @ q).mul_(inv_t * grad_loss) if ctx.needs_input_grad[1] else None
        return grad_q, grad_c, grad_t, None, None, None, None


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _inverse_temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1/t in ``like``'s dtype; a learnt t keeps its graph."""
    if torch.is_tensor(temperature):
        return (1 / temperature.to(dtype=like.dtype)).to(device=like.device)
    # A CPU scalar works with tensors on any device; copying it to a GPU would wait for the stream.
    return torch.tensor(1 / temperature, dtype=like.dtype)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    rank: int = 0,
) -> torch.Tensor:
    """NT-Xent over the views ``z1[i] <-> z2[i]`` against every other view (all processes' with
    ``gather``): cross entropy over one (2n, 2N) cosine-similarity matrix scaled by 1/t, each anchor's own
    column masked, the other view of its image the target. Half-precision embeddings are promoted to
    float32 and autocast is off inside (also in backward): the softmax needs the range. Without ``gather``
    (all views local), on a CPU and with t >= 1 / SYMMETRIC_MAX_INV_T, the symmetric form computes it;
    everything else the one-matrix form (the same loss, tested against each other)."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent: z1 and z2 must be (n, d) with the same shape (row i of each are the two "
                         f"views of image i), got z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        x = torch.cat([_at_least_float32(z1), _at_least_float32(z2)])
        inv_t = _inverse_temperature(temperature, x)
        # GPUs keep the one-matrix form, the one measured there; the symmetric form was measured on CPUs only.
        if gather is None and x.device.type == "cpu" and float(inv_t.detach()) <= SYMMETRIC_MAX_INV_T:
            return symmetric_nt_xent(x, inv_t)
        z = F.normalize(x, dim=1)
        return _MaskedSimilarityCrossEntropy.apply(z, z if gather is None else gather(z), inv_t, rank * z.shape[0])


def symmetric_nt_xent(x: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:
    """NT-Xent of the 2n local views ``x = [z1; z2]`` (rows need not be normalised) at inverse temperature
    ``inv_t`` (a 0-d tensor of ``x``'s dtype, with a gradient when learnt), by the symmetric form, which
    computes 3/4 of S = z z^T / t. Requires 1/t <= SYMMETRIC_MAX_INV_T (exp(S - 1/t) must not underflow);
    :func:`nt_xent` picks it by itself on a CPU."""
    return _SymmetricNTXent.apply(x, inv_t)


def positive_weights(groups: torch.Tensor, all_groups: torch.Tensor, offset: int, dtype,
                     decoupled: bool = False) -> torch.Tensor:
    """W (M, K): W_ik = 1/|P(i)| where candidate k is one of anchor i's positives (same group, k not i
    itself, i's own column being ``offset + i``), else 0. ``decoupled``: a row of zeros for an anchor whose
    candidates are all in its group (no negative, so no denominator). That happens only when the whole
    global batch is one group, and then to every anchor: the loss is 0 whatever |I| is."""
    same = (groups[:, None] == all_groups[None, :]).to(dtype)
    if decoupled:
        same.mul_((same.sum(dim=1, keepdim=True) < same.shape[1]).to(dtype))
    same.diagonal(offset).zero_()
    return same.div_(same.sum(dim=1, keepdim=True).clamp_min_(1))


def anchors_with_positives(all_groups: torch.Tensor) -> torch.Tensor:
    """|I|: how many of the (global) views share their group with another view. Sorted counts, so that
    on a GPU nothing waits for the host."""
    ordered = all_groups.sort().values
    count = torch.searchsorted(ordered, all_groups, right=True) - torch.searchsorted(ordered, all_groups)
    return (count > 1).sum()


def multi_view_nt_xent(
    z: torch.Tensor,
    n_views: int,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    rank: int = 0,
    decoupled: bool = False,
) -> torch.Tensor:
    """The multi-positive NT-Xent of ``n_views`` views per image (module docstring), for ``z`` (V n, D) in
    view-major order: rows ``v n .. v n + n - 1`` are view v of images 0 .. n-1.

    Positives: the other views of the same image, or with ``labels`` (n,) every other view whose image
    has the same label. Candidates: every other view, all processes' with ``gather`` (applied to the
    projections and to the group of each view; every process holds n images). An anchor without
    positives (labels, V = 1, a class seen once) is left out of the mean; with none at all the loss is 0.
    The local loss is scaled so that its mean over processes is the global loss. At V = 2 without labels
    this is :func:`nt_xent` itself (its faster forms). ``decoupled``: the denominators hold the negatives
    only (DCL; the module docstring).
    """
    if z.ndim != 2 or n_views < 1 or z.shape[0] % n_views:
        raise ValueError(f"multi_view_nt_xent: z must be (n_views * n, d), got {tuple(z.shape)} for "
                         f"n_views={n_views}")
    n = z.shape[0] // n_views
    if labels is None and n_views == 1:
        raise ValueError("multi_view_nt_xent: one view per image has no positives without labels")
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"multi_view_nt_xent: labels must be ({n},), one per image, got {tuple(labels.shape)}")
    if labels is None and n_views == 2 and not decoupled:
        return nt_xent(z[:n], z[n:], temperature, gather=gather, rank=rank)
    # A view's group: its image's label, or its image's index in the global batch.
    groups = labels if labels is not None else torch.arange(n, device=z.device) + rank * n
    groups = groups.to(z.device).repeat(n_views)
    with torch.autocast(z.device.type, enabled=False):
        q = F.normalize(_at_least_float32(z), dim=1)
        inv_t = _inverse_temperature(temperature, q)
        c, all_groups = (q, groups) if gather is None else (gather(q), gather(groups))
        offset = rank * q.shape[0]
        weights = positive_weights(groups, all_groups, offset, q.dtype, decoupled)
        world = c.shape[0] // q.shape[0]
        scale = world / anchors_with_positives(all_groups).clamp_min(1).to(q.dtype)
        return _MultiPositiveCrossEntropy.apply(q, c, inv_t, offset, weights, scale, decoupled)


def view_pairs(n_views: int, n_full: int) -> list[tuple[int, int]]:
    """The pairs of views (a < b) that :func:`pairwise_nt_xent` contrasts: those with at least one of the
    first ``n_full`` views (``n_full = n_views``: every pair)."""
    return [(a, b) for a in range(n_views) for b in range(a + 1, n_views) if a < n_full]


def pairwise_nt_xent(
    z: torch.Tensor,
    n_views: int,
    temperature: float | torch.Tensor,
    n_full: Optional[int] = None,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    rank: int = 0,
) -> torch.Tensor:
    """The mean of two-view NT-Xent over pairs of views (CMC's full graph of pairs, Tian et al. 2020, each
    pair scored by SimCLR's NT-Xent, so a view's negatives include its own view's other images), for ``z``
    (V n, D) in view-major order:

        L = (1/|Q|) sum_{(a, b) in Q} NT-Xent(z_a, z_b),

    Q the pairs of :func:`view_pairs`: every pair, or with ``n_full`` only those with at least one of the
    first ``n_full`` (full-size) views, so that multi-crop's small views are not contrasted with each other.
    Unlike :func:`multi_view_nt_xent`, each pair has its own softmax: an anchor's denominator holds the 2N
    views of its pair, not its image's other views. At V = 2 both are NT-Xent. With ``gather``, every
    view is gathered once, and each pair's candidates are its two views' rows of every process."""
    if z.ndim != 2 or n_views < 2 or z.shape[0] % n_views:
        raise ValueError(f"pairwise_nt_xent: z must be (n_views * n, d) with n_views >= 2, got {tuple(z.shape)} "
                         f"for n_views={n_views}")
    pairs = view_pairs(n_views, n_views if n_full is None else n_full)
    if not pairs:
        raise ValueError(f"pairwise_nt_xent: n_full={n_full} leaves no pair of views")
    if gather is None:
        views = z.chunk(n_views)
        return sum(nt_xent(views[a], views[b], temperature) for a, b in pairs) / len(pairs)
    with torch.autocast(z.device.type, enabled=False):
        x = F.normalize(_at_least_float32(z), dim=1)
        inv_t, n = _inverse_temperature(temperature, x), z.shape[0] // n_views
        local, everyone = x.unflatten(0, (n_views, n)), gather(x).unflatten(0, (-1, n_views, n))
        # gather([z_a; z_b]) would hold, process by process, that process's rows of views a and b.
        losses = [_MaskedSimilarityCrossEntropy.apply(local[[a, b]].flatten(0, 1), everyone[:, [a, b]].flatten(0, 2),
                                                      inv_t, rank * 2 * n) for a, b in pairs]
    return sum(losses) / len(pairs)


class Temperature(nn.Module):
    """A fixed temperature, or a learnable one, t = exp(log t), kept in LEARNT_TEMPERATURE_RANGE.

    The learnable log t is projected onto [log 0.01, log 1] in place at every call, before it is used
    (CLIP's training clamps its logit scale the same way after each step). So t never leaves the range,
    and at a bound the gradient is the plain one: a step outwards is undone at the next call, a step
    inwards moves t off the bound. A clamp inside the graph instead would give zero gradient beyond the
    bound, and a parameter carried past it by momentum would stay stuck there.
    """

    def __init__(self, value: float, learnable: bool = False):
        super().__init__()
        lo, hi = LEARNT_TEMPERATURE_RANGE
        if learnable and not lo <= value <= hi:
            raise ValueError(f"a learnt temperature starts in [{lo}, {hi}], got {value}")
        log_t = torch.tensor(math.log(value))
        if learnable:
            self.log_t = nn.Parameter(log_t)
        else:
            self.register_buffer("log_t", log_t)

    def forward(self) -> torch.Tensor:
        if self.log_t.requires_grad:
            with torch.no_grad():
                self.log_t.clamp_(*(math.log(b) for b in LEARNT_TEMPERATURE_RANGE))
        return self.log_t.exp()


@torch.no_grad()
def contrastive_stats(z1: torch.Tensor, z2: torch.Tensor, anchors: Optional[int] = None) -> dict:
    """Monitoring figures for a batch of paired projections (no gradients), with the first ``anchors``
    images' views (default all) as anchors against every view: under torchrun the main process's own images
    against the global batch, the figures one process holding it would log on average, in (2a x 2n) memory.

    - ``pos_sim`` / ``neg_sim``: mean cosine similarity of positive pairs / of all other pairs;
    - ``top1``: how often the positive is an anchor's most similar other view;
    - ``alignment`` = E ||f(x) - f(y)||^2 over positive pairs (Wang & Isola 2020, alpha = 2);
    - ``uniformity`` = log E exp(-2 ||f(x) - f(y)||^2) over all distinct pairs (t = 2).
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n2, n = z.shape[0], z.shape[0] // 2
    a = n if anchors is None else anchors
    rows = torch.cat([torch.arange(a, device=z.device), torch.arange(a, device=z.device) + n])
    sim = z[rows] @ z.T  # (2a, 2n): row r is anchor rows[r]
    # Sums and gathers only, no boolean indexing: on a GPU this costs one host sync, not five.
    pos = (z[:a] * z[n : n + a]).sum(dim=1)  # each anchor's positive: both views of an image, once each
    own, positive = rows[:, None], ((rows + n) % n2)[:, None]
    neg_mean = (sim.sum() - sim.gather(1, own).sum() - 2 * pos.sum()) / (2 * a * (n2 - 2))
    top1 = sim.scatter(1, own, float("-inf")).argmax(dim=1).eq(positive.squeeze(1)).float().mean()
    kernel = torch.exp(-2 * (2 - 2 * sim).clamp_min(0))
    uniformity = torch.log((kernel.sum() - kernel.gather(1, own).sum()) / (2 * a * (n2 - 1)))
    alignment = (2 - 2 * pos).clamp_min(0).mean()
    values = torch.stack([pos.mean(), neg_mean, top1, alignment, uniformity]).tolist()
    return dict(zip(("pos_sim", "neg_sim", "top1", "alignment", "uniformity"), values))


@torch.no_grad()
def similarity_samples(z1: torch.Tensor, z2: torch.Tensor, max_negatives: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of every positive pair (2n) and of up to ``max_negatives`` negative pairs drawn
    at random, for plotting how the two distributions separate during training."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n2 = z.shape[0]
    positive = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    pos = (z * z[positive]).sum(dim=1)
    # Its own generator: monitoring must not move the RNG that draws the augmentations (exact resume).
    g = torch.Generator(device=z.device).manual_seed(0)
    i = torch.randint(0, n2, (max_negatives,), device=z.device, generator=g)
    j = torch.randint(0, n2, (max_negatives,), device=z.device, generator=g)
    keep = (i != j) & (j != positive[i])
    neg = (z[i[keep]] * z[j[keep]]).sum(dim=1)
    return pos, neg
