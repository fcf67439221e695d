"""NT-Xent, the normalised temperature-scaled cross entropy of SimCLR, as plain cross entropy.

For 2N views z (two per image) with unit-normalised rows, anchor i, its positive p(i) (the other view of
the same image) and temperature t:

    l_i = -log( exp(z_i . z_p(i) / t) / sum_{k != i} exp(z_i . z_k / t) )
    L   = mean_i l_i

i.e. ``cross_entropy(S / t with the diagonal masked, p)`` for the similarity matrix S = z z^T. Under
data parallelism each process holds 2n anchors and ``gather`` returns all 2N candidates in rank order;
the anchors' own block starts at ``rank * 2n``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, temperature, gather=_identity, rank: int = 0):
    """Masked logits (2n, 2N) and targets (2n,): one similarity matrix, self-similarities set to -inf.

    Local rows are ``[z1; z2]``; columns are every process's ``[z1; z2]`` blocks concatenated. The rows are
    scaled by 1/t before the product so that the mask can be written in place into the product's output,
    which its backward pass does not need: no second (2n, 2N) matrix is made.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = gather(z)
    n2 = z.shape[0]
    logits = (z / temperature) @ candidates.T
    logits[:, rank * n2 : (rank + 1) * n2].fill_diagonal_(float("-inf"))
    local = torch.arange(n2, device=z.device)
    return logits, rank * n2 + (local + n2 // 2) % n2


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity,
    rank: int = 0,
) -> torch.Tensor:
    """NT-Xent over the views ``z1[i] <-> z2[i]`` against every other view (all processes' with
    ``gather``). Half-precision embeddings are promoted to float32: the softmax needs the range."""
    logits, targets = similarity_logits(_at_least_float32(z1), _at_least_float32(z2), temperature, gather, rank)
    return F.cross_entropy(logits, targets)


class Temperature(nn.Module):
    """A fixed temperature, or a learnable one kept positive as exp(log t)."""

    def __init__(self, value: float, learnable: bool = False):
        super().__init__()
        log_t = torch.tensor(math.log(value))
        if learnable:
            self.log_t = nn.Parameter(log_t)
        else:
            self.register_buffer("log_t", log_t)

    def forward(self) -> torch.Tensor:
        return self.log_t.exp()


@torch.no_grad()
def contrastive_stats(z1: torch.Tensor, z2: torch.Tensor, temperature: Optional[float] = None) -> dict:
    """Monitoring figures for a batch of paired projections (local batch, no gradients).

    - ``pos_sim`` / ``neg_sim``: mean cosine similarity of positive pairs / of all other pairs;
    - ``top1``: how often the positive is an anchor's most similar other view;
    - ``alignment`` = E ||f(x) - f(y)||^2 over positive pairs (Wang & Isola 2020, alpha = 2);
    - ``uniformity`` = log E exp(-2 ||f(x) - f(y)||^2) over all distinct pairs (t = 2).
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n2 = z.shape[0]
    sim = z @ z.T
    eye = torch.eye(n2, dtype=torch.bool, device=z.device)
    positive = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    pos = sim[torch.arange(n2), positive]
    neg_mask = ~eye
    neg_mask[torch.arange(n2), positive] = False
    top1 = sim.masked_fill(eye, float("-inf")).argmax(dim=1).eq(positive).float().mean()
    sq_dist = (2 - 2 * sim).clamp_min(0)
    return {
        "pos_sim": pos.mean().item(),
        "neg_sim": sim[neg_mask].mean().item(),
        "top1": top1.item(),
        "alignment": sq_dist[torch.arange(n2), positive].mean().item(),
        "uniformity": torch.log(torch.exp(-2 * sq_dist[~eye]).mean()).item(),
    }
