"""Where the optimizer state of each offloaded block lives: host RAM, or a checksummed file.

Fuyou (Liao et al., 2024, arXiv 2403.06504, §4) keeps the fp32 master weights and the
optimizer states of a model that does not fit in host memory on SSD and streams them
through the CPU optimizer once per iteration. Here the state of block ``k`` is whatever
the lowmem optimizer keeps in ``optimizer.state[p]`` for the block's parameters (AdamW's
moments, APOLLO-Mini's projected moments and seeds, 8-bit codes and absmax), so any
registered first-order optimizer works unchanged:

* host tier: the state tensors stay in ``optimizer.state`` (CPU) between steps;
* NVMe tier: after the block's step its state tensors are packed into one byte payload
  (each tensor 64-byte aligned) and written with :func:`lowmem.offload.store.write_block_file`
  (4 KiB header with version and CRC-32, temp file + atomic rename), then dropped from
  ``optimizer.state``; plain numbers (seeds, counters kept as ``int``) stay in memory.
  ``load(k)`` reads and checks the file and puts the tensors back before the next step.

Placement is decided at a block's first save, in the order blocks are saved: its state
stays on the host while ``host_bytes`` (the budget left after the master weights) covers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem.offload.store import read_block_file, write_block_file

_ALIGN = 64


@dataclass(frozen=True)
class Entry:
    """One state tensor of one parameter in a block's payload."""

    param: int          # index of the parameter in the block
    key: str
    dtype: torch.dtype
    shape: tuple
    offset: int
    nbytes: int


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


class StateTier:
    """The optimizer state of ``len(params)`` blocks (``params[k]``: block ``k``'s parameters)."""

    def __init__(self, optimizer, params: list[list[torch.Tensor]], host_bytes: float | None,
                 nvme_dir: str | None, durable: bool = False):
        self.optimizer, self.params, self.durable = optimizer, params, durable
        self.host_left = host_bytes
        self.dir = Path(nvme_dir) if nvme_dir else None
        self.tiers: dict[int, str] = {}
        self.layouts: dict[int, list[Entry]] = {}
        self.versions: dict[int, int] = {}
        self.loaded: set[int] = set()  # NVMe blocks whose tensors are in optimizer.state now
        if self.dir is not None and self.dir.exists():
            for stale in self.dir.glob("state_*.lmz.tmp"):
                stale.unlink()

    def path(self, k: int) -> Path:
        return self.dir / f"state_{k:05d}.lmz"

    # ---- layout ------------------------------------------------------------------
    def _layout(self, k: int) -> list[Entry]:
        entries, at = [], 0
        for j, p in enumerate(self.params[k]):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    n = value.numel() * value.element_size()
                    entries.append(Entry(j, key, value.dtype, tuple(value.shape), at, n))
                    at += -(-n // _ALIGN) * _ALIGN
        return entries

    def _place(self, k: int, nbytes: int) -> str:
        if self.host_left is None or nbytes <= self.host_left:
            self.host_left = None if self.host_left is None else self.host_left - nbytes
            return "host"
        if self.dir is None:
            raise ValueError(f"offload.host_memory_budget_gb: the optimizer state of block {k} ({nbytes} bytes) "
                             f"does not fit in the budget left after the weights, and offload.nvme_dir is not set")
        self.dir.mkdir(parents=True, exist_ok=True)
        return "nvme"

    # ---- the step ------------------------------------------------------------------
    def load(self, k: int) -> None:
        """Put block ``k``'s state tensors into ``optimizer.state`` (a no-op on the host tier)."""
        if self.tiers.get(k) != "nvme" or k in self.loaded:
            return
        entries = self.layouts[k]
        size = max((e.offset + e.nbytes for e in entries), default=0)
        payload = torch.empty(-(-size // _ALIGN) * _ALIGN, dtype=torch.uint8)
        version = read_block_file(self.path(k), payload)
        if version != self.versions[k]:
            raise ValueError(f"{self.path(k)}: holds state version {version}, expected {self.versions[k]} "
                             f"(a stale file)")
        for e in entries:
            t = payload[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
            self.optimizer.state[self.params[k][e.param]][e.key] = t
        self.loaded.add(k)

    def save(self, k: int, version: int) -> None:
        """After block ``k``'s step: on the NVMe tier write its state tensors and drop them."""
        entries = self._layout(k)
        if k not in self.tiers:
            self.tiers[k] = self._place(k, sum(e.nbytes for e in entries))
        self.layouts[k] = entries
        if self.tiers[k] == "host":
            return
        size = max((e.offset + e.nbytes for e in entries), default=0)
        payload = torch.zeros(-(-size // _ALIGN) * _ALIGN, dtype=torch.uint8)
        for e in entries:
            payload[e.offset:e.offset + e.nbytes] = _raw(self.optimizer.state[self.params[k][e.param]][e.key])
        write_block_file(self.path(k), payload, version, self.durable)
        self.versions[k] = version
        self.evict(k)

    def evict(self, k: int) -> None:
        """Drop block ``k``'s state tensors from memory (NVMe tier; the file holds them)."""
        for e in self.layouts.get(k, []):
            self.optimizer.state[self.params[k][e.param]].pop(e.key, None)
        self.loaded.discard(k)

    def reset(self, host_bytes: float | None, version: int) -> None:
        """Place every block again from the state now in ``optimizer.state`` (after loading a checkpoint)."""
        self.host_left, self.tiers, self.layouts, self.versions, self.loaded = host_bytes, {}, {}, {}, set()
        for k in range(len(self.params)):
            if self._layout(k):
                self.save(k, version)
