"""Triton kernels of the fused 8-bit AdamW and SGD-momentum steps (Dettmers et al., 2021).

Same operation as :func:`lowmem.kernels.adamw8bit_step.adam8bit_step_ref`, in one
pass over memory: each program loads ``ROWS`` blocks of p, g and the codes,
dequantizes with the 256-entry maps, updates in fp32, writes p in its own dtype,
reduces the new absmax per block and requantizes (bisection over the midpoints,
shared with :mod:`lowmem.kernels.quantize_triton`). Bytes moved per element for
Adam: 2e (p) + e (g) + 4 (codes in and out) + 16/B (absmax), against 2e + e + 16
for fp32-state AdamW.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowmem.kernels.adamw8bit_step import AdamScalars
from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize_triton import dequant_tile, launch_grid, quant_tile, tile_offsets


@triton.jit
def _requant_store(x, codes_ptr, absmax_ptr, mid_ptr, map_ptr, rows, offs, mask, nblocks, SIGNED: tl.constexpr):
    codes, absmax = quant_tile(x, mid_ptr)
    if SIGNED:  # keep the momentum's sign: a tiny negative value must not become code(+0)
        codes = tl.where((x < 0) & (tl.load(map_ptr + codes) >= 0), codes - 1, codes)
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)


@triton.jit
def _adam8bit_kernel(p_ptr, g_ptr, c1_ptr, a1_ptr, c2_ptr, a2_ptr, map1_ptr, mid1_ptr, map2_ptr, mid2_ptr,
                     n, nblocks, beta1, beta2, omb1, omb2, step_size, eps_hat, decay,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows, offs, mask = tile_offsets(tl.program_id(0), n, BLOCK, ROWS)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ok = mask & (g == g) & (tl.abs(g) != float("inf"))               # finite gradient elements
    g = tl.where(ok, g, 0.0)
    m = dequant_tile(c1_ptr, a1_ptr, map1_ptr, rows, offs, mask, nblocks)
    v = dequant_tile(c2_ptr, a2_ptr, map2_ptr, rows, offs, mask, nblocks)
    m = tl.where(ok, m * beta1 + g * omb1, 0.0)
    v = tl.where(ok, v * beta2 + g * omb2 * g, 0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    new = (p.to(tl.float32) + step_size * (m / (tl.sqrt(v) + eps_hat))).to(p.dtype)
    new = (new.to(tl.float32) * decay).to(p.dtype)                   # decoupled decay, rounded again
    tl.store(p_ptr + offs, new, mask=ok)
    _requant_store(m, c1_ptr, a1_ptr, mid1_ptr, map1_ptr, rows, offs, mask, nblocks, True)
    _requant_store(v, c2_ptr, a2_ptr, mid2_ptr, map2_ptr, rows, offs, mask, nblocks, False)


@triton.jit
def _momentum8bit_kernel(p_ptr, g_ptr, c1_ptr, a1_ptr, map1_ptr, mid1_ptr, n, nblocks, lr, beta1, weight_decay,
                         first, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows, offs, mask = tile_offsets(tl.program_id(0), n, BLOCK, ROWS)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) + p.to(tl.float32) * weight_decay
    m = dequant_tile(c1_ptr, a1_ptr, map1_ptr, rows, offs, mask, nblocks)
    m = tl.where(mask, tl.where(first != 0, g, m * beta1 + g), 0.0)
    tl.store(p_ptr + offs, (p.to(tl.float32) - lr * m).to(p.dtype), mask=mask)
    _requant_store(m, c1_ptr, a1_ptr, mid1_ptr, map1_ptr, rows, offs, mask, nblocks, True)


def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = dynamic_map(signed, device)
    return code, (code[:-1] + code[1:]) / 2


def _run_in_place(p: torch.Tensor, launch) -> None:
    """The interpreter ignores strides and the kernel assumes a flat layout: work on a contiguous p."""
    flat = p if p.is_contiguous() else p.contiguous()
    launch(flat)
    if flat is not p:
        p.copy_(flat)


def adam8bit_step_triton(p, g, codes1, absmax1, codes2, absmax2, k: AdamScalars, blocksize: int) -> None:
    if p.numel() == 0:
        return
    map1, mid1 = _tables(True, p.device)
    map2, mid2 = _tables(False, p.device)
    programs, rows = launch_grid(p.numel(), blocksize)
    _run_in_place(p, lambda flat: _adam8bit_kernel[(programs,)](
        flat, g.contiguous(), codes1, absmax1, codes2, absmax2, map1, mid1, map2, mid2, p.numel(), absmax1.numel(),
        k.beta1, k.beta2, k.one_minus_beta1, k.one_minus_beta2, k.step_size, k.eps_hat, k.decay,
        BLOCK=blocksize, ROWS=rows))


def momentum8bit_step_triton(p, g, codes1, absmax1, lr: float, beta1: float, weight_decay: float, step: int,
                             blocksize: int) -> None:
    if p.numel() == 0:
        return
    map1, mid1 = _tables(True, p.device)
    programs, rows = launch_grid(p.numel(), blocksize)
    _run_in_place(p, lambda flat: _momentum8bit_kernel[(programs,)](
        flat, g.contiguous(), codes1, absmax1, map1, mid1, p.numel(), absmax1.numel(), lr, beta1, weight_decay,
        int(step == 1), BLOCK=blocksize, ROWS=rows))
