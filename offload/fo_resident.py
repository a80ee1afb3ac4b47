"""Large parameters outside the blocks (embeddings, ``lm_head``) with their master and state off the device.

Fuyou (Liao et al., 2024, arXiv 2403.06504, §4) keeps every fp32 master weight and optimizer state
on the host or SSD; its artifact (Crispig/Ratel) leaves only small parameters resident on the GPU.
A model with a large vocabulary (Gemma's 262k tokens) has an embedding larger than a decoder
block, whose fp32 master and Adam moments would dominate the device. With
``offload.offload_embeddings`` (``auto``: each parameter outside the blocks with more elements
than the largest block; ``on``: all of them; ``off``: none) such parameters follow the blocks'
placement:

* the fp32 master in its own :class:`~lowmem.offload.store.BlockStore` (host RAM within what the
  blocks' masters left of ``offload.host_memory_budget_gb``, else a checksummed file under
  ``offload.nvme_dir/resident``), the optimizer state as one more entry of the engine's
  :class:`~lowmem.offload.fo_state.StateTier` (host, or NVMe past the budget);
* the device keeps the compute copy, used at both ends of every forward and backward;
* after the backward (a tied embedding/``lm_head`` weight has both of its gradients only then) the
  gradient goes to the host, the optimizer steps the master there (one parameter at a time, as
  layer-wise training), and the compute copy is refreshed from it.

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


class ResidentTier:
    """The masters of ``params``, packed as a block's (one store entry, placed by the budget left after
    the blocks' masters, ``budget``); entry ``index`` of the engine's state tier holds their state."""

    def __init__(self, params: list[torch.Tensor], budget: float | None, nvme_dir: str | None, index: int):
        self.params, self.index = params, index
        self.packed = Packed.of_params(params, MASTER_DTYPE)
        self.store = BlockStore([self.packed.numel], MASTER_DTYPE, budget_bytes=budget, prefetch_depth=1, pin=False,
                                nvme_dir=str(Path(nvme_dir) / "resident") if nvme_dir else None)
        self.store.put(0, self.packed.pack([p.detach() for p in params], MASTER_DTYPE))

    @property
    def host_bytes(self) -> int:
        return self.store.ram_bytes

    def step(self, cpu: CpuOptimizer, version: int) -> None:
        """Step every parameter holding a gradient on its master; refresh the device copies."""
        grads = (None if p.grad is None else p.grad.to("cpu", MASTER_DTYPE) for p in self.params)
        cpu.step_stored(self.store, 0, self.packed, grads, self.index, version, refresh=True)

    def masters(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its fp32 master (a CPU copy)."""
        return {id(p): w for p, w in zip(self.params, self.packed.views(self.store.get(0)))}

    def load(self, values: list[torch.Tensor], version: int) -> None:
        """New masters (e.g. from a checkpoint), in the order of ``params``; the device copies follow."""
        self.store.put(0, self.packed.pack(values, MASTER_DTYPE), version=version)
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)

    def close(self) -> None:
        self.store.close()
