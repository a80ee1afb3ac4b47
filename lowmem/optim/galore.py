"""GaLore-AdamW: Adam in a low-rank gradient subspace (Zhao et al., 2024, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection", Algorithm 2).

For a 2-D weight ``W`` (m x n) with gradient ``G`` at step ``t = k + 1``::

    if k % T == 0:  U, S, Vh = svd(G);  P = Vh[:r] (right, m >= n) or U[:, :r] (left)   # refresh
    R  = G P^T  (or P^T G)                            # (m, r) / (r, n): the state is this small
    M, V = Adam moments of R ;  N = M / (sqrt(V) + eps)
    W <- W - lr * sqrt(1-b2^t)/(1-b1^t) * alpha * N P   (or alpha * P N)
    W <- W - lr * wd * W                              # decoupled, after the update

Moments are neither reset nor rotated at a refresh (as in the reference). Params
in groups without ``rank`` get the same HF-style AdamW without projection.
Per-group keys as in galore-torch: ``rank``, ``update_proj_gap``, ``scale``,
``proj_type`` (std, reverse_std, left, right, full). Defaults: eps 1e-6, wd 0.
"""

from __future__ import annotations

from lowmem.optim.adam_math import MomentOptimizer, decoupled_weight_decay
from lowmem.optim.args import Betas, Count, GroupArgs, NonNegative, Positive, StateBits, typed
from lowmem.optim.projection import ProjType, check_projected_group
from lowmem.optim.registry import OptimizerSpec, register


class GaLoreGroup(GroupArgs):
    """The target group's keys (galore-torch's names): r, T, alpha and the projected side."""

    rank: Count = 128
    update_proj_gap: Count = 200
    scale: Positive = 0.25
    proj_type: ProjType = "std"


class GaLoreAdamW(MomentOptimizer):
    """Drop-in for ``galore_torch.GaLoreAdamW`` (same group keys, same numbers in fp32)."""

    def elementwise(self, group: dict) -> bool:
        return "rank" not in group  # the AdamW groups; the target groups read the whole matrix

    def steps_rows(self, group: dict, p) -> bool:
        return True  # R = P^T G from sums over the shards; the whole gradient only at an SVD refresh

    def gathers_gradient(self, group: dict, p) -> bool:
        return "rank" in group  # the SVD refresh (every T steps)

    @typed
    def __init__(self, params, lr: NonNegative = 1e-3, betas: Betas = (0.9, 0.999), eps: NonNegative = 1e-6,
                 weight_decay: NonNegative = 0.0, correct_bias: bool = True, state_bits: StateBits = 32):
        super().__init__(params, lr, betas, eps, weight_decay, state_bits, correct_bias=correct_bias)
        for group in self.param_groups:
            if "rank" in group:
                check_projected_group(group, GaLoreGroup, "GaLoreAdamW")

    def _update(self, p, group, state) -> None:
        if "rank" not in group:
            self._adamw_update(p, group, state)
            return
        # 1. refresh P from the SVD of this gradient when k % T == 0; 2. project; 3. Adam on R
        _, _, normalized, step_size, u, v = self._low_rank_adam(p, group, state, random=False)
        # 4. project the normalized update back, times alpha
        update = self._project_back(normalized, u, v, p) * group["scale"]
        p.add_(update.to(p.dtype), alpha=-step_size)
        # 5. decoupled weight decay
        decoupled_weight_decay(p, group["lr"], group["weight_decay"])


register(OptimizerSpec(name="galore_adamw", cls=GaLoreAdamW, group=GaLoreGroup))
