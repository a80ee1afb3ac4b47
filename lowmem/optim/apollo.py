"""APOLLO and APOLLO-Mini (Zhu et al., 2024, "APOLLO: SGD-like Memory, AdamW-level
Performance", Algorithm 1), with the norm-growth limiter of Fira (Chen et al., 2024).

For a 2-D weight ``W`` (m x n), gradient ``G``, step ``t = k + 1``::

    if k % T == 0:  P ~ N(0, 1/r), shape (r, n) if m >= n else (m, r), drawn from the seed chain
    R  = G P^T  (or P^T G)                               # (m, r) / (r, n)
    M, V = Adam moments of R ;  N = M / (sqrt(V) + eps)  # no bias correction inside
    channel:  s_i = ||N_i|| / (||R_i|| + 1e-8) per row (m >= n) or per column (m < n)
    tensor:   s   = ||N||_F / (||R||_F + 1e-8)           # APOLLO-Mini: rank 1, tensor
    S = s * G  (the raw full-rank gradient, rescaled)
    limiter:  S <- S / (max(||S|| / ||S_prev||, 1.01) / 1.01)   # growth <= 1.01x per step
    W <- W - lr * sqrt(1-b2^t)/(1-b1^t) * sqrt(alpha) * S ;  W <- W - lr * wd * W

``sqrt(alpha)`` multiplies ``S`` before the limiter with ``scale_front=True``, after it
otherwise (the reference's semantics). The projection is regenerated each step from
``state["proj_seed"]`` (never stored); ``state["seed"]`` starts at the parameter's
1-based position over all groups and advances by apollo-torch's ``next_seed`` at each
draw, so random mode reproduces apollo-torch's projections on the same device type.
``proj="svd"`` uses GaLore's SVD projector instead. Group keys as in apollo-torch:
``rank, proj, scale_type, scale, update_proj_gap, proj_type``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import model_validator

from lowmem.optim.adam_math import MomentOptimizer, decoupled_weight_decay
from lowmem.optim.args import Betas, Count, GroupArgs, NonNegative, Positive, StateBits, typed
from lowmem.optim.dtensor import local_rows, row_shard, sum_over_shards
from lowmem.optim.projection import ProjType, assign_seeds, check_projected_group
from lowmem.optim.registry import OptimizerSpec, register

GROWTH_LIMIT = 1.01  # Fira's gamma


class ApolloGroup(GroupArgs):
    """The target group's keys (apollo-torch's names)."""

    rank: Count = 256
    update_proj_gap: Count = 200
    scale: Positive = 1.0
    proj_type: ProjType = "std"
    proj: Literal["random", "svd"] = "random"
    scale_type: Literal["channel", "tensor"] = "channel"

    @model_validator(mode="after")
    def _full_needs_svd_tensor(self):
        if self.proj_type == "full" and (self.scale_type == "channel" or self.proj == "random"):
            raise ValueError("optim.args.proj_type: 'full' needs proj='svd' and scale_type='tensor'")
        return self


class ApolloMiniGroup(ApolloGroup):
    """APOLLO-Mini: rank 1, one tensor-wise scale, alpha = 128 (the reference's 1B/7B scripts)."""

    rank: Count = 1
    scale_type: Literal["channel", "tensor"] = "tensor"
    scale: Positive = 128.0


class APOLLOAdamW(MomentOptimizer):
    """Drop-in for ``apollo_torch.APOLLOAdamW`` (same group keys and constructor flags)."""

    def elementwise(self, group: dict) -> bool:
        return "rank" not in group  # the AdamW groups; the target groups read the whole matrix

    def steps_rows(self, group: dict, p) -> bool:
        """``R`` all-reduced, its state replicated (:meth:`_low_rank_adam`; an SVD refresh gathers the
        gradient), the scaling of a rank's rows and the limiter's norm from sums over the shards."""
        return True

    def gathers_gradient(self, group: dict, p) -> bool:
        return "rank" in group and group["proj"] == "svd"  # its refresh; a random projection is drawn, not gathered

    @typed
    def __init__(self, params, lr: NonNegative = 1e-3, betas: Betas = (0.9, 0.999), eps: NonNegative = 1e-6,
                 weight_decay: NonNegative = 0.0, correct_bias: bool = True, scale_front: bool = False,
                 disable_nl: bool = False, state_bits: StateBits = 32):
        super().__init__(params, lr, betas, eps, weight_decay, state_bits, correct_bias=correct_bias)
        self.scale_front, self.disable_nl = scale_front, disable_nl
        for group in self.param_groups:
            if "rank" in group:
                check_projected_group(group, ApolloGroup, "APOLLOAdamW")
        assign_seeds(self, lambda group, p: "rank" in group and group["proj"] == "random")

    def _update(self, p, group, state) -> None:
        if "rank" not in group:
            self._adamw_update(p, group, state)
            return
        # Step 1: project the gradient (redraw P every T steps); Step 2: low-rank Adam moments
        g, low, normalized, step_size, u, v = self._low_rank_adam(p, group, state, random=group["proj"] == "random")
        # Steps 3-4: scale the raw gradient channel- or tensor-wise
        factor = _scaling_factor(normalized, low, group["scale_type"], right=v is not None)
        shard = row_shard(p)  # FSDP2: g holds this rank's rows; a per-row factor is cut to them
        scaled = g * (factor[local_rows(shard)[0]] if shard is not None and factor.dim() == 2 else factor)
        if self.scale_front:
            scaled *= math.sqrt(group["scale"])
        if not self.disable_nl:
            scaled = _limit_growth(state, scaled, p)
        if not self.scale_front:
            scaled *= math.sqrt(group["scale"])
        p.add_(scaled.to(p.dtype), alpha=-step_size)
        decoupled_weight_decay(p, group["lr"], group["weight_decay"])


def _scaling_factor(normalized: torch.Tensor, low: torch.Tensor, scale_type: str, right: bool) -> torch.Tensor:
    """APOLLO Step 3: ||N|| / (||R|| + 1e-8), per channel of the unprojected axis or per tensor."""
    if scale_type == "tensor":
        return torch.norm(normalized) / (torch.norm(low) + 1e-8)
    if right:  # R is (m, r): one factor per row of G
        return (torch.norm(normalized, dim=1) / (torch.norm(low, dim=1) + 1e-8)).unsqueeze(1)
    return torch.norm(normalized, dim=0) / (torch.norm(low, dim=0) + 1e-8)  # R is (r, n): per column


def _limit_growth(state: dict, scaled: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Fira's norm-growth limiter: ||S_t|| <= 1.01 ||S_{t-1}||; stores the norm after limiting. ``scaled``:
    ``p``'s, or the rows of the FSDP2 shard ``p`` stands for (its norm from the shards' sums of squares)."""
    norm = torch.norm(scaled) if row_shard(p) is None else sum_over_shards(scaled.square().sum(), p).sqrt()
    if "scaled_grad" in state:
        limiter = torch.clamp(norm / (state["scaled_grad"] + 1e-8), min=GROWTH_LIMIT) / GROWTH_LIMIT
        scaled = scaled / limiter
        norm = norm / limiter
    state["scaled_grad"] = norm
    return scaled


register(OptimizerSpec(name="apollo", cls=APOLLOAdamW, group=ApolloGroup))
register(OptimizerSpec(name="apollo_mini", cls=APOLLOAdamW, group=ApolloMiniGroup))
