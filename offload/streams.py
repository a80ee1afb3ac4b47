"""CUDA streams and events for the ZO2 schedule, their no-op stand-ins on the CPU, and pinned host memory.

ZO2 (Wang et al., 2025, arXiv 2503.12668, §3.2) overlaps three kinds of work on three CUDA streams:
the upload of block i+1 (host -> GPU), the compute of block i, and the offload of
block i-1 (GPU -> host). A :class:`Lane` is one such stream; ordering between lanes
is expressed only with events (``lane.wait(event)``), never with a device-wide
synchronize. The compute lane is whatever stream is current when it is used (a caller
may run a step under its own ``torch.cuda.stream``), not the one current at construction.
On a CPU "device" there are no streams: every copy is synchronous, ``record`` returns
``None`` and waiting on ``None`` is a no-op, so the very same schedule runs (and is
tested) without a GPU. ``BACKEND`` is the stream/event API in use (``torch.cuda``); tests
replace it with a recorder to check the order of waits and records on the CPU.

Pinned host memory (:class:`HostMemory`): PyTorch's pinned allocator rounds every
allocation up to a power of two and caches freed blocks (48 OPT-30B blocks of 1.15 GiB
would pin 96 GiB for 55 GiB of data). A store instead allocates ordinary host memory of
the exact size and page-locks it with ``cudaHostRegister``; each buffer can be unpinned
and handed back on its own (``release``), so closing a store frees block by block.
"""

from __future__ import annotations

import contextlib

import torch

BACKEND = torch.cuda  # streams, events, stream context; replaced by a recorder in tests


def uses_streams(device: torch.device) -> bool:
    return device.type == "cuda"


class Lane:
    """One stream of work on ``device``: the current stream (compute) or a side stream."""

    def __init__(self, device: torch.device, side: bool):
        self.device, self.side = device, side
        self.active = uses_streams(device)
        self._side_stream = BACKEND.Stream(device) if self.active and side else None

    @property
    def stream(self):
        if not self.active:
            return None
        return self._side_stream if self.side else BACKEND.current_stream(self.device)

    def use(self):
        """Context in which kernels and copies are queued on this lane."""
        return BACKEND.stream(self.stream) if self.active else contextlib.nullcontext()

    def record(self):
        """An event marking everything queued on this lane so far (``None`` on CPU)."""
        if not self.active:
            return None
        event = BACKEND.Event()
        event.record(self.stream)
        return event

    def wait(self, event) -> None:
        """Make later work on this lane wait for ``event`` (GPU-side; no host stall)."""
        if event is not None and self.active:
            self.stream.wait_event(event)


def host_wait(event) -> None:
    """Block the calling host thread until ``event`` has completed (no-op for ``None``)."""
    if event is not None:
        event.synchronize()


class Lanes:
    """The three lanes of the schedule: ``upload``, ``compute`` (the current stream) and ``offload``."""

    def __init__(self, device: torch.device):
        self.upload = Lane(device, side=True)
        self.compute = Lane(device, side=False)
        self.offload = Lane(device, side=True)


def _cudart_register(t: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"offload: cudaHostRegister of {t.numel() * t.element_size()} bytes failed ({err})")


def _cudart_unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def _torch_pinned(numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, pin_memory=True)


class HostMemory:
    """The host buffers of one store: exact-size allocations, page-locked by registration when
    ``pin`` (no power-of-two rounding, no allocator cache), each released on its own. Where the
    platform refuses ``cudaHostRegister`` (some sandboxes), PyTorch's pinned allocator is used
    instead (``fallback`` says so): rounded sizes, but pinned."""

    register, unregister = staticmethod(_cudart_register), staticmethod(_cudart_unregister)
    pinned_empty = staticmethod(_torch_pinned)

    def __init__(self, pin: bool):
        self.pin, self.fallback = pin, False
        self._live: dict[int, tuple[torch.Tensor, bool]] = {}  # data_ptr -> (buffer, registered by us)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not (self.pin and numel):
            return torch.empty(numel, dtype=dtype)
        if not self.fallback:
            t = torch.empty(numel, dtype=dtype)
            try:
                self.register(t)
                self._live[t.data_ptr()] = (t, True)
                return t
            except RuntimeError:
                self.fallback = True
        t = self.pinned_empty(numel, dtype)
        self._live[t.data_ptr()] = (t, False)
        return t

    def release(self, t: torch.Tensor) -> torch.Tensor:
        """Unpin ``t`` (a buffer of :meth:`empty`; every copy touching it must be complete) and
        return it as ordinary memory, freed when the caller drops it (a fallback buffer stays pinned)."""
        entry = self._live.pop(t.data_ptr(), None)
        if entry is not None and entry[1]:
            self.unregister(t)
        return t

    @property
    def pinned_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _ in self._live.values())

    def close(self) -> None:
        for t, _ in list(self._live.values()):
            self.release(t)
        if self.fallback:  # hand PyTorch's cached pinned blocks back to the OS (not kept for the next model)
            self._live.clear()
            getattr(torch._C, "_host_emptyCache", lambda: None)()
