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

Placement is decided at a block's first save, in the order blocks are saved, by the rule of
:mod:`lowmem.offload.tiers` over ``host_bytes`` (the budget left after the master weights): its
state stays on the host while that covers it. Each tier's storage is one class here (:data:`STORAGE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem.offload.store import read_block_file, write_block_file
from lowmem.offload.tiers import HOST, NVME, Placement, Tier

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


class _HostStates:
    """Host tier: the state tensors stay in ``optimizer.state`` between steps."""

    def __init__(self, states: "StateTier"):
        pass

    def save(self, k: int, entries: list[Entry], version: int) -> None:
        pass

    def load(self, k: int, entries: list[Entry]) -> None:
        pass


class _NvmeStates:
    """NVMe tier: a block's state tensors packed into one checksummed file, dropped from memory."""

    def __init__(self, states: "StateTier"):
        self.states = states
        states.dir.mkdir(parents=True, exist_ok=True)

    def save(self, k: int, entries: list[Entry], version: int) -> None:
        st = self.states
        size = max((e.offset + e.nbytes for e in entries), default=0)
        payload = torch.zeros(-(-size // _ALIGN) * _ALIGN, dtype=torch.uint8)
        for e in entries:
            payload[e.offset:e.offset + e.nbytes] = _raw(st.optimizer.state[st.params[k][e.param]][e.key])
        write_block_file(st.path(k), payload, version, st.durable)
        st.versions[k] = version
        st.evict(k)

    def load(self, k: int, entries: list[Entry]) -> None:
        st = self.states
        if k in st.loaded:
            return
        size = max((e.offset + e.nbytes for e in entries), default=0)
        payload = torch.empty(-(-size // _ALIGN) * _ALIGN, dtype=torch.uint8)
        version = read_block_file(st.path(k), payload)
        if version != st.versions[k]:
            raise ValueError(f"{st.path(k)}: holds state version {version}, expected {st.versions[k]} "
                             f"(a stale file)")
        for e in entries:
            t = payload[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
            st.optimizer.state[st.params[k][e.param]][e.key] = t
        st.loaded.add(k)


STORAGE = {HOST: _HostStates, NVME: _NvmeStates}  # each tier's storage for a block's state


class StateTier:
    """The optimizer state of ``len(params)`` blocks (``params[k]``: block ``k``'s parameters)."""

    def __init__(self, optimizer, params: list[list[torch.Tensor]], host_bytes: float | None,
                 nvme_dir: str | None, durable: bool = False):
        self.optimizer, self.params, self.durable = optimizer, params, durable
        self.dir = Path(nvme_dir) if nvme_dir else None
        self._reset(host_bytes)
        if self.dir is not None and self.dir.exists():
            for stale in self.dir.glob("state_*.lmz.tmp"):
                stale.unlink()

    def _reset(self, host_bytes: float | None) -> None:
        self.placement = Placement(host_bytes, None if self.dir is None else str(self.dir))
        self.placed: dict[int, Tier] = {}
        self._storage: dict[Tier, object] = {}
        self.layouts: dict[int, list[Entry]] = {}
        self.versions: dict[int, int] = {}
        self.loaded: set[int] = set()  # NVMe blocks whose tensors are in optimizer.state now

    @property
    def tiers(self) -> dict[int, str]:
        """Each placed block's tier by name (reports)."""
        return {k: t.name for k, t in self.placed.items()}

    def off_ram(self) -> list[int]:
        """The blocks whose state is not kept in host RAM between steps."""
        return [k for k, t in self.placed.items() if not t.in_ram]

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

    def _storage_of(self, k: int):
        tier = self.placed[k]
        if tier not in self._storage:
            self._storage[tier] = STORAGE[tier](self)
        return self._storage[tier]

    # ---- the step ------------------------------------------------------------------
    def load(self, k: int) -> None:
        """Put block ``k``'s state tensors into ``optimizer.state`` (a no-op on the host tier)."""
        if k in self.placed:
            self._storage_of(k).load(k, self.layouts[k])

    def save(self, k: int, version: int) -> None:
        """After block ``k``'s step: on the NVMe tier write its state tensors and drop them."""
        entries = self._layout(k)
        if k not in self.placed:
            self.placed[k] = self.placement.place(sum(e.nbytes for e in entries),
                                                  f"the optimizer state of block {k}")
        self.layouts[k] = entries
        self._storage_of(k).save(k, entries, version)

    def evict(self, k: int) -> None:
        """Drop block ``k``'s state tensors from memory (NVMe tier; the file holds them)."""
        for e in self.layouts.get(k, []):
            self.optimizer.state[self.params[k][e.param]].pop(e.key, None)
        self.loaded.discard(k)

    def reset(self, host_bytes: float | None, version: int, fill=lambda k: None) -> None:
        """Place every block again from the state now in ``optimizer.state`` (after loading a checkpoint);
        ``fill(k)`` puts block ``k``'s state there first (a checkpoint read block by block)."""
        self._reset(host_bytes)
        for k in range(len(self.params)):
            fill(k)
            if self._layout(k):
                self.save(k, version)
