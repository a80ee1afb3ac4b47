"""FRUGAL: full-rank updates with gradient splitting (Zmushko et al., 2024, "FRUGAL:
Memory-Efficient Optimization by Reducing State Overhead for Scalable Training", Algorithm 1).

For a projectable weight with gradient ``G`` at step ``k`` (0-based)::

    W <- W * (1 - lr * wd)                                   # decoupled, first (all params)
    if k % T == 0: choose a subspace S of density rho;        # from G (SVD) or the seed chain
                   if reset: M = V = 0, t_adam = 0           # state reset on a switch
    R  = down_S(G) ;  M, V = Adam moments of R (torch-style eps), t_adam += 1
    W <- W - lr * up_S(M_hat / (sqrt(V_hat) + eps))          # state-full part
    W <- W - lr * lam * sign(G - up_S(down_S(G)))            # state-free part (or the residual itself)

Subspaces (``proj_type``): ``svd`` / ``random`` (orthonormal) projections of ``round(rho*dim)``
directions on ``proj_side``; ``columns`` / ``rows`` / ``randk`` coordinates (``int(rho*n)``
columns, rows or flat entries); ``block``: ``round(rho*K)`` of the group's K tensors are
entirely state-full, the others entirely state-free (``block_order`` random, ascending or
descending, wrapping around). Every random choice comes from a generator seeded by a chain
of seeds kept in the optimizer state (per tensor) or derived from ``seed`` and the switch
number (blocks), never from the global RNG, so data-parallel ranks choose the same subspace.
Params outside groups with ``density`` get plain (torch-style) AdamW.
Under FSDP2 a rank steps its rows of every matrix (:meth:`FRUGAL.steps_rows`): ``down_S(G)`` is put
together from the shards (all-reduced, about ``rho m n`` fp32 values), so the state is one process's.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from lowmem.optim.adam_math import MomentOptimizer, adam_normalized, clear_moments
from lowmem.optim.args import Betas, Count, GroupArgs, NonNegative, NonNegativeInt, StateBits, check_group, typed
from lowmem.optim.dtensor import flat_start, local_rows, row_shard, sharded_param, sum_over_shards, whole_grad
from lowmem.optim.projection import assign_seeds, next_seed, orthonormal_factor, sides, svd_factors
from lowmem.optim.registry import OptimizerSpec, register

_COORD_DIM = {"columns": 1, "rows": 0, "randk": 0}  # randk gathers from the flattened gradient


class FrugalGroup(GroupArgs):
    """The target group's keys: rho, T, the subspace kind and side, the state-free rule."""

    density: Annotated[float, Field(ge=0, le=1)] = 0.25
    update_proj_gap: Count = 200
    proj_type: Literal["svd", "random", "columns", "rows", "randk", "block"] = "block"
    proj_side: Literal["std", "reverse_std", "left", "right"] = "std"
    block_order: Literal["random", "ascending", "descending"] = "descending"
    inactive_update_rule: Literal["sign_sgd", "sgd", "no"] = "sign_sgd"
    inactive_lr_scale: float = 1.0
    reset_statistics: bool = True


class FRUGAL(MomentOptimizer):
    def elementwise(self, group: dict) -> bool:
        # the AdamW groups, and block mode (a whole tensor is active or not: Adam or sign-SGD per element)
        return "density" not in group or group["proj_type"] == "block"

    def steps_rows(self, group: dict, p) -> bool:
        """Every group steps an FSDP2 rank's rows: the subspace part ``down_S(G)`` is put together from the
        shards (all-reduced, :func:`_coordinate_split` and :meth:`_project`), so its Adam state is one
        process's (replicated); an SVD switch all-gathers the gradient (every ``T`` steps)."""
        return True

    def gathers_gradient(self, group: dict, p) -> bool:
        return "density" in group and group["proj_type"] == "svd"  # its switch (_switch); no other kind gathers

    def replace_params(self, mapping: dict) -> None:
        """Re-key the block positions to new parameter objects (FSDP2: :mod:`lowmem.optim.dtensor`)."""
        for old, new in mapping.items():
            if id(old) in self._blocks:
                self._blocks[id(new)] = self._blocks.pop(id(old))

    @typed
    def __init__(self, params, lr: NonNegative = 1e-3, betas: Betas = (0.9, 0.999), eps: NonNegative = 1e-8,
                 weight_decay: NonNegative = 0.01, state_bits: StateBits = 32, seed: NonNegativeInt = 0):
        super().__init__(params, lr, betas, eps, weight_decay, state_bits)
        self.seed = seed
        self._blocks: dict[int, tuple[int, int]] = {}  # id(p) -> (position in group, tensors in group)
        for group in self.param_groups:
            if "density" in group:
                _check_group(group)
                if group["proj_type"] == "block":
                    self._blocks.update({id(p): (i, len(group["params"])) for i, p in enumerate(group["params"])})
        assign_seeds(self, lambda group, p: "density" in group, base=seed)

    def _update(self, p, group, state) -> None:
        g = p.grad.float()
        # 1. decoupled weight decay on every param, before the update
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        if "density" not in group:
            state["step"] += 1
            self._adam(p, state, g, group, lambda n: n, "step")
            return
        # 2. a new subspace every T steps (and on the first step)
        if state["step"] % group["update_proj_gap"] == 0:
            self._switch(p, group, state, g)
        state["step"] += 1
        low, up, residual = self._split(p, group, state, g)
        # 3. state-full part: Adam on the subspace
        if low is not None and low.numel() > 0:
            state["adam_step"] = state.get("adam_step", 0) + 1
            self._adam(p, state, low, group, up, "adam_step")
        # 4. state-free part: signSGD or SGD on the residual
        if residual is not None and group["inactive_update_rule"] != "no":
            free = residual.sign() if group["inactive_update_rule"] == "sign_sgd" else residual
            p.add_(free.to(p.dtype), alpha=-group["lr"] * group["inactive_lr_scale"])

    def _adam(self, p, state, grad, group, up, step_key: str) -> None:
        normalized, step_size = adam_normalized(state, self.store, grad, group["lr"], group["betas"], group["eps"],
                                                state[step_key], torch_eps=True)
        p.add_(up(normalized).to(p.dtype), alpha=-step_size)

    def _switch(self, p, group, state, g) -> None:
        """Choose the next subspace; reset the moments (and Adam's step) when asked. ``g``: ``p``'s
        gradient, or the rows of the FSDP2 shard ``p`` stands for (the SVD then gathers the whole)."""
        kind, shard = group["proj_type"], row_shard(p)
        shape = g.shape if shard is None else shard.shape
        if kind == "block" or group["reset_statistics"]:  # inactive blocks keep no state at all
            clear_moments(state)
            state["adam_step"] = 0
        draw_seed = state["seed"]
        state["seed"] = next_seed(draw_seed)
        if kind in _COORD_DIM:
            size = shape.numel() if kind == "randk" else shape[_COORD_DIM[kind]]
            gen = torch.Generator().manual_seed(draw_seed)
            keep = int(size * group["density"])
            state["idx"] = torch.randperm(size, generator=gen)[:keep].sort().values.to(g.device)
        elif kind in ("svd", "random"):
            left, right = sides(shape, group["proj_side"])
            dim = shape[0] if left else shape[1]
            rank = round(dim * group["density"])
            if kind == "svd":
                u, v = svd_factors(g if shard is None else whole_grad(shard).float(), rank, left, right)
            else:
                f = orthonormal_factor(dim, rank, draw_seed, g.device, g.dtype)  # (rank, dim)
                u, v = (f.t(), None) if left else (None, f)
            state.pop("proj_u", None)
            state.pop("proj_v", None)
            state.update({k: f.to(p.dtype) for k, f in (("proj_u", u), ("proj_v", v)) if f is not None})

    def _split(self, p, group, state, g):
        """``(down(G), up, G - up(down(G)))``; ``None`` parts are empty. For the rows ``g`` of an FSDP2 shard:
        the whole ``down(G)``, and this rank's rows of ``up`` and of the residual."""
        kind = group["proj_type"]
        if kind == "block":
            active = self._block_active(p, group, state["step"] - 1)
            return (g, (lambda n: n), None) if active else (None, None, g)
        if kind in _COORD_DIM:
            return _coordinate_split(g, state["idx"], _COORD_DIM[kind], kind == "randk", p)
        u, v = state.get("proj_u"), state.get("proj_v")
        u, v = (None if u is None else u.float()), (None if v is None else v.float())
        rank, dim = (u.shape[1], u.shape[0]) if u is not None else (v.shape[0], v.shape[1])
        if rank == 0:
            return None, None, g
        low = self._project(g, u, v, p)

        def up(n: torch.Tensor) -> torch.Tensor:
            return self._project_back(n, u, v, p)

        return low, up, None if rank == dim else g - up(low)  # full rank: the residual is 0

    def _block_active(self, p, group, k: int) -> bool:
        position, count = self._blocks[id(sharded_param(p))]
        n_active, switch = round(count * group["density"]), k // group["update_proj_gap"]
        order = group["block_order"]
        if order == "random":
            gen = torch.Generator().manual_seed(self.seed + switch)
            return position in torch.randperm(count, generator=gen)[:n_active].tolist()
        start = switch * n_active
        chosen = {(start + i) % count for i in range(n_active)}
        return (count - 1 - position if order == "descending" else position) in chosen


def _coordinate_split(g: torch.Tensor, idx: torch.Tensor, dim: int, flat: bool, q: torch.Tensor):
    """Gather the chosen columns / rows / flat entries; scatter back into zeros; zero them in the residual.
    ``g``: the gradient of ``q``, or the rows of the FSDP2 shard ``q`` stands for (:func:`_shard_selection`)."""
    view = g.reshape(-1) if flat else g
    shard = row_shard(q)
    if shard is None:
        low, own, where = view.index_select(dim, idx), slice(None), idx
    else:
        low, own, where = _shard_selection(view, idx, dim, flat, shard, q)

    def up(n: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(view).index_copy_(dim, where, n[own]).view_as(g)

    residual = view.index_fill(dim, where, 0.0).view_as(g)
    return low, up, residual


def _shard_selection(view: torch.Tensor, idx: torch.Tensor, dim: int, flat: bool, shard, q: torch.Tensor):
    """``(low, own, where)`` for this rank's rows ``view`` (flattened when ``flat``) of ``shard``: the whole
    selection ``low`` (each rank's part in place, zeros elsewhere, all-reduced: ``m k`` values for columns,
    ``k n`` for rows, ``k`` for flat entries), the part of ``low`` that is this rank's, and where its
    entries lie in ``view``. Chosen columns cross every rank's rows; chosen rows and entries lie in one."""
    rows = local_rows(shard)[0]
    if dim == 1:
        own, where, shape = rows, idx, (shard.shape[0], idx.numel())
    else:
        start = flat_start(shard) if flat else rows.start  # randk: any number of dims
        own = (idx >= start) & (idx < start + view.shape[0])
        where, shape = idx[own] - start, (idx.numel(), *view.shape[1:])
    low = view.new_zeros(shape)
    low[own] = view.index_select(dim, where)
    return sum_over_shards(low, q), own, where


def _check_group(group: dict) -> None:
    check_group(group, FrugalGroup, "FRUGAL")
    if group["proj_type"] != "randk" and any(p.dim() != 2 for p in group["params"]):
        raise ValueError(f"optim.args.proj_type: {group['proj_type']!r} needs 2-D weights")


register(OptimizerSpec(name="frugal", cls=FRUGAL, group=FrugalGroup))
