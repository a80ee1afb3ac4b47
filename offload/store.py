"""Where offloaded blocks live between visits: host RAM up to a budget, files on NVMe beyond it.

Each decoder block is one flat tensor in ``host_dtype`` (its parameters packed by
:mod:`lowmem.offload.transfer`). Blocks are placed in order by the one rule of
:mod:`lowmem.offload.tiers`: host RAM (page-locked when CUDA is used) while the running
total fits ``host_memory_budget_gb``, the rest in files under ``nvme_dir`` -- Fuyou's
(Liao et al., 2024) SSD tier below ZO2's CPU tier. Each tier's storage is one class here
(:data:`STORAGE`); the store sends each call to the storage of the block's tier.

Host tier: each block is its own exact-size buffer, page-locked by registration
(:class:`~lowmem.offload.streams.HostMemory`: no power-of-two rounding, no pinned cache);
:meth:`BlockStore.take` hands a block back as ordinary memory and frees it from the store,
so restoring a model block by block never holds two copies. Host-side writes (``put``)
first wait for the device copies that read the block (an upload still in flight after an
upload-only pass) and that write it.

NVMe tier:
* reads run ahead on a thread pool (``os.preadv`` straight into a reusable,
  pinned staging buffer; the GIL is released during the I/O and the checksum);
  writes go through the same pool from a second set of staging buffers;
* file = 4 KiB header (magic, format, block version, payload bytes, CRC-32 of the
  payload) + payload. A read checks size, header and checksum and fails with
  ``ValueError("<path>: checksum mismatch")`` (or ``truncated``, ``not a ...``);
* a write goes to ``<file>.tmp`` and is renamed over the file only when complete
  (``os.replace`` is atomic), so a process killed mid-write leaves the previous
  complete version in place; ``durable=True`` also fsyncs before the rename
  (power loss). Stale ``.tmp`` files are removed when a store opens.
"""

from __future__ import annotations

import os
import queue
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lowmem.offload.streams import HostMemory, host_wait
from lowmem.offload.tiers import HOST, NVME, TIERS, Placement, ram_bytes

MAGIC = b"LMZO2BLK"
FORMAT = 1
HEADER = struct.Struct("<8sIQQI")  # magic, format, block version, payload bytes, crc32
PAYLOAD_OFFSET = 4096


@dataclass
class HostBlock:
    """A host tensor holding one block; ``ready`` must be waited on before reading it,
    ``release(event)`` hands the buffer back once the copy that reads it (``event``) is done."""

    tensor: torch.Tensor
    ready: object = None
    release: Callable[[object], None] = lambda event: None


def nvme_staging_bytes(sizes: list[int], placed: list, prefetch_depth: int) -> int:
    """Host bytes of the NVMe tier's staging buffers for blocks of ``sizes`` bytes on tiers ``placed``:
    ``prefetch_depth + 2`` read and ``prefetch_depth + 1`` write buffers (:class:`_NvmeBlocks`), each the
    size of the largest block on NVMe; none without NVMe blocks."""
    on_nvme = [n for n, tier in zip(sizes, placed) if tier is NVME]
    return (2 * prefetch_depth + 3) * max(on_nvme) if on_nvme else 0


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy())


def write_block_file(path: Path, payload: torch.Tensor, version: int, durable: bool = False) -> None:
    """Write ``payload`` (flat, CPU) atomically: temp file, then rename over ``path``."""
    data = _bytes_of(payload)
    header = HEADER.pack(MAGIC, FORMAT, version, data.nbytes, zlib.crc32(data)).ljust(PAYLOAD_OFFSET, b"\0")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        done = 0
        while done < data.nbytes:
            done += os.pwrite(fd, data[done:], PAYLOAD_OFFSET + done)
        if durable:
            os.fsync(fd)
    except OSError as err:  # a write by descriptor names no file (a full disk: "No space left on device")
        tmp.unlink(missing_ok=True)  # the partial file does not stay to fill the disk
        raise OSError(err.errno, err.strerror, str(tmp)) from None
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_block_file(path: Path, out: torch.Tensor) -> int:
    """Read the payload of ``path`` into ``out`` (flat, CPU), verify it, return the block version."""
    data = _bytes_of(out)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ValueError(f"{path}: block file is missing") from None
    try:
        size = os.fstat(fd).st_size
        if size != PAYLOAD_OFFSET + data.nbytes:
            raise ValueError(f"{path}: truncated or wrong size ({size} bytes, expected {PAYLOAD_OFFSET + data.nbytes})")
        magic, fmt, version, nbytes, crc = HEADER.unpack(os.pread(fd, HEADER.size, 0))
        if magic != MAGIC or fmt != FORMAT or nbytes != data.nbytes:
            raise ValueError(f"{path}: not a lowmem block file of this layout")
        done = 0
        while done < data.nbytes:
            got = os.preadv(fd, [data[done:]], PAYLOAD_OFFSET + done)
            if got == 0:
                raise ValueError(f"{path}: truncated while reading")
            done += got
    finally:
        os.close(fd)
    if zlib.crc32(data) != crc:
        raise ValueError(f"{path}: checksum mismatch")
    return version


class _HostBlocks:
    """Host tier of a store: each block its own exact-size buffer (from the store's host memory,
    page-locked when it pins)."""

    def __init__(self, store: "BlockStore", blocks: list[int]):
        self.store = store
        self._host: dict[int, torch.Tensor] = {}
        self._ready: dict[int, object] = {}   # event of the last copy into the block
        self._reads: dict[int, object] = {}   # event of the last upload from the block

    def put(self, i: int, flat: torch.Tensor, version: int) -> None:
        if i not in self._host:
            self._host[i] = self.store.memory.empty(self.store.numels[i], self.store.dtype)
        self._host[i].copy_(flat)

    def get(self, i: int) -> torch.Tensor:
        return self._host[i].clone()

    def take(self, i: int) -> torch.Tensor:
        return self.store.memory.release(self._host.pop(i))

    def edit(self, i: int) -> torch.Tensor:
        return self._host[i]

    def edited(self, i: int, master: torch.Tensor, version: int) -> None:
        pass  # stepped in place

    def wait(self, i: int) -> None:
        host_wait(self._reads.pop(i, None))
        host_wait(self._ready.pop(i, None))

    def fetch(self, i: int) -> Future:
        done: Future = Future()
        done.set_result(HostBlock(self._host[i], ready=self._ready.get(i),
                                  release=lambda event: self._reads.__setitem__(i, event)))
        return done

    def write_target(self, i: int) -> torch.Tensor:
        return self._host[i]

    def commit(self, i: int, target: torch.Tensor, copied, version: int) -> None:
        self._ready[i] = copied

    def close(self) -> None:
        pass  # the buffers are the store's host memory, freed with it


class _NvmeBlocks:
    """NVMe tier of a store: one checksummed file per block, read ahead and written on a thread pool
    through reusable staging buffers (from the store's host memory)."""

    def __init__(self, store: "BlockStore", blocks: list[int]):
        self.store, self.dir = store, store.dir
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("block_*.lmz.tmp"):
            stale.unlink()
        depth, biggest = store.prefetch_depth, max(store.numels[i] for i in blocks)
        self._pool = ThreadPoolExecutor(max_workers=depth + 2, thread_name_prefix="lowmem-nvme")
        self._read_bufs = self._buffers(depth + 2, biggest)
        self._write_bufs = self._buffers(depth + 1, biggest)
        self._writes: dict[int, Future] = {}  # the last write of each block

    def _buffers(self, count: int, numel: int) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        for _ in range(count):
            q.put((self.store.memory.empty(numel, self.store.dtype), None))
        return q

    def put(self, i: int, flat: torch.Tensor, version: int) -> None:
        write_block_file(self.store.path(i), flat, version, self.store.durable)

    def get(self, i: int) -> torch.Tensor:
        out = torch.empty(self.store.numels[i], dtype=self.store.dtype)
        read_block_file(self.store.path(i), out)
        return out

    take = edit = get

    def edited(self, i: int, master: torch.Tensor, version: int) -> None:
        self.store.put(i, master, version=version)

    def wait(self, i: int) -> None:
        if i in self._writes:
            self._writes.pop(i).result()

    def fetch(self, i: int) -> Future:
        return self._pool.submit(self._read, i, self._writes.get(i))

    def _read(self, i: int, last_write: Future | None) -> HostBlock:
        if last_write is not None:
            last_write.result()
        buf, busy = self._read_bufs.get()
        host_wait(busy)  # the previous upload from this buffer
        out = buf[:self.store.numels[i]]
        try:
            read_block_file(self.store.path(i), out)
        except BaseException:
            self._read_bufs.put((buf, None))
            raise
        return HostBlock(out, release=lambda event: self._read_bufs.put((buf, event)))

    def write_target(self, i: int) -> torch.Tensor:
        buf, busy = self._write_bufs.get()  # back-pressure: waits for a finished write
        host_wait(busy)
        return buf

    def commit(self, i: int, target: torch.Tensor, copied, version: int) -> None:
        self._writes[i] = self._pool.submit(self._write, i, target, copied, version)

    def _write(self, i: int, target: torch.Tensor, copied, version: int) -> None:
        host_wait(copied)
        try:
            write_block_file(self.store.path(i), target[:self.store.numels[i]], version, self.store.durable)
        finally:
            self._write_bufs.put((target, None))

    def close(self) -> None:
        self._pool.shutdown()


STORAGE = {HOST: _HostBlocks, NVME: _NvmeBlocks}  # each tier's storage for a store's blocks


class BlockStore:
    """Flat host copies of ``len(numels)`` blocks in ``dtype``, each on the tier
    :class:`~lowmem.offload.tiers.Placement` gives it (in block order)."""

    def __init__(self, numels: list[int], dtype: torch.dtype, *, budget_bytes: float | None,
                 nvme_dir: str | None, pin: bool, prefetch_depth: int, durable: bool = False):
        self.numels, self.dtype, self.pin, self.durable = numels, dtype, pin, durable
        self.prefetch_depth = prefetch_depth
        self.versions = [0] * len(numels)
        self.dir = Path(nvme_dir) if nvme_dir else None
        self.memory = HostMemory(pin)  # every tier's host buffers: exact-size, page-locked when pin
        item = torch.empty((), dtype=dtype).element_size()
        self.placed = Placement(budget_bytes, nvme_dir).place_all([n * item for n in numels], "the blocks")
        self._storage = {tier: STORAGE[tier](self, [i for i, t in enumerate(self.placed) if t is tier])
                         for tier in TIERS if tier in self.placed}
        self._at = [self._storage[t] for t in self.placed]  # block -> its tier's storage

    @property
    def tiers(self) -> list[str]:
        """Each block's tier by name (reports)."""
        return [t.name for t in self.placed]

    @property
    def _host(self) -> dict[int, torch.Tensor]:
        """The host tier's buffers, block -> flat tensor (empty without host tier)."""
        return self._storage[HOST]._host if HOST in self._storage else {}

    @property
    def ram_bytes(self) -> int:
        """Bytes of the blocks held in host RAM."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return ram_bytes(self.placed, [n * item for n in self.numels])

    def path(self, i: int) -> Path:
        return self.dir / f"block_{i:05d}.lmz"

    # ---- synchronous access (set-up, checkpoints, a step on the host) ----------------
    def put(self, i: int, flat: torch.Tensor, version: int = 0) -> None:
        """Store ``flat`` (CPU, ``dtype``) as block ``i`` now."""
        self.wait(i)
        self.versions[i] = version
        self._at[i].put(i, flat, version)

    def get(self, i: int) -> torch.Tensor:
        """A CPU copy of block ``i`` (after every pending write to it)."""
        self.wait(i)
        return self._at[i].get(i)

    def take(self, i: int) -> torch.Tensor:
        """Block ``i`` as an ordinary CPU tensor, removed from the store (host tier: the buffer
        itself, unpinned, no copy). For handing the blocks back to a model on close."""
        self.wait(i)
        return self._at[i].take(i)

    def edit(self, i: int) -> torch.Tensor:
        """Block ``i`` to change in place on the host (host tier: the stored buffer itself; NVMe: a
        copy read from its file); :meth:`edited` stores the change."""
        self.wait(i)
        return self._at[i].edit(i)

    def edited(self, i: int, flat: torch.Tensor, version: int) -> None:
        """Block ``i`` (from :meth:`edit`) holds the weights of ``version`` now."""
        self.versions[i] = version
        self._at[i].edited(i, flat, version)

    def wait(self, i: int) -> None:
        """Wait for every pending copy that reads (uploads) or writes block ``i``."""
        self._at[i].wait(i)

    def drain(self) -> None:
        for i in range(len(self.numels)):
            self.wait(i)

    # ---- asynchronous access (the schedule) ---------------------------------------
    def fetch(self, i: int) -> Future:
        """Start bringing block ``i`` into a host tensor; the future gives a :class:`HostBlock`."""
        return self._at[i].fetch(i)

    def write_target(self, i: int) -> torch.Tensor:
        """A host tensor whose first ``numels[i]`` elements should receive block ``i``'s device copy."""
        return self._at[i].write_target(i)

    def commit(self, i: int, target: torch.Tensor, copied, version: int) -> None:
        """The copy into ``target`` (from :meth:`write_target`) is queued; ``copied`` marks its end."""
        self.versions[i] = version
        self._at[i].commit(i, target, copied, version)

    def close(self) -> None:
        self.drain()
        for storage in self._storage.values():
            storage.close()
        self.memory.close()
