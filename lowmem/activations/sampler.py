"""WTA-CRS row sampling: probabilities, the winner set, and the stochastic draws.

Liu et al. 2023, "Winner-Take-All Column Row Sampling for Memory Efficient
Adaptation of Language Model" (NeurIPS, arXiv 2305.15265), §3 and Appendix D
Algorithm 1; reference ``zirui-ray-liu/WTACRS`` ``approxlinear/functional.py``
(``subsample_3D_input_by_norm``).

The weight gradient of a linear layer is a sum over the N = B·L token rows,
``dW = Σ_i gy_i x_iᵀ``. WTA-CRS keeps a budget of k rows::

    k    = min(max(int(N·keep_ratio), minimal_k), N)           (k = N: exact, nothing sampled)
    p_i  ∝ score_i   (known at forward time, see ``row_probabilities``)
    |C|  = argmin_{c=0..k-1} (1 − Σ_{top c} p) / (k − c)        (c = 0 is plain CRS, score 1/k)
    C    = the |C| rows of largest p ("winners"), kept exactly, weight 1
    s    = k − |C| draws with replacement from q_i = p_i / R on the rest, R = Σ_{i∉C} p_i
    dŴ   = Σ_{c∈C} gy_c x_cᵀ + Σ_{j=1..s} R / (s·p_{i_j}) · gy_{i_j} x_{i_j}ᵀ

E[dŴ] = dW for any C and any p with p_i > 0 wherever x_i ≠ 0 (a row with x_i = 0
contributes nothing), so the estimate is unbiased at every step. Two departures
from the reference, both to keep that promise:

* the reference drops the stochastic part when P_C > 1 − 1e-3 ("long tail") and,
  in its first epoch (no stored gradient norms), does not divide by s·p; both are
  biased. Here s >= 1 whenever k < N and the reweighting is always applied;
* draws use inverse-CDF sampling on uniforms from a private CPU ``torch.Generator``
  (instead of ``torch.multinomial`` on the global RNG), so the same generator
  state gives the same rows on any device and resume is exact (the global RNG is left to
  dropout and the data order).

Repeated draws are merged (weight × count), so at most k rows are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Share of ||x||-proportional probability mixed into the gradient-aware probabilities
# (defensive importance sampling): keeps p_i >= DEFENSIVE · ||x_i|| / Σ||x|| when the
# running gradient-norm estimate is stale or near zero at some positions.
DEFENSIVE = 0.1


def budget(n_rows: int, keep_ratio: float, minimal_k: int) -> int:
    """k, the number of rows kept: ``min(max(int(N·keep_ratio), minimal_k), N)`` (reference rule)."""
    return min(max(int(n_rows * keep_ratio), minimal_k), n_rows)


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """||t_i|| over the last dim, accumulated in fp32 (fp64 for fp64 input)."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.promote_types(t.dtype, torch.float32))


def _normalize(score: torch.Tensor) -> torch.Tensor:
    total = score.sum()
    # All-zero scores (an all-zero input): fall back to uniform, without a host sync.
    return torch.where(total > 0, score / total.clamp_min(torch.finfo(score.dtype).tiny),
                       torch.full_like(score, 1.0 / score.numel()))


def row_probabilities(x_norms: torch.Tensor, grad_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling probabilities p (N,) in fp32 from the input-row norms ``||x_i||`` and,
    optionally, an estimate of the output-gradient norms ``||gy_i||`` made before this step:
    ``p = (1 − δ)·normalize(||x||·ĝ) + δ·normalize(||x||)`` with δ = ``DEFENSIVE``."""
    p_x = _normalize(x_norms.float())
    if grad_norms is None:
        return p_x
    p_xg = _normalize(x_norms.float() * grad_norms.float())
    return (1.0 - DEFENSIVE) * p_xg + DEFENSIVE * p_x


def winner_count(top_p: torch.Tensor, k: int) -> int:
    """|C| from the k largest probabilities (descending): the c in 0..k-1 that minimises
    (1 − Σ_{top c} p)/(k − c), the variance factor of the stochastic part (paper §3.2)."""
    mass_before = torch.cat([top_p.new_zeros(1), top_p[:-1].cumsum(0)])  # Σ_{top c} p, c = 0..k-1
    score = (1.0 - mass_before) / (k - torch.arange(k, device=top_p.device))  # p sums to 1
    return int(score.argmin())


@dataclass
class RowSample:
    """Rows of the flattened input kept for backward and their estimator weights."""

    index: torch.Tensor  # (m,) int64, m <= k: winners first, then distinct drawn rows
    weight: torch.Tensor  # (m,) fp32: 1 for winners, count·R/(s·p_i) for drawn rows
    n_winners: int


def sample_rows(prob: torch.Tensor, k: int, generator: torch.Generator) -> RowSample:
    """Draw the WTA-CRS row sample of size k from probabilities ``prob`` (N,), k < N."""
    n = prob.numel()
    if not 0 < k < n:
        raise ValueError(f"activations.wta_crs: row budget k={k} must be in (0, {n})")
    # 1. winners: the |C| most probable rows
    top_p, top_i = prob.topk(k)
    n_win = winner_count(top_p, k)
    winners = top_i[:n_win]
    # 2. s = k - |C| draws with replacement from the residual distribution
    residual = prob.double().index_fill(0, winners, 0.0)
    cdf = residual.cumsum(0)
    mass = cdf[-1]  # R = Σ_{i∉C} p_i
    s = k - n_win
    u = torch.rand(s, generator=generator, dtype=torch.float32).to(prob.device, torch.float64)
    drawn = torch.searchsorted(cdf, u * mass, right=True).clamp_(max=n - 1)
    # 3. merge repeats: weight = count · R / (s · p_i)
    rows, counts = torch.unique(drawn, return_counts=True)
    w_drawn = counts.double() * mass / (s * residual[rows])
    weight = torch.cat([torch.ones(n_win, dtype=torch.float32, device=prob.device), w_drawn.float()])
    return RowSample(index=torch.cat([winners, rows]), weight=weight, n_winners=n_win)


class GradNormTracker:
    """Running estimate of one layer's output-gradient row norms per sequence position.

    Backward of step t updates ``ema[pos] ← β·ema[pos] + (1 − β)·mean_batch ||gy[:, pos]||``;
    the forward of step t+1 reads it. It is fixed before the step's sampling, so the estimator
    stays unbiased; it only shapes p (and thus the variance). Positions never seen read the mean.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.ema: torch.Tensor | None = None  # (L_max,) fp32

    def estimate(self, batch: int, seq: int) -> torch.Tensor | None:
        """ĝ for the (batch·seq) rows of the next forward, or None before the first backward."""
        if self.ema is None:
            return None
        est = self.ema[:seq]
        if est.numel() < seq:
            est = torch.cat([est, est.mean().expand(seq - est.numel())])
        return est.expand(batch, seq).reshape(-1)

    @torch.no_grad()
    def update(self, grad_output: torch.Tensor, batch: int, seq: int) -> None:
        norms = row_norms(grad_output.reshape(batch, seq, -1)).float()
        new = norms.mean(0)  # (L,)
        if self.ema is None:
            self.ema = new
            return
        if self.ema.numel() < seq:
            self.ema = torch.cat([self.ema, new[self.ema.numel():]])
        self.ema[:seq].mul_(self.momentum).add_(new, alpha=1.0 - self.momentum)
