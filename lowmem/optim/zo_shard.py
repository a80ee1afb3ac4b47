"""Zeroth-order perturbations of parameters that PyTorch FSDP2 shards (``train.distributed: fsdp2``).

FSDP2 (``fully_shard``) holds each parameter as a ``DTensor`` sharded by rows (``Shard(0)``,
``torch.chunk``'s split: ``ceil(rows / N)`` rows per rank, the last shards shorter or empty): rank r
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

The slice is drawn alone: every noise kind is a function of the element's position in the whole
parameter (:mod:`lowmem.optim.zo_keyed`), so :func:`local_shard` marks the shard with its place
(``noise_span = (s_r, numel)``) and the noise draws only the elements of that span -- ``gaussian``
and ``rademacher`` the generator chunks overlapping it (fewer than ``k_r + 2C`` elements instead of
the whole parameter's, in a temporary of ``k_r + C``), ``table`` a slice of its window,
``philox`` the counters of those positions.
"""

from __future__ import annotations

import torch

from lowmem.optim.dtensor import flat_start, is_sharded


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """``p`` itself when it is not sharded; else a plain tensor sharing the storage of this rank's
    shard (in-place updates reach the parameter), which knows its parameter (``sharded_param``) and
    its place in it for the noise (``noise_span``: its first element's flat position, the
    parameter's element count; :func:`lowmem.optim.zo_noise.span`)."""
    if not is_sharded(p):
        return p
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"train.distributed: fsdp2: zeroth-order steps perturb row shards (Shard(0)); "
                         f"a parameter is placed as {p.placements}")
    q = p.to_local().detach()
    q.sharded_param, q.noise_span = p, (flat_start(p), p.numel())
    return q
