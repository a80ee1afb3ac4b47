"""Triton kernel of the in-place counter-based perturbation (:mod:`lowmem.kernels.perturb`).

One program per tile of ``TILE = 4 * LANES`` elements of the whole parameter (a tensor holding its
elements ``[start, start + n)``, an FSDP2 shard, launches the tiles it overlaps and masks the rest):
``tl.randn4x(seed, counters)``
gives four normals per counter (Philox4x32-10 and Box-Muller, the reference's), and
normal ``k`` goes to the ``k``-th run of ``LANES`` elements of the tile. ``z`` lives
in registers only. Modes (constexpr)::

    0  p = z                                   (write z: Noise.view / draw)
    1  p = p + alpha z                         (a perturbation: +eps, -2 eps, +eps)
    2  p = p * decay + alpha z                 (MeZO's update, decay = 1 - lr wd)
    3  p = round(p + restore z); mode 2        (restore, rounded to p's dtype as its own add, then the update)

Mode 3 rounds after the restore so that it equals mode 1 then mode 2 (the ZO2 engine
restores in one visit and updates in the next); the maths is fp32, one rounding per store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowmem.kernels.perturb import LANES, TILE


@triton.jit
def _apply(ptr, offs, n, z, restore, decay, alpha, MODE: tl.constexpr):
    mask = (offs >= 0) & (offs < n)
    if MODE == 0:
        out = z
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            out = x + alpha * z
        else:
            if MODE == 3:
                x = (x + restore * z).to(ptr.dtype.element_ty).to(tl.float32)
            out = x * decay + alpha * z
    tl.store(ptr + offs, out.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "start", "first_tile"])  # no variant per value divisible by 16
def _perturb_kernel(ptr, n, seed, start, first_tile, restore, decay, alpha, LANES: tl.constexpr,
                    MODE: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64) + first_tile                     # a tile of the whole parameter
    lanes = tl.arange(0, LANES)
    n1, n2, n3, n4 = tl.randn4x(seed, tile * LANES + lanes)                 # 4 x (LANES,) fp32
    base = tile * (4 * LANES) + lanes - start                               # positions in ptr's elements
    _apply(ptr, base, n, n1, restore, decay, alpha, MODE)
    _apply(ptr, base + LANES, n, n2, restore, decay, alpha, MODE)
    _apply(ptr, base + 2 * LANES, n, n3, restore, decay, alpha, MODE)
    _apply(ptr, base + 3 * LANES, n, n4, restore, decay, alpha, MODE)


@triton.jit
def _words_kernel(out_ptr, seed, first, n_counters, LANES: tl.constexpr):
    """The raw Philox words of counters ``first + (0 .. n_counters-1)`` into ``out (4, n_counters)`` (tests)."""
    c = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    mask = c < n_counters
    i1, i2, i3, i4 = tl.randint4x(seed, first + c)
    tl.store(out_ptr + c, i1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_ptr + n_counters + c, i2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_ptr + 2 * n_counters + c, i3.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_ptr + 3 * n_counters + c, i4.to(tl.int64) & 0xFFFFFFFF, mask=mask)


def perturb_triton(t: torch.Tensor, seed: int, mode: int, restore: float = 0.0, decay: float = 1.0,
                   alpha: float = 1.0, start: int = 0) -> None:
    """Launch one program per tile of the whole parameter's layout that the contiguous ``t`` (fp32, fp16 or
    bf16; its elements ``[start, start + numel)`` of the parameter) overlaps, in place."""
    n = t.numel()
    if n:
        first, last = start // TILE, -(-(start + n) // TILE)
        _perturb_kernel[(last - first,)](t, n, seed, start, first, float(restore), float(decay), float(alpha),
                                         LANES=LANES, MODE=mode)


def philox_words_triton(seed: int, n_counters: int, device: torch.device | str, first: int = 0) -> torch.Tensor:
    """(4, n_counters) int64: the kernel's Philox words of counters ``first ...``, to compare with the
    reference bit for bit."""
    out = torch.empty(4, n_counters, dtype=torch.int64, device=device)
    _words_kernel[(-(-n_counters // LANES),)](out, seed, first, n_counters, LANES=LANES)
    return out
