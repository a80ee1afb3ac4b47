"""Large parameters outside the blocks (embeddings, ``lm_head``) with their master and state off the device.

Fuyou (Liao et al., 2024, arXiv 2403.06504, §4) keeps every fp32 master weight and optimizer state
on the host or SSD; its artifact (Crispig/Ratel) leaves only small parameters resident on the GPU.
A model with a large vocabulary (Gemma's 262k tokens) has an embedding larger than a decoder
block, whose fp32 master and Adam moments would dominate the device. With
``offload.offload_embeddings`` (``auto``: each parameter outside the blocks with more elements
than the largest block; ``on``: all of them; ``off``: none) such parameters follow the blocks'
placement:

* the fp32 master in its own :class:`~lowmem.offload.store.BlockStore` (host RAM within what the
  blocks' masters left of ``offload.host_memory_budget_gb``, else checksummed files under
  ``offload.nvme_dir/resident``), the optimizer state of each parameter as one more entry of the
  engine's :class:`~lowmem.offload.fo_state.StateTier` (host, or NVMe past the budget);
* the device keeps the compute copy, used at both ends of every forward and backward;
* after the backward (a tied embedding/``lm_head`` weight has both of its gradients only then) the
  gradient goes to the host, the optimizer steps the master there (one parameter at a time, as
  layer-wise training), and the compute copy is refreshed from it.

Row chunks: an optimizer whose update of an element reads only that element and its own state
(:func:`lowmem.optim.step_one.steps_by_rows`: AdamW's ``m``, ``v`` and step count) gives the same
result stepped on any split of the rows, so each parameter is stored and stepped in chunks of at most
one block's elements: the master, the gradient's fp32 copy, the state read from NVMe and the
optimizer's temporaries exist for one chunk at a time, and the host peak of this step is a block's,
not the embedding's (a 128256 x 3072 embedding is 1.5 GiB in fp32, its AdamW state 2.9 GiB more).
Other optimizers step each parameter whole (one chunk).

In fp32 on a CPU device this equals in-memory layer-wise training bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem.dtypes import MASTER_DTYPE
from lowmem.offload.fo_host import CpuOptimizer
from lowmem.offload.store import BlockStore
from lowmem.offload.transfer import Packed


def offloaded_params(mode: str, resident: list[torch.Tensor], packed: list[Packed]) -> list[torch.Tensor]:
    """The parameters outside the blocks that ``offload.offload_embeddings`` moves off the device."""
    if mode == "off":
        return []
    biggest = max(pk.numel for pk in packed)
    return [p for p in resident if mode == "on" or p.numel() > biggest]


def row_chunks(shape: torch.Size, most: int | None) -> list[slice]:
    """Slices of the rows (dim 0) of a tensor of ``shape``, each of at most ``most`` elements (at least one
    row; None: one slice of all rows)."""
    rows = shape[0] if len(shape) else 1
    per_row = max(1, shape[1:].numel()) if len(shape) else 1
    step = rows if most is None else max(1, most // per_row)
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    return t[rows] if t.dim() else t


class ResidentTier:
    """The fp32 masters of ``params``, stored in row chunks of at most ``chunk_numel`` elements (None: whole),
    placed by the budget left after the blocks' masters (``budget``); entry ``first + j`` of the engine's
    state tier holds the state of ``params[j]``, chunked as :attr:`chunks` ``[j]``."""

    def __init__(self, params: list[torch.Tensor], budget: float | None, nvme_dir: str | None, first: int,
                 chunk_numel: int | None = None):
        self.params, self.first = params, first
        self.chunks = [row_chunks(p.shape, chunk_numel) for p in params]
        self.entry = {(j, c): e for e, (j, c) in enumerate((j, c) for j, rows in enumerate(self.chunks)
                                                           for c in range(len(rows)))}
        self.store = BlockStore([_rows(p, r).numel() for p, rows in zip(params, self.chunks) for r in rows],
                                MASTER_DTYPE, budget_bytes=budget, prefetch_depth=1, pin=False,
                                nvme_dir=str(Path(nvme_dir) / "resident") if nvme_dir else None)
        self.load([p.detach() for p in params], 0, refresh=False)

    @property
    def host_bytes(self) -> int:
        return self.store.ram_bytes

    def state_chunks(self) -> dict[int, list[slice]]:
        """The state tier's chunked entries: entry -> row slices."""
        return {self.first + j: rows for j, rows in enumerate(self.chunks)}

    def step(self, cpu: CpuOptimizer, version: int) -> None:
        """Step every parameter holding a gradient on its master, chunk by chunk; refresh the device copies."""
        for j, p in enumerate(self.params):
            grad, own = p.grad, p.data
            if grad is None:
                continue
            for c, rows in enumerate(self.chunks[j]):
                e = self.entry[(j, c)]
                master = self.store.edit(e).view(_rows(own, rows).shape)
                cpu.step_chunk(p, master, _rows(grad, rows).to("cpu", MASTER_DTYPE), self.first + j, c, version)
                with torch.no_grad():
                    _rows(own, rows).copy_(master)
                self.store.edited(e, master.view(-1), version)
            p.grad = None

    def masters(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its fp32 master (a CPU copy)."""
        return {id(p): torch.cat([self.store.get(self.entry[(j, c)]) for c in range(len(rows))]).view(p.shape)
                for j, (p, rows) in enumerate(zip(self.params, self.chunks))}

    def load(self, values: list[torch.Tensor], version: int, refresh: bool = True) -> None:
        """New masters (e.g. from a checkpoint), in the order of ``params``; the device copies follow."""
        for j, (p, v, rows) in enumerate(zip(self.params, values, self.chunks)):
            for c, r in enumerate(rows):
                self.store.put(self.entry[(j, c)], _rows(v, r).reshape(-1).to("cpu", MASTER_DTYPE), version=version)
            if refresh:
                with torch.no_grad():
                    p.copy_(v)

    def close(self) -> None:
        self.store.close()
