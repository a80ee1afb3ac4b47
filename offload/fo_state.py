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

A *chunked* entry (``chunks[k]``: row slices of its one parameter; the large parameters outside the
blocks, :mod:`lowmem.offload.fo_resident`) is stepped one row chunk at a time: :meth:`StateTier.chunk`
gives a chunk's state (row views of the state tensors shaped like the parameter; 0-d tensors, and every
tensor of a chunk that spans all rows, whole), :meth:`StateTier.chunk_stepped` takes it back. On NVMe
each chunk is its own checksummed file, so a step reads and writes one chunk's state at a time; the
whole state (checkpoints) is put together from, or split into, the chunk files.
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
    """NVMe tier: a block's state tensors packed into one checksummed file (a chunked entry: one file per
    chunk), dropped from memory."""

    def __init__(self, states: "StateTier"):
        self.states = states
        states.dir.mkdir(parents=True, exist_ok=True)

    def save(self, k: int, entries: list[Entry], version: int) -> None:
        st = self.states
        if k in st.chunks:
            state = st.optimizer.state[st.params[k][0]]
            for c in range(len(st.chunks[k])):
                st.write_chunk(k, c, {e.key: st.piece(k, c, e, state[e.key]) for e in entries}, version)
            st.versions[k] = version
            st.evict(k)
            return
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
        if k in st.chunks:
            state = st.optimizer.state[st.params[k][0]]
            for c in range(len(st.chunks[k])):
                for e, t in zip(entries, st.read_chunk(k, c).values()):
                    if st.sliced(k, c, e):
                        state.setdefault(e.key, torch.empty(e.shape, dtype=e.dtype))[st.chunks[k][c]] = t
                    elif c == 0:
                        state[e.key] = t
            st.loaded.add(k)
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
                 nvme_dir: str | None, durable: bool = False, chunks: dict[int, list[slice]] | None = None):
        self.optimizer, self.params, self.durable = optimizer, params, durable
        self.chunks = chunks or {}  # chunked entry (one parameter) -> its row slices
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
        self.fresh: set[int] = set()   # chunked entries in their first step (each chunk starts a new state)

    @property
    def tiers(self) -> dict[int, str]:
        """Each placed block's tier by name (reports)."""
        return {k: t.name for k, t in self.placed.items()}

    def off_ram(self) -> list[int]:
        """The blocks whose state is not kept in host RAM between steps."""
        return [k for k, t in self.placed.items() if not t.in_ram]

    def path(self, k: int, chunk: int | None = None) -> Path:
        return self.dir / (f"state_{k:05d}.lmz" if chunk is None else f"state_{k:05d}_{chunk:05d}.lmz")

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

    # ---- chunked entries ---------------------------------------------------------------
    def sliced(self, k: int, c: int, e: Entry) -> bool:
        """Whether chunk ``c`` of entry ``k`` holds rows of ``e`` (else ``e`` whole: a 0-d tensor, or a chunk
        of all rows); a tensor neither is refused (its optimizer cannot be stepped by rows)."""
        if len(self.chunks[k]) == 1 or e.shape == ():
            return False
        if e.shape != tuple(self.params[k][0].shape):
            raise ValueError(f"optim: state {e.key!r} of shape {list(e.shape)} cannot be split by rows")
        return True

    def piece(self, k: int, c: int, e: Entry, full: torch.Tensor) -> torch.Tensor:
        """Chunk ``c``'s part of the state tensor ``full`` of ``e``."""
        return full[self.chunks[k][c]] if self.sliced(k, c, e) else full

    def _chunk_entries(self, k: int, c: int) -> list[tuple[Entry, tuple, int, int]]:
        """(entry, chunk shape, offset, bytes) of chunk ``c``'s file payload."""
        out, at, rows = [], 0, self.chunks[k][c]
        for e in self.layouts[k]:
            shape = ((rows.stop - rows.start,) + e.shape[1:]) if self.sliced(k, c, e) else e.shape
            n = torch.Size(shape).numel() * e.dtype.itemsize
            out.append((e, shape, at, n))
            at += -(-n // _ALIGN) * _ALIGN
        return out

    @staticmethod
    def _payload(items: list) -> torch.Tensor:
        return torch.empty(-(-max((a + n for *_, a, n in items), default=0) // _ALIGN) * _ALIGN, dtype=torch.uint8)

    def write_chunk(self, k: int, c: int, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Chunk ``c``'s state ``tensors`` (by key) to its file, as ``version``."""
        items = self._chunk_entries(k, c)
        payload = self._payload(items)
        for e, _, at, n in items:
            payload[at:at + n] = _raw(tensors[e.key])
        write_block_file(self.path(k, c), payload, version, self.durable)

    def read_chunk(self, k: int, c: int) -> dict[str, torch.Tensor]:
        """Chunk ``c``'s state tensors from its file, in layout order (views of one payload)."""
        items = self._chunk_entries(k, c)
        payload = self._payload(items)
        version = read_block_file(self.path(k, c), payload)
        if version != self.versions[k]:
            raise ValueError(f"{self.path(k, c)}: holds state version {version}, expected {self.versions[k]} "
                             f"(a stale file)")
        return {e.key: payload[at:at + n].view(e.dtype).view(shape) for e, shape, at, n in items}

    def chunk(self, k: int, c: int) -> dict:
        """The optimizer state of chunk ``c`` of chunked entry ``k``, to step that chunk alone (empty before
        the entry's first step); plain numbers from ``optimizer.state``."""
        if k not in self.placed or k in self.fresh:
            return {}
        own = self.optimizer.state.get(self.params[k][0], {})
        out = {key: v for key, v in own.items() if not isinstance(v, torch.Tensor)}
        if not self.placed[k].in_ram:
            return {**out, **self.read_chunk(k, c)}
        whole = len(self.chunks[k]) == 1  # else a 0-d tensor is copied: each chunk steps it from the same value
        return {**out, **{e.key: self.piece(k, c, e, own[e.key]) if whole or self.sliced(k, c, e)
                          else own[e.key].clone() for e in self.layouts[k]}}

    def chunk_stepped(self, k: int, c: int, state: dict, version: int) -> None:
        """Chunk ``c`` of entry ``k`` stepped to ``state`` (from :meth:`chunk`, updated): kept in
        ``optimizer.state`` (host tier; whole values once the last chunk is stepped) or written to its file."""
        p, last = self.params[k][0], c == len(self.chunks[k]) - 1
        if k not in self.placed:  # the first step: the whole state's layout from this chunk's
            self.layouts[k] = self._full_layout(k, c, state)
            self.placed[k] = self.placement.place(sum(e.nbytes for e in self.layouts[k]),
                                                  f"the optimizer state of a large parameter ({k})")
            self.fresh.add(k)
        if last:
            self.fresh.discard(k)
        own = self.optimizer.state[p]
        if last:
            own.update({key: v for key, v in state.items() if not isinstance(v, torch.Tensor)})
        if not self.placed[k].in_ram:
            self.write_chunk(k, c, state, version)
        else:
            for e in self.layouts[k]:
                if self.sliced(k, c, e):
                    own.setdefault(e.key, torch.empty(e.shape, dtype=e.dtype))[self.chunks[k][c]] = state[e.key]
                elif last:
                    own[e.key] = state[e.key]
        if last:  # the chunks not stepped yet hold the previous version until then
            self.versions[k] = version

    def _full_layout(self, k: int, c: int, state: dict) -> list[Entry]:
        p, rows, n = self.params[k][0], self.chunks[k][c], len(self.chunks[k])
        entries, at = [], 0
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                part = n > 1 and v.dim() > 0
                if part and tuple(v.shape) != (rows.stop - rows.start,) + tuple(p.shape[1:]):
                    raise ValueError(f"optim: state {key!r} of shape {list(v.shape)} cannot be split by rows")
                shape = tuple(p.shape) if part else tuple(v.shape)
                nbytes = torch.Size(shape).numel() * v.element_size()
                entries.append(Entry(0, key, v.dtype, shape, at, nbytes))
                at += -(-nbytes // _ALIGN) * _ALIGN
        return entries

    def reset(self, host_bytes: float | None, version: int, fill=lambda k: None) -> None:
        """Place every block again from the state now in ``optimizer.state`` (after loading a checkpoint);
        ``fill(k)`` puts block ``k``'s state there first (a checkpoint read block by block)."""
        self._reset(host_bytes)
        for k in range(len(self.params)):
            fill(k)
            if self._layout(k):
                self.save(k, version)
