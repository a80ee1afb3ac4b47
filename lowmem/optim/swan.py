"""SWAN: SGD with whitening and normalisation, no optimizer state for the block matrices
(Ma, Gong, Scetbon, Meeds et al., 2024, "SWAN: SGD with Normalization and Whitening Enables
Stateless LLM Training", arXiv 2412.13148; ICML 2025).

For a target weight with gradient ``G`` oriented as ``p x q`` with ``p <= q`` (``orient``)::

    GradNorm:      G~_i = (G_i - mean_j G_ij) / (std_j G_ij + eps)      # per row, population std
    GradWhitening: A = G~ G~^T ;  Y_0 = A / ||A||_F ;  Z_0 = I          # coupled Newton-Schulz,
                   k times:  T = 3I - Z Y ;  Y <- Y T / 2 ;  Z <- T Z / 2    #  Z -> (A/||A||_F)^(-1/2)
                   D = Z G~                                              # -> (G~ G~^T)^(-1/2) G~ = U V^T
    rescale:       D <- sqrt(p q) * D / ||D||_F                          # per-entry RMS 1
    W <- W * (1 - lr_S wd) - lr_S * D ,   lr_S = lr * lr_scale

Sources: there is no official code and the paper body was not readable here; the operators
follow the authors' own restatement of SWAN in Gong et al. 2025 ("Towards Efficient Optimizer
Design for LLM via Structured Fisher Approximation with a Low-Rank Extension", arXiv
2502.07752, App. B.7 GradNorm/GradWhitening and B.8 the coupled Newton-Schulz iteration with
step factor 1/2). lowmem's choices where that text is silent: ``ns_steps=10`` (5 leaves 2e-2
error on a 64x256 Gaussian, 10 reaches fp64 precision), ``eps=1e-8`` added to the row std,
the ``sqrt(pq)`` rescaling and ``lr_scale=0.05`` (as third-party SWAN/SinkGD code), no weight
decay by default. A centred square gradient is singular (rows sum to 0), so NS converges
slowly there; the result is still a bounded, whitened-as-far-as-k-allows direction.
Embeddings, norms and ``lm_head`` get AdamW (GaLore's LLaMA benchmark split, §1 of the paper).
Group keys: ``ns_steps, lr_scale, orient, center, norm_eps``. Under FSDP2 a tall matrix is stepped
on the rank's rows with sums over the shards (:func:`sharded_direction`), a wide or square one whole
(:meth:`SWAN.steps_rows`).
"""

from __future__ import annotations

import torch

from lowmem.optim.args import GroupArgs, NonNegative, NonNegativeInt
from lowmem.optim.dtensor import row_shard, sum_over_shards
from lowmem.optim.registry import OptimizerSpec, register
from lowmem.optim.stateless import StatelessMatrixOptimizer, oriented


class SwanGroup(GroupArgs):
    """The target group's keys: k Newton-Schulz steps, alpha, orientation, centring, eps."""

    ns_steps: NonNegativeInt = 10
    lr_scale: NonNegative = 0.05
    orient: bool = True
    center: bool = True
    norm_eps: NonNegative = 1e-8


def grad_norm(g: torch.Tensor, eps: float = 1e-8, center: bool = True) -> torch.Tensor:
    """Standardise each row over the columns (population std); ``center=False``: divide by the row RMS."""
    if center:
        g = g - g.mean(dim=1, keepdim=True)
    scale = g.pow(2).mean(dim=1, keepdim=True).sqrt()
    return g / (scale + eps)


def newton_schulz_inv_sqrt(a: torch.Tensor, steps: int) -> torch.Tensor:
    """``Z_k`` of the coupled iteration: ``(a / ||a||_F)^(-1/2)`` as ``k`` grows (``a`` symmetric PSD)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    y = a / a.norm().clamp_min(torch.finfo(a.dtype).tiny)
    z = eye
    for _ in range(steps):
        t = 3.0 * eye - z @ y
        y = 0.5 * (y @ t)
        z = 0.5 * (t @ z)
    return z


def whiten(g: torch.Tensor, steps: int) -> torch.Tensor:
    """``(G G^T)^(-1/2) G`` up to a positive factor, by :func:`newton_schulz_inv_sqrt` (``p x p`` work)."""
    return newton_schulz_inv_sqrt(g @ g.t(), steps) @ g


def swan_direction(g: torch.Tensor, ns_steps: int = 10, orient: bool = True, center: bool = True,
                   eps: float = 1e-8) -> torch.Tensor:
    """GradNorm -> GradWhitening -> rescale to ``sqrt(pq)``, on the wide orientation when ``orient``."""

    def direction(x: torch.Tensor) -> torch.Tensor:
        d = whiten(grad_norm(x, eps, center), ns_steps)
        norm = d.norm().clamp_min(torch.finfo(d.dtype).tiny)  # a zero gradient gives a zero update
        return d / norm * float(x.numel()) ** 0.5

    return oriented(direction, g, orient)


def sharded_direction(g: torch.Tensor, q: torch.Tensor, ns_steps: int, center: bool, eps: float) -> torch.Tensor:
    """:func:`swan_direction` (oriented) of a tall ``m x n`` matrix (``m > n``) from the rows ``g`` of the FSDP2
    shard that the stand-in ``q`` holds. The whitened side is ``G^T``, whose rows are ``G``'s columns, so
    GradNorm's column means and stds, the Gram matrix ``G~^T G~`` (``n x n``) and ``||D||_F^2`` are sums over
    the row shards: all-reduces of ``n`` (when ``center``), ``n``, ``n (n + 1) / 2`` (the Gram's upper
    triangle) and 1 fp32 values; ``Z`` is then one process's, and this rank's rows of ``D`` are ``G~ Z^T``."""
    m, n = row_shard(q).shape
    if center:
        g = g - sum_over_shards(g.sum(dim=0), q) / m
    x = g / ((sum_over_shards(g.pow(2).sum(dim=0), q) / m).sqrt() + eps)
    upper = torch.triu_indices(n, n, device=g.device)
    part = sum_over_shards((x.t() @ x)[upper[0], upper[1]], q)
    gram = x.new_zeros(n, n).index_put_((upper[0], upper[1]), part).index_put_((upper[1], upper[0]), part)
    d = (newton_schulz_inv_sqrt(gram, ns_steps) @ x.t()).t()
    norm = sum_over_shards(d.square().sum(), q).sqrt().clamp_min(torch.finfo(d.dtype).tiny)
    return d / norm * float(m * n) ** 0.5


class SWAN(StatelessMatrixOptimizer):
    """SWAN on groups with ``ns_steps``; AdamW elsewhere (see the module docstring)."""

    MARKER = "ns_steps"
    GROUP = SwanGroup

    def steps_rows(self, group: dict, p) -> bool:
        """The AdamW groups, and a tall target matrix (``m > n``, oriented) whose sums over the rows
        (:func:`sharded_direction`) cost less than gathering it: an all-reduce of ``n (n + 1) / 2`` fp32
        values moves about ``4 n (n + 1)`` bytes per rank (twice its size, in a ring), a gather ``m n b``.
        A wide or square matrix whitens its rows, whose Gram matrix needs every pair of rows: gathered."""
        if self.MARKER not in group:
            return True
        m, n = p.shape
        return bool(group["orient"]) and m > n and 4 * (n + 1) < m * p.dtype.itemsize

    def _direction(self, g: torch.Tensor, group: dict, p: torch.Tensor) -> torch.Tensor:
        if row_shard(p) is not None:
            return sharded_direction(g, p, group["ns_steps"], bool(group["center"]), group["norm_eps"])
        return swan_direction(g, group["ns_steps"], bool(group["orient"]), bool(group["center"]), group["norm_eps"])


register(OptimizerSpec(name="swan", cls=SWAN, group=SwanGroup))
