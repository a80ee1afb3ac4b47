"""When the first-order engine swaps block-boundary activations to host memory, from measurements.

Fuyou (Liao et al., 2024, arXiv 2403.06504, §4, "GPU-CPU-SSD fully-pipelined activation
swapping" and "automatic activation swapping") keeps the activations a recomputing backward needs
either on the GPU or in host memory, and decides how many to swap from a profiled iteration and
measured bandwidths (its artifact, Crispig/Ratel ``get_act_swap_list``, swaps while the transfer
time fits in a fraction of the measured forward time). Here the activations are the block
inputs ``x_1 .. x_{N-1}`` (:mod:`lowmem.offload.fo_driver`; ``x_0`` hangs off the embeddings'
graph and stays). The first training step is the profile step: nothing is swapped (unless forced)
and the engine measures

    B      bytes of one boundary activation (batch x sequence x hidden x dtype)
    t_blk  mean compute time of one block's forward (device synchronized around it)
    bw_d, bw_u   device->host and host->device copy bandwidth of a B-byte tensor (pinned)
    peak   the device's peak allocated bytes in that step (CUDA; None on a CPU device)

Rule (``offload.swap_activations: auto``), for the following steps:

    device = host (CPU "device")              -> swap none (nothing to free)
    peak > device budget (train.device_memory_gb) -> swap ceil((peak - budget) / B), at most N-1
    B / bw_d + B / bw_u <= t_blk             -> swap all N-1 (the round trip hides behind a block)
    else                                      -> swap none

``on`` swaps all ``N - 1`` from the first step and ``off`` none. Swapping never changes a number:
the swapped tensor comes back bit for bit before the block that needs it is recomputed.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Profile:
    """What the profile step measured (see the module docstring)."""

    boundary_bytes: int
    block_s: float
    down_bps: float
    up_bps: float
    device_peak: int | None


def swap_count(mode: str, n_blocks: int, profile: Profile | None, device_type: str,
               device_budget: float | None) -> int:
    """How many boundary activations (``x_1 .. x_count``) the next steps swap to the host."""
    most = max(0, n_blocks - 1)
    if mode != "auto":
        return most if mode == "on" else 0
    if profile is None or device_type != "cuda":
        return 0
    if device_budget is not None and profile.device_peak is not None and profile.device_peak > device_budget:
        return min(most, math.ceil((profile.device_peak - device_budget) / max(1, profile.boundary_bytes)))
    round_trip = profile.boundary_bytes / profile.down_bps + profile.boundary_bytes / profile.up_bps
    return most if round_trip <= profile.block_s else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidths(x: torch.Tensor, repeats: int = 3) -> tuple[float, float]:
    """(device->host, host->device) bytes per second for a tensor like ``x`` (median of ``repeats``)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
    back = torch.empty_like(x)
    downs, ups = [], []
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        host.copy_(x)
        _sync(x.device)
        t1 = time.perf_counter()
        back.copy_(host)
        _sync(x.device)
        downs.append(t1 - t0)
        ups.append(time.perf_counter() - t1)
    nbytes = x.numel() * x.element_size()
    return nbytes / max(statistics.median(downs), 1e-9), nbytes / max(statistics.median(ups), 1e-9)


def take_profile(driver, device: torch.device) -> Profile:
    """After the profile step's backward: what the driver's timer and boundary activation give."""
    timer, x = driver.timer, driver.last_boundary
    driver.timer = driver.last_boundary = None
    down, up = copy_bandwidths(x) if x is not None else (0.0, 0.0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Profile(0 if x is None else x.numel() * x.element_size(), timer.mean_s, max(down, 1e-9),
                   max(up, 1e-9), peak)


class BlockTimer:
    """Mean forward time of the blocks during the profile step (synchronized on CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.count = device, 0.0, 0
        self._t0 = 0.0

    def start(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        _sync(self.device)
        self.total += time.perf_counter() - self._t0
        self.count += 1

    @property
    def mean_s(self) -> float:
        return self.total / max(1, self.count)
