"""Measure memory: optimizer-state bytes, peak RSS, peak CUDA memory, saved-activation bytes.

Measured, never estimated: state bytes are summed over the optimizer's own
tensors (``optimizer.state``), peak RSS comes from the kernel (``ru_maxrss``),
saved-activation bytes from ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    """Bytes held in tensors of ``optimizer.state`` (for ``params`` only, if given).

    Scalar step counters are included: they are part of the state a checkpoint carries.
    """
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, state in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cuda_peak_bytes(device: torch.device | None = None) -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device)


class SavedTensorMeter:
    """Counts bytes that autograd saves for backward inside the ``with`` block.

    Tensors sharing storage are counted once (a view saved twice costs nothing extra).
    """

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
