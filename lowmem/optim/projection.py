"""Gradient projectors shared by GaLore, APOLLO and FRUGAL.

A projector maps a gradient ``G`` of shape ``(m, n)`` to a small matrix ``R``
and maps an update ``N`` of ``R``'s shape back. It is held as at most two plain
tensors (never as an object), so optimizer state saves to safetensors:

* ``u`` -- left factor ``(m, r)``:  ``R = u^T G``,   ``back(N) = u N``
* ``v`` -- right factor ``(r, n)``: ``R = G v^T``,   ``back(N) = N v``
* both (GaLore ``full``):           ``R = u^T G v^T``, ``back(N) = u N v``

Factors come from the truncated SVD of ``G`` (GaLore, Zhao et al. 2024, §3:
``U, S, Vh = svd(G)``, ``u = U[:, :r]``, ``v = Vh[:r]``; orthonormal, so
``back(R)`` is the rank-r truncation of ``G``), or from a seeded Gaussian
(APOLLO, Zhu et al. 2024, §3.2: entries ``N(0, 1/r)``, regenerated from a seed
chain, so only the seed is stored), or from a seeded orthonormal draw (FRUGAL's
``random`` subspace, Zmushko et al. 2024).

Which side is projected (``proj_type``, GaLore's names):
``std`` projects the smaller dimension (right if ``m >= n``), ``reverse_std``
the larger, ``left``/``right`` force a side, ``full`` both. The side is chosen
once from ``G``'s shape, never from ``R``'s (the reference's ``reverse_std``
``project_back`` picks the wrong side when ``r >= m``, ms-swift PR #10146).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lowmem.optim.args import GroupArgs, check_group

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
ProjType = Literal[PROJ_TYPES]
_NEXT_SEED_DRAWS = 15  # APOLLO's next_seed advances a CPU generator by 15 int64 draws


def sides(shape: torch.Size, proj_type: str) -> tuple[bool, bool]:
    """(project left, project right) for a gradient of ``shape`` = (m, n)."""
    tall = shape[0] >= shape[1]
    return {"std": (not tall, tall), "reverse_std": (tall, not tall), "left": (True, False),
            "right": (False, True), "full": (True, True)}[proj_type]


def project(g: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
    """``R = u^T G v^T`` with missing factors skipped."""
    if u is not None:
        g = u.t() @ g  # (r, n)
    if v is not None:
        g = g @ v.t()  # (., r)
    return g


def project_back(r: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
    """``u R v`` with missing factors skipped: back to the gradient's shape."""
    if u is not None:
        r = u @ r  # (m, .)
    if v is not None:
        r = r @ v  # (., n)
    return r


def svd_factors(g: torch.Tensor, rank: int, left: bool, right: bool):
    """Truncated-SVD factors of ``g`` (computed in fp32 like the reference, cast back to g's dtype)."""
    u_full, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    # Own, row-major copies: a slice would keep the whole SVD alive, and a checkpoint loads
    # factors row-major, so a strided factor would round differently after resume.
    u = u_full[:, :rank].to(g.dtype).clone(memory_format=torch.contiguous_format) if left else None
    v = vh[:rank, :].to(g.dtype).clone(memory_format=torch.contiguous_format) if right else None
    return u, v


def gaussian_factor(shape: tuple[int, int], rank: int, seed: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """APOLLO's random projection: ``randn(shape) / sqrt(r)`` from a generator seeded with ``seed``
    on ``device`` (fp32, then cast; CPU and CUDA generators give different draws)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)).to(dtype)


def gaussian_factors(g_shape: torch.Size, rank: int, left: bool, right: bool, seed: int,
                     device: torch.device, dtype: torch.dtype):
    if left and right:
        raise ValueError("optim.args.proj_type: 'full' is not available for random projections")
    if left:
        return gaussian_factor((g_shape[0], rank), rank, seed, device, dtype), None
    return None, gaussian_factor((rank, g_shape[1]), rank, seed, device, dtype)


def orthonormal_factor(n: int, rank: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A random ``(rank, n)`` matrix with orthonormal rows (QR of a seeded Gaussian, fp32, CPU draw)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, rank, generator=gen))  # (n, rank)
    q = q * torch.sign(torch.diagonal(r))  # unique (Haar-distributed) orthonormal basis
    return q.t().contiguous().to(device=device, dtype=dtype)


def next_seed(seed: int) -> int:
    """The next seed of the chain (apollo-torch ``next_seed``): seed a CPU generator with ``seed``,
    draw 15 int64 values in ``[0, 2^63 - 1)``, keep the last one."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (_NEXT_SEED_DRAWS,), generator=gen)[-1])


def assign_seeds(optimizer: torch.optim.Optimizer, wanted, base: int = 0) -> None:
    """``state[p]["seed"] = base + (1-based position of p over all groups)`` for params where
    ``wanted(group, p)``; positions count every param, as apollo-torch does."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index += 1
            if wanted(group, p):
                optimizer.state[p]["seed"] = base + index


def refresh_due(step: int, has_projector: bool, gap: int) -> bool:
    """Refresh before step ``k`` (0-based) when no projector exists yet or ``k % gap == 0``
    (GaLore/APOLLO: refreshes at steps 0, T, 2T, ...)."""
    return not has_projector or step % gap == 0


def current_factors(state: dict, g: torch.Tensor, rank: int, proj_type: str, gap: int, random: bool,
                    dtype: torch.dtype, shape: torch.Size | None = None):
    """The projector ``(u, v)`` for this step (fp32, like ``g``), refreshed when due.

    SVD factors are kept in ``state["proj_u"]`` / ``state["proj_v"]`` (in ``dtype``, the
    parameter's). A Gaussian projector is never stored: ``state["proj_seed"]`` is the seed it
    was drawn from, ``state["seed"]`` the next seed of the chain (APOLLO's ``random`` mode). ``shape``: the
    whole matrix's when ``g`` holds some of its rows (FSDP2; random factors only).
    """
    shape = g.shape if shape is None else shape
    left, right = sides(shape, proj_type)
    if random:
        if refresh_due(state["step"], "proj_seed" in state, gap):
            state["proj_seed"] = state["seed"]
            state["seed"] = next_seed(state["seed"])
        return gaussian_factors(shape, rank, left, right, state["proj_seed"], g.device, g.dtype)
    if refresh_due(state["step"], "proj_u" in state or "proj_v" in state, gap):
        for key, factor in zip(("proj_u", "proj_v"), svd_factors(g, rank, left, right)):
            if factor is None:
                state.pop(key, None)
            else:
                state[key] = factor.to(dtype)
    u, v = state.get("proj_u"), state.get("proj_v")
    return (None if u is None else u.to(g.dtype)), (None if v is None else v.to(g.dtype))


def check_projected_group(group: dict, model: type[GroupArgs], optimizer: str) -> None:
    """Fill a low-rank group's missing keys from ``model``'s defaults, validate them (one line
    naming ``optim.args.<key>``) and check that the group holds 2-D weights only.

    A group is low-rank when it has ``rank`` (the reference packages' convention), so
    param groups built for galore-torch / apollo-torch work unchanged.
    """
    check_group(group, model, optimizer)
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(f"optim.param_groups: {optimizer} projects 2-D weights only, got shape {tuple(p.shape)}")
