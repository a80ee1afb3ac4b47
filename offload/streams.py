"""CUDA streams and events for the ZO2 schedule, and their no-op stand-ins on the CPU.

ZO2 (Wang et al., 2025, §3.2) overlaps three kinds of work on three CUDA streams:
the upload of block i+1 (host -> GPU), the compute of block i, and the offload of
block i-1 (GPU -> host). A :class:`Lane` is one such stream; ordering between lanes
is expressed only with events (``lane.wait(event)``), never with a device-wide
synchronize. On a CPU "device" there are no streams: every copy is synchronous,
``record`` returns ``None`` and waiting on ``None`` is a no-op, so the very same
schedule runs (and is tested) without a GPU.
"""

from __future__ import annotations

import contextlib

import torch


class Lane:
    """One stream of work on ``device``: the current stream (compute) or a side stream."""

    def __init__(self, device: torch.device, side: bool):
        self.device = device
        self.stream = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device) if side else torch.cuda.current_stream(device)

    def use(self):
        """Context in which kernels and copies are queued on this lane."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self):
        """An event marking everything queued on this lane so far (``None`` on CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, event) -> None:
        """Make later work on this lane wait for ``event`` (GPU-side; no host stall)."""
        if event is not None and self.stream is not None:
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


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A flat host buffer, page-locked when ``pin`` so that copies to the GPU can be asynchronous."""
    return torch.empty(numel, dtype=dtype, pin_memory=pin)
