"""Stepping a parameter that PyTorch FSDP2 shards (a ``DTensor``) with the one-process update.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter and its reduced gradient as a
``DTensor`` sharded by rows (``Shard(0)``): rank r holds rows ``[o_r, o_r + n_r)``. The optimizers
here are written for plain tensors, so :meth:`DenseGradOptimizer.step
<lowmem.optim.adam_math.DenseGradOptimizer.step>` hands them a plain stand-in, one of two kinds that
the optimizer chooses per parameter (``steps_rows(group, p)``, by default ``elementwise(group)``):

* **local shard** (elementwise rules: AdamW, the 8-bit AdamW/SGD, the AdamW groups of GaLore,
  APOLLO, FRUGAL, SinkGD, SWAN): the update of an element reads that element alone, so stepping
  the rank's rows is the one-process update of those rows. The state is the shard's (1/N of the
  bytes); nothing is sent. 8-bit blocks are laid out on the shard, so a block never crosses a
  shard boundary; the blocks coincide with the one-process blocks (state bit-identical, whatever N)
  when each shard starts at a multiple of the block size, i.e. when ``rows_per_shard * columns``
  is a multiple of ``blocksize`` -- true for every matrix whose row length is a multiple of 256;
  otherwise the absmax of the blocks that straddle differs and the state depends on the layout
  (a sharded checkpoint reshards the aligned case exactly and refuses the other: lowmem.fsdp_checkpoint).
  Whether a tensor is 8-bit (``min_8bit_size``) is decided on the shard's size.
  Rules whose whole-matrix quantities are sums over the rows step the rows too, with those sums
  all-reduced (:func:`sum_over_shards`): SGD-SaI's per-tensor g-SNR (``sum g``, ``sum g^2``, then
  ``sum (g - mean)^2``, first step only), SinkGD's column norms (``n`` values a Sinkhorn round),
  GaLore's, APOLLO's and FRUGAL's projection (``u^T G`` summed over the row shards, or ``G v^T`` put
  together: the projected Adam state is then the one process's, replicated; an SVD refresh, every
  ``T`` steps, all-gathers the gradient), FRUGAL's chosen columns, rows or entries (put together),
  APOLLO's limiter norm, and SWAN's column statistics and Gram matrix ``G^T G`` of a tall matrix.
* **whole matrix** (SWAN's whitening of a wide or square matrix, whose ``G G^T`` pairs every two
  rows): the gradient is all-gathered (:func:`whole_grad`), every rank runs the one-process update
  on the whole matrix (same state on every rank, replicated, as it is under DDP) and keeps its own
  rows. The
  weight is not gathered: every one of these rules reads it elementwise only (``W -= lr u(G)``,
  decoupled decay), so a full-size stand-in holding the rank's rows (zeros elsewhere) updates
  those rows exactly as one process does. Per step and matrix of ``m x n`` elements of ``b`` bytes
  each rank receives ``(N-1)/N m n b`` bytes (the gradient; counted in
  ``tests/integrations/test_fsdp_exchange.py``).
"""

from __future__ import annotations

import contextlib

import torch


def dtensor_class():
    """``torch.distributed.tensor.DTensor`` (None where torch was built without distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return DTensor


def is_sharded(t: torch.Tensor | None) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def whole_grad(p) -> torch.Tensor:
    """The whole gradient of the row-sharded parameter ``p``, all-gathered (in the gradient's dtype): each rank
    receives the ``(N-1)/N`` of its bytes that the other ranks hold. For a matrix stepped whole
    (:func:`plain_param`) and an SVD refresh of a projection (GaLore, APOLLO, FRUGAL)."""
    return p.grad.full_tensor()


def local_rows(p) -> tuple[slice, ...]:
    """The slices of the whole tensor that this rank's shard of ``p`` holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for s, o in zip(shape, offset))


def flat_start(p) -> int:
    """The flat position in the whole parameter of the first element of this rank's row shard of ``p``."""
    row_elements = p.numel() // p.shape[0] if p.dim() and p.shape[0] else 0
    return local_rows(p)[0].start * row_elements


@contextlib.contextmanager
def plain_param(optimizer: torch.optim.Optimizer, p, whole: bool):
    """A plain leaf tensor standing in for the sharded ``p`` (its ``.grad`` set, ``p``'s optimizer
    state under it) while the optimizer steps it; afterwards the state goes back under ``p`` and,
    for ``whole``, this rank's rows of the updated matrix into ``p``'s shard."""
    if whole:  # the weight enters every update elementwise (W -= lr u(G), decay): the other rows stay 0
        q, grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device), whole_grad(p)
        q[local_rows(p)] = p.to_local()
    else:
        q, grad = p.to_local().detach(), p.grad.to_local()  # q shares the shard's storage
    q.grad, q.sharded_param, q.local_shard = grad, p, not whole
    if p in optimizer.state:
        optimizer.state[q] = optimizer.state.pop(p)
    try:
        yield q
    finally:
        if q in optimizer.state:
            optimizer.state[p] = optimizer.state.pop(q)
        if whole:
            p.to_local().copy_(q[local_rows(p)])
        q.grad = None


def row_shard(q: torch.Tensor):
    """The sharded parameter whose rows the local stand-in ``q`` holds; None when ``q`` is whole (a plain
    parameter, or the stand-in of a matrix stepped whole)."""
    return getattr(q, "sharded_param", None) if getattr(q, "local_shard", False) else None


def sum_over_shards(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``t`` (a partial sum over the rows a stand-in ``q`` holds) summed over the ranks that hold the other
    rows of its sharded parameter: an all-reduce of ``t`` alone (``t`` itself for a plain parameter). For the
    rules whose whole-matrix quantities are sums over rows: per-tensor sums, column norms, ``R G``."""
    p = row_shard(q)
    if p is None:
        return t
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_reduce(t, "sum", p.device_mesh.get_group())
    return out.wait() if hasattr(out, "wait") else out


def sharded_param(p: torch.Tensor) -> torch.Tensor:
    """The sharded parameter a :func:`plain_param` stand-in stands for (``p`` itself otherwise):
    for optimizers that keep per-parameter tables keyed by identity."""
    return getattr(p, "sharded_param", p)


def replace_params(optimizer: torch.optim.Optimizer, mapping: dict[torch.Tensor, torch.Tensor]) -> None:
    """Point ``optimizer``'s groups and state at the new parameter objects of ``mapping`` (old -> new),
    as after ``fully_shard`` replaced a module's parameters by sharded ones. State made at
    construction (seeds) moves with its parameter; a tensor-valued state must not exist yet."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old, new in mapping.items():
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            if any(torch.is_tensor(v) and v.dim() > 0 for v in state.values()):
                raise ValueError("train.distributed: fsdp2 shards the model before the first step; "
                                 "this optimizer already holds state")
            optimizer.state[new] = state
    remap = getattr(optimizer, "replace_params", None)
    if remap is not None:  # an optimizer keeping its own per-parameter tables
        remap(mapping)
