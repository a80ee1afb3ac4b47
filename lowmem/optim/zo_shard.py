"""Zeroth-order perturbations of parameters that PyTorch FSDP2 shards (``train.distributed: fsdp2``).

FSDP2 (``fully_shard``) holds each parameter as a ``DTensor`` sharded by rows (``Shard(0)``): rank r
keeps rows ``[o_r, o_r + n_r)``, i.e. the flat elements ``[s_r, s_r + k_r)`` with ``s_r = o_r c``
(``c`` elements per row) of the row-major whole tensor. MeZO (Malladi et al. 2023, Algorithm 1) and
ZO-AdaMU perturb and update every element with ``z(seed)`` drawn per parameter from
``seed = param_seed(step_seed, stream, index)`` (:mod:`lowmem.optim.zo_noise`). Under FSDP2 each
rank perturbs and updates its own shard with the slice of that same draw::

    z_r = z(seed)[s_r : s_r + k_r]            (the whole parameter's z, flattened)

so the ranks together make exactly the perturbation one process makes, and the forward (FSDP2
all-gathers the perturbed shards) computes the loss one process computes. The ranks hold one
model between them, so they act as one replica: every rank evaluates the same perturbation on its
part of the batch and the step averages the losses over the ranks (the loss of the global batch,
:class:`~lowmem.steps.fsdp_zeroth_order.FSDP2ZerothOrderStep`); no projected gradient is exchanged.

The slice is cut from the whole draw, so it is the one-process draw for every noise kind (the
chunked generators of ``gaussian``/``rademacher``, the ``table`` window, ``philox``) without
depending on how the kinds lay out their random streams. Cost: a rank draws the whole parameter's
``z`` into the per-thread scratch buffer (the one-process temporary, the largest parameter) and
uses ``k_r`` of it; ``table`` only reads a window of its table, so it draws nothing.
"""

from __future__ import annotations

import torch

from lowmem.optim.dtensor import flat_start, is_sharded
from lowmem.optim.zo_noise import Noise, restore_decay_step_


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """``p`` itself when it is not sharded; else a plain tensor sharing the storage of this rank's
    shard (in-place updates reach the parameter), which knows its parameter (``sharded_param``) and
    its first element's flat position in the whole parameter (``flat_start``)."""
    if not is_sharded(p):
        return p
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"train.distributed: fsdp2: zeroth-order steps perturb row shards (Shard(0)); "
                         f"a parameter is placed as {p.placements}")
    q = p.to_local().detach()
    q.sharded_param, q.flat_start = p, flat_start(p)
    return q


class ShardedNoise:
    """A :class:`~lowmem.optim.zo_noise.Noise` that draws, for a :func:`local_shard`, the shard's
    slice of its parameter's ``z`` (module docstring); for a plain tensor it is the noise itself.
    The same methods and arithmetic as :class:`Noise` (``view``, ``draw``, ``add_``, ``add_view_``,
    ``update_``), so MeZO, its update rule and ZO-AdaMU run on shards unchanged."""

    def __init__(self, noise: Noise):
        self.noise, self.kind = noise, noise.kind

    def view(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """Read-only ``z`` of ``like``'s elements; valid until this thread's next ``view``."""
        p = getattr(like, "sharded_param", None)
        if p is None:
            return self.noise.view(like, seed)
        whole = torch.empty((), dtype=like.dtype, device=like.device).expand(p.shape)  # shape, no storage
        z = self.noise.view(whole, seed).reshape(-1)
        return z[like.flat_start:like.flat_start + like.numel()].view(like.shape)

    def draw(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """A fresh ``z`` of ``like``'s elements that the caller may modify."""
        if getattr(like, "sharded_param", None) is None:
            return self.noise.draw(like, seed)
        return self.view(like, seed).clone()

    @torch.no_grad()
    def add_(self, tensor: torch.Tensor, seed: int, alpha: float) -> None:
        if getattr(tensor, "sharded_param", None) is None:
            return self.noise.add_(tensor, seed, alpha)
        tensor.add_(self.view(tensor, seed), alpha=alpha)

    @torch.no_grad()
    def add_view_(self, tensor: torch.Tensor, seed: int, alpha: float) -> torch.Tensor:
        if getattr(tensor, "sharded_param", None) is None:
            return self.noise.add_view_(tensor, seed, alpha)
        z = self.view(tensor, seed)
        tensor.add_(z, alpha=alpha)
        return z

    @torch.no_grad()
    def update_(self, tensor: torch.Tensor, seed: int, restore: float, decay: float, alpha: float) -> None:
        """:meth:`Noise.update_` (the rule of :func:`~lowmem.optim.zo_noise.sgd_update_`) on the slice."""
        if getattr(tensor, "sharded_param", None) is None:
            return self.noise.update_(tensor, seed, restore, decay, alpha)
        restore_decay_step_(tensor, self.view(tensor, seed), restore, decay, alpha)
