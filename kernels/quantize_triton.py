"""Triton kernels for blockwise dynamic quantization (Dettmers et al., 2021, §2.1).

Same operation as :func:`lowmem.kernels.quantize.quantize_blockwise_ref`: one
program handles ``ROWS`` quantization blocks of ``BLOCK`` elements as a
``(ROWS, BLOCK)`` tile, reduces absmax per row, and finds the nearest map value
by bisecting the 255 midpoints (8 gathers from a 1 KiB table that stays in L1),
which is ``torch.bucketize``'s rule, so the codes equal the reference's bit for
bit. Maths in fp32 whatever the input dtype (loads upcast exactly).

The jit helpers (``nearest_code``, ``block_absmax``...) are shared with the
fused optimizer step (:mod:`lowmem.kernels.adamw8bit_step`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowmem.kernels.quantize import num_blocks

TILE = 4096  # elements per program: ROWS = TILE // blocksize quantization blocks


@triton.jit
def nearest_code(x, mid_ptr):
    """Number of midpoints strictly below ``x`` = index of the nearest map value (ties down)."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(8):
        cand = idx + (128 >> s)
        ok = cand <= 255
        bound = tl.load(mid_ptr + tl.where(ok, cand - 1, 0), mask=ok, other=float("inf"))
        idx = tl.where(bound < x, cand, idx)
    return idx


@triton.jit
def tile_offsets(pid, n, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Rows (block ids), element offsets ``(ROWS, BLOCK)`` and the in-bounds mask of program ``pid``."""
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    return rows, offs, offs < n


@triton.jit
def dequant_tile(codes_ptr, absmax_ptr, map_ptr, rows, offs, mask, nblocks):
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    a = tl.load(absmax_ptr + rows, mask=rows < nblocks, other=0.0)
    return tl.load(map_ptr + c) * a[:, None]


@triton.jit
def quant_tile(x, mid_ptr):
    """Codes (int32) and per-row absmax of an fp32 tile whose out-of-bounds lanes hold 0."""
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.where(absmax > 0, absmax, 1.0)
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), safe), 0.0)
    scaled = tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)
    return nearest_code(scaled, mid_ptr), absmax


@triton.jit
def _quantize_kernel(x_ptr, mid_ptr, codes_ptr, absmax_ptr, n, nblocks,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows, offs, mask = tile_offsets(tl.program_id(0), n, BLOCK, ROWS)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    codes, absmax = quant_tile(x, mid_ptr)
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, map_ptr, out_ptr, n, nblocks,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows, offs, mask = tile_offsets(tl.program_id(0), n, BLOCK, ROWS)
    tl.store(out_ptr + offs, dequant_tile(codes_ptr, absmax_ptr, map_ptr, rows, offs, mask, nblocks), mask=mask)


def launch_grid(numel: int, blocksize: int) -> tuple[int, int]:
    """(number of programs, ROWS) for a tensor of ``numel`` elements."""
    rows = max(1, TILE // blocksize)
    return max(1, -(-num_blocks(numel, blocksize) // rows)), rows


def quantize_blockwise_triton(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()  # the interpreter ignores strides
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, absmax
    mid = ((code[:-1] + code[1:]) / 2).to(x.device)
    programs, rows = launch_grid(n, blocksize)
    _quantize_kernel[(programs,)](x, mid, codes, absmax, n, absmax.numel(), BLOCK=blocksize, ROWS=rows)
    return codes, absmax


def dequantize_blockwise_triton(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                                shape) -> torch.Tensor:
    codes, absmax = codes.contiguous(), absmax.contiguous()
    n = codes.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        programs, rows = launch_grid(n, blocksize)
        _dequantize_kernel[(programs,)](codes, absmax, code.to(codes.device), out, n, absmax.numel(),
                                        BLOCK=blocksize, ROWS=rows)
    return out.reshape(shape)
