"""Moving blocks between their host copy and a small pool of device slots (ZO2, Wang et al., 2025,
arXiv 2503.12668, §3.2; the first-order engine uses it too).

Each block's parameters are packed into one flat buffer (offsets aligned to 512
bytes, the CUDA caching allocator's alignment, so kernels see the same alignment
as for ordinary parameters). The device holds :func:`slot_count` slots: the block
being computed and ``prefetch_depth`` blocks being uploaded ahead, plus, when a
pass writes blocks back (ZO2), the block going back -- ``prefetch_depth + 2``; the
first-order engine's passes never write back (its blocks are stepped on the host),
so it holds ``prefetch_depth + 1``. While a block is resident its parameters'
``.data`` are views into its slot; otherwise an empty placeholder.

Schedule for a pass over blocks ``order`` (``begin`` then ``acquire``/``release``
per block, in order):

* ``acquire(i)``: the compute lane waits for block i's upload, binds the views and
  starts the uploads of the next ``prefetch_depth`` blocks (each waits on the
  upload lane for its slot's last offload) and the host/NVMe fetch one further;
* ``release(i, write_back)``: unbinds; if the block changed, the offload lane waits
  for the compute lane, encodes it in its host format if that differs (a coarser float dtype or
  int8 plus scales, stochastically rounded: :mod:`lowmem.offload.host_format`) and copies that
  to the host (or an NVMe write buffer). An upload decodes on the device the same way.

On a CPU device every copy is synchronous; the order of operations is the same.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from lowmem.offload.host_format import FloatCopy
from lowmem.offload.store import BlockStore
from lowmem.offload.streams import Lanes

_ALIGN_BYTES = 512


@dataclass
class Packed:
    """Where each parameter of one block lives in its flat buffer."""

    params: list[nn.Parameter]
    shapes: list[torch.Size]  # kept: a parameter's own shape is empty while its block is not resident
    offsets: list[int]
    numel: int

    @staticmethod
    def of(block: nn.Module, dtype: torch.dtype) -> "Packed":
        return Packed.of_params(block.parameters(), dtype)

    @staticmethod
    def of_params(tensors: Iterable[torch.Tensor], dtype: torch.dtype) -> "Packed":
        """``tensors`` packed in order in one flat buffer of ``dtype``, each at a 512-byte aligned offset."""
        align = _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
        params, offsets, at = [], [], 0
        for p in tensors:
            params.append(p)
            offsets.append(at)
            at += -(-p.numel() // align) * align
        return Packed(params, [p.shape for p in params], offsets, at)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + s.numel()].view(s) for s, o in zip(self.shapes, self.offsets)]

    def pack(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(self.numel, dtype=dtype)
        for view, t in zip(self.views(flat), tensors):
            view.copy_(t)
        return flat


def slot_count(n_blocks: int, prefetch_depth: int, write_back: bool = True) -> int:
    """Device slots of a pass: the block computing, ``prefetch_depth`` uploading ahead and, when
    blocks are written back, one going back (its slot is reused once the copy to the host ends)."""
    return min(prefetch_depth + 1 + write_back, n_blocks)


def device_buffer_bytes(fmt: FloatCopy, prefetch_depth: int) -> dict[str, int]:
    """Bytes :class:`BlockMover` allocates on the device for the blocks of ``fmt`` (their host format):
    the slots in the compute dtype and, when the host copy is not the compute buffer itself, as many
    staging buffers holding the largest block's host encoding."""
    count = slot_count(len(fmt.packed), prefetch_depth)
    slots = count * max(pk.numel for pk in fmt.packed) * fmt.compute_dtype.itemsize
    staging = 0 if fmt.same else count * max(fmt.numel(i) for i in range(len(fmt.packed))) * fmt.store_dtype.itemsize
    return {"slots": slots, "staging": staging}


class BlockMover:
    """Uploads blocks of one pass into device slots ahead of use and writes changed ones back."""

    def __init__(self, packed: list[Packed], store: BlockStore, device: torch.device, fmt: FloatCopy,
                 prefetch_depth: int, write_back: bool = True):
        self.packed, self.store, self.depth, self.fmt = packed, store, prefetch_depth, fmt
        self.lanes = Lanes(device)
        n_slots = slot_count(len(packed), prefetch_depth, write_back)
        biggest = max(p.numel for p in packed)
        compute_dtype = fmt.compute_dtype
        self.slots = [torch.empty(biggest, dtype=compute_dtype, device=device) for _ in range(n_slots)]
        self.staging = None  # device buffers holding the host copy's encoding, when it differs
        if not fmt.same:
            stored = max(store.numels)
            # zeros: the padding between parameters is never written, so stored bytes are deterministic
            self.staging = [torch.zeros(stored, dtype=store.dtype, device=device) for _ in range(n_slots)]
        self._placeholder = {id(p): torch.empty(0, dtype=compute_dtype, device=device)
                             for pk in packed for p in pk.params}
        self._free = deque(range(n_slots))
        self._slot_free_event: list = [None] * n_slots
        self._queue: deque[int] = deque()
        self._fetches: dict = {}
        self._resident: dict[int, tuple[int, object]] = {}  # block -> (slot, upload event)

    # ---- a pass --------------------------------------------------------------------
    def in_pass(self) -> bool:
        return bool(self._queue or self._resident)

    def begin(self, order: list[int]) -> None:
        if self._queue or self._resident:
            raise RuntimeError("offload: a block pass started before the previous one ended")
        self._queue = deque(order)
        self._prefetch()

    def acquire(self, i: int) -> None:
        if not self._queue or self._queue[0] != i:
            raise RuntimeError(f"offload: block {i} was called out of the expected order {list(self._queue)[:3]}")
        self._queue.popleft()
        if i not in self._resident:
            self._upload(i)
        slot, uploaded = self._resident[i]
        self.lanes.compute.wait(uploaded)
        for p, view in zip(self.packed[i].params, self.packed[i].views(self.slots[slot])):
            p.data = view
        self._prefetch()

    def unbind(self, i: int) -> None:
        """Point block ``i``'s parameters at empty placeholders (it is not resident)."""
        for p in self.packed[i].params:
            p.data = self._placeholder[id(p)]

    def release(self, i: int, write_back: bool, version: int, round_seed: int) -> None:
        self.unbind(i)
        slot, _ = self._resident.pop(i)
        computed = self.lanes.compute.record()
        freed = computed
        if write_back:
            freed = self._offload(i, slot, computed, version, round_seed)
        self._slot_free_event[slot] = freed
        self._free.append(slot)

    def abort(self) -> None:
        """Forget a pass cut short by an error (resident blocks are dropped, not written)."""
        for i in list(self._resident):
            self.release(i, write_back=False, version=0, round_seed=0)
        for future in self._fetches.values():
            try:
                future.result().release(None)
            except Exception:  # noqa: BLE001 -- the error that aborted the pass is already raised
                pass
        self._fetches.clear()
        self._queue.clear()

    # ---- copies ---------------------------------------------------------------------
    def _prefetch(self) -> None:
        ahead = list(self._queue)[:self.depth + 1]
        for j in ahead:
            if j not in self._fetches and j not in self._resident:
                self._fetches[j] = self.store.fetch(j)
        for j in ahead[:self.depth]:
            if j not in self._resident and self._free:
                self._upload(j)

    def _upload(self, j: int) -> None:
        if j not in self._fetches:
            self._fetches[j] = self.store.fetch(j)
        host = self._fetches.pop(j).result()
        slot = self._free.popleft()
        n = self.packed[j].numel
        up = self.lanes.upload
        with up.use():
            up.wait(self._slot_free_event[slot])
            up.wait(host.ready)
            if self.staging is None:
                self.slots[slot][:n].copy_(host.tensor, non_blocking=True)
            else:  # the host copy's bytes, decoded on the device (a float host dtype: exact)
                m = self.store.numels[j]
                self.staging[slot][:m].copy_(host.tensor, non_blocking=True)
                self.fmt.decode(j, self.slots[slot][:n], self.staging[slot][:m])
            uploaded = up.record()
        host.release(uploaded)
        self._resident[j] = (slot, uploaded)

    def _offload(self, i: int, slot: int, computed, version: int, round_seed: int):
        n, m = self.packed[i].numel, self.store.numels[i]
        target = self.store.write_target(i)
        off = self.lanes.offload
        with off.use():
            off.wait(computed)
            src = self.slots[slot][:n]
            if self.staging is not None:  # encoded on the device, stochastically rounded
                self.fmt.encode(i, self.staging[slot][:m], src, round_seed)
                src = self.staging[slot][:m]
            target[:m].copy_(src, non_blocking=True)
            copied = off.record()
        self.store.commit(i, target, copied, version)
        return copied
