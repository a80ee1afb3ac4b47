"""Rounding the compute copy of a block to its (lower-precision) host copy.

ZO2 (Wang et al., 2025, arXiv 2503.12668, §3.4, "AMP mode") keeps blocks on the host in fp16 and
computes in higher precision, which halves the PCIe bytes per block. The pitfall of
that mode: an update ``lr * g * z`` of ~1e-7 is far below half an ulp of
a bf16/fp16 weight (~1e-3 relative), so round-to-nearest writes back the old value
and training silently stops.

What is rounded, precisely (``host_dtype`` lower than the training dtype):

* upload: host value -> training dtype, exact (every bf16/fp16 value is an fp32 value);
* on the device, in the training dtype: the deferred update, the ``+eps z``,
  ``-2 eps z``, ``+eps z`` perturbations and both forwards -- exactly as in memory;
* offload: the result is rounded **stochastically** to ``host_dtype``: to the
  neighbour above with probability ``(x - lo) / (hi - lo)``, else to the one below.
  ``E[round(x)] = x``, so updates far below an ulp still move the weights on
  average (Gupta et al., 2015), and the host copy is the only copy (no fp32 master).

The random numbers come from a private generator seeded per (step, block), so a
run is reproducible and resumes exactly. Work is chunked so the temporaries stay
a few MB whatever the block size.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 22  # elements per chunk: bounds the fp32 temporaries to ~16 MB each


def is_lower_precision(host_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    return torch.finfo(host_dtype).eps > torch.finfo(compute_dtype).eps


@torch.no_grad()
def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, seed: int) -> None:
    """``dst <- SR(src)`` for flat tensors on one device; ``dst`` has the lower precision."""
    gen = torch.Generator(device=src.device).manual_seed(seed)
    for start in range(0, src.numel(), _CHUNK):
        x = src[start:start + _CHUNK].float()
        near = x.to(dst.dtype)                                    # round to nearest
        near_f = near.float()
        away = torch.where(near_f > x, float("-inf"), float("inf")).to(dst.dtype)
        other = torch.nextafter(near, away)                       # the neighbour on x's other side
        gap = (other.float() - near_f).abs()
        p_other = ((x - near_f).abs() / gap).nan_to_num_(0.0)   # 0 when x is representable or at overflow
        u = torch.rand(x.shape, generator=gen, device=x.device)
        dst[start:start + _CHUNK] = torch.where(u < p_other, other, near)


def round_into(dst: torch.Tensor, src: torch.Tensor, seed: int) -> None:
    """Copy ``src`` into ``dst``: exact if the dtypes match, stochastic rounding if ``dst`` is coarser."""
    if dst.dtype == src.dtype:
        dst.copy_(src)
    else:
        stochastic_round_(dst, src, seed)
