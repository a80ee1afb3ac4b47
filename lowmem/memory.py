"""Measure memory: optimizer-state bytes, peak RSS, peak CUDA memory, saved-activation bytes.

Measured, never estimated: state bytes are summed over the optimizer's own
tensors (``optimizer.state``), peak RSS comes from the kernel (``ru_maxrss``),
saved-activation bytes from ``torch.autograd.graph.saved_tensors_hooks``.

This module only measures: the step whose memory is measured and predicted is the trainer's own
(:mod:`lowmem.steps`); ``python -m lowmem.tools.measure RECIPE.yaml [--forward]`` measures one in a
fresh process, and :mod:`lowmem.planner` traces the same step on fake tensors.

Both that process and ``lowmem-train`` first call :func:`fix_malloc_threshold`, so that on
glibc the memory of a freed tensor goes back to the OS and peak RSS follows the live tensors
(the planner's model); without it a step's peak RSS carries hundreds of MiB of freed, retained
heap (issue #8). A script of your own (e.g. with the Hugging Face ``Trainer``) can call it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds for ``t``: of a ``DTensor`` (FSDP2), its local shard."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


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


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (``VmHWM``) to the current RSS, so that
    :func:`window_peak_rss_bytes` reports the peak from now on (Linux; False elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``; ``ru_maxrss`` is not reset)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return peak_rss_bytes()


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


class PhasePeaks:
    """The measured peak RSS of each phase of a run (build, step, eval, save: what :mod:`lowmem.planner.phases`
    predicts): ``VmHWM`` reset on entering a phase and read on leaving it, the max over its visits."""

    def __init__(self):
        self.bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        reset_peak_rss()
        try:
            yield
        finally:
            self.bytes[name] = max(self.bytes.get(name, 0), window_peak_rss_bytes())

    def gb(self) -> dict[str, float]:
        return {k: round(v / 2**30, 3) for k, v in self.bytes.items()}

    def run_peak_gb(self) -> float:
        """The run's peak RSS: resetting ``VmHWM`` also resets ``ru_maxrss`` (Linux), so the phases' peaks count."""
        return round(max(peak_rss_bytes(), *self.bytes.values()) / 2**30, 3)


M_MMAP_THRESHOLD = -3      # mallopt parameter number (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default threshold, kept fixed
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def fix_malloc_threshold() -> bool:
    """Keep glibc's mmap threshold at its default 128 KiB instead of letting it grow (issue #8).

    glibc serves blocks above the threshold with ``mmap`` and unmaps them when freed, but each
    such free raises the threshold to the freed size (up to 32 MiB, ``mallopt(3)``); tensors of
    that size then come from the heap, whose freed memory stays resident (only the top is
    trimmed). Measured on SmolLM2-135M shapes, batch 2 x 256, fp32, APOLLO-Mini with 8-bit
    states, layer-wise, checkpointing (fresh processes, 2-core CPU): peak RSS 1575-1625 MiB
    after one step and 1820-1830 MiB after four with the dynamic threshold, 1358 and 1422 MiB
    with it fixed, while the planner's baseline + live tensors is 1321 MiB. The price is a page
    fault per fresh page of every block above 128 KiB: about 10% more step time on that run. Setting one of the ``MALLOC_*_`` tunables of
    :data:`MALLOC_ENV` (which also fixes the threshold) is the user's choice and left alone.
    Returns whether the threshold was set here (False off glibc)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


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
