"""SinkGD: stateless gradient multi-normalisation by square-root Sinkhorn (Scetbon, Ma, Gong,
Meeds, 2025, "Gradient Multi-Normalization for Stateless and Scalable LLM Training",
arXiv 2502.06742; NeurIPS 2025 "Gradient Multi-Normalization for Efficient LLM Training").

For a target weight with gradient ``G`` (``m x n``, torch's ``(out, in)`` layout), ``L`` rounds
of SR-Sinkhorn (Algorithm 3), then a plain step (Algorithm 4)::

    X = G
    repeat L times:
        X <- sqrt(n) * Q(X)^-1 X       # Q = diag(max(row l2 norms, eps)): rows -> norm sqrt(n)
        X <- sqrt(m) * X R(X)^-1       # R = diag(max(column l2 norms, eps)): columns -> norm sqrt(m)
    W <- W * (1 - lr_S wd) - lr_S * X ,   lr_S = lr * lr_scale

``X = D_r G D_c`` with positive diagonals, ``X * X`` is classical Sinkhorn-Knopp on ``G * G``
(row sums n, column sums m), and after each round ``||X||_F = sqrt(mn)``: the update has
per-entry RMS 1, so ``lr_scale`` sets its size. Cost O(L mn), no ``p x p`` matrix (SWAN's
whitening is what the paper replaces). Sources: the abstracts give the framework and the
row/column-l2 choice; the paper body and official code were not readable here, so the order
(row first), ``L=5``, the norm clamp ``eps=1e-8``, ``lr_scale=0.05`` and the Adam split
(embeddings, norms, biases, ``lm_head``) follow the third-party implementations that agree with
each other (axolotl's SinkGD optimizer, forgather's "paper" configuration). Norms are computed in
fp32 (fp64 for fp64 gradients). Weight decay: decoupled with ``lr_S`` (axolotl), 0 by default.
Group keys: ``sinkhorn_iters, lr_scale, norm_eps``.
"""

from __future__ import annotations

import math

import torch

from lowmem.optim.args import Count, GroupArgs, NonNegative
from lowmem.optim.dtensor import row_shard, sum_over_shards
from lowmem.optim.registry import OptimizerSpec, register
from lowmem.optim.stateless import StatelessMatrixOptimizer


class SinkGDGroup(GroupArgs):
    """The target group's keys: L rounds, alpha, the norm clamp."""

    sinkhorn_iters: Count = 5
    lr_scale: NonNegative = 0.05
    norm_eps: NonNegative = 1e-8


def _column_norms(x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    if q is None or row_shard(q) is None:
        return x.norm(dim=0, keepdim=True)
    return sum_over_shards(x.square().sum(dim=0, keepdim=True), q).sqrt()  # the squares of every shard's rows


def sinkhorn_direction(g: torch.Tensor, iters: int = 5, eps: float = 1e-8,
                       q: torch.Tensor | None = None) -> torch.Tensor:
    """``iters`` rounds of row- then column-l2 normalisation to norms ``sqrt(n)`` and ``sqrt(m)``. ``g``: the
    gradient of ``q``, or the rows of the FSDP2 shard ``q`` stands for (:mod:`lowmem.optim.dtensor`): a
    row's norm is the rank's own; a column's sums its squares over the shards (an all-reduce of ``n``
    values a round)."""
    m, n = g.shape if q is None or row_shard(q) is None else row_shard(q).shape
    x = g
    for _ in range(iters):
        x = x * (math.sqrt(n) / x.norm(dim=1, keepdim=True).clamp_min(eps))
        x = x * (math.sqrt(m) / _column_norms(x, q).clamp_min(eps))
    return x


class SinkGD(StatelessMatrixOptimizer):
    """SinkGD on groups with ``sinkhorn_iters``; AdamW elsewhere (see the module docstring)."""

    MARKER = "sinkhorn_iters"
    GROUP = SinkGDGroup

    def elementwise(self, group: dict) -> bool:
        return True  # rows are the rank's own; column norms are summed over the shards (sinkhorn_direction)

    def _direction(self, g: torch.Tensor, group: dict, p: torch.Tensor) -> torch.Tensor:
        return sinkhorn_direction(g, group["sinkhorn_iters"], group["norm_eps"], p)


register(OptimizerSpec(name="sinkgd", cls=SinkGD, group=SinkGDGroup))
