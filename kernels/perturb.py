"""In-place counter-based perturbation ``p <- p + alpha z(seed)`` (issue #17): reference and entry points.

``z`` is a pure function of the 64-bit ``seed`` (one per parameter and step,
:func:`lowmem.optim.zo_noise.param_seed`) and of the element's flat position, made
by a counter-based generator, so a zeroth-order step needs no ``z`` buffer: the
kernel regenerates ``z`` where it adds it (Salmon et al., 2011, "Parallel random
numbers: as easy as 1, 2, 3", §4: Philox4x32-10, the generator of ``tl.randn``)::

    key     = (seed mod 2^32, seed div 2^32)           counter = (c mod 2^32, c div 2^32, 0, 0)
    round r (10 times):  hi, lo = mulhilo(A, x0), mulhilo(B, x2)
                         (x0, x1, x2, x3) <- (hi_B ^ x1 ^ k0, lo_B, hi_A ^ x3 ^ k1, lo_A)
                         k0 += 0x9E3779B9 ; k1 += 0xBB67AE85                         (mod 2^32)
    u_i = v_i * 4.6566127342e-10, v_i = x_i as int32, complemented when negative    (in [0, 1))
    (n1, n2) = sqrt(-2 ln max(u1, 1e-7)) (cos, sin)(2 pi u2)          Box-Muller, as tl.randn4x
    (n3, n4) = the same from (u3, u4)                                  all in fp32

Counter ``c`` gives four normals. Elements are laid out by tiles of
``TILE = 4 * LANES``: element ``e = t * TILE + k * LANES + j`` (``0 <= j < LANES``)
takes normal ``n_{k+1}`` of counter ``t * LANES + j``, so a Triton program
(one tile) loads and stores four coalesced runs of ``LANES`` elements. ``e`` is the
position in the whole parameter: a tensor holding its elements ``[start, start + n)``
(an FSDP2 shard, :mod:`lowmem.optim.zo_shard`) is given ``start`` and gets exactly
that slice of the parameter's ``z``, generated alone.

Entry points (:func:`write_normal_`, :func:`add_`, :func:`update_`) dispatch to the
Triton kernel (:mod:`lowmem.kernels.perturb_triton`) for contiguous fp32/fp16/bf16
CUDA tensors, and for CPU ones under ``TRITON_INTERPRET=1`` (the tests), like
:func:`lowmem.kernels.quantize.quantize_blockwise`; elsewhere to the PyTorch
reference below, run by tile-aligned chunks (a chunk's ``z`` is the only temporary).
The kernel computes in fp32 and rounds once per store; the reference makes the same
operations as :func:`lowmem.optim.zo_noise.sgd_update_` does for the other noise kinds.
"""

from __future__ import annotations

from concurrent.futures import Executor

import torch

from lowmem.kernels.quantize import use_triton

PHILOX_A, PHILOX_B = 0xD2511F53, 0xCD9E8D57     # round multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85           # Weyl key increments
ROUNDS = 10
LANES = 1024                                    # counters per tile
TILE = 4 * LANES                                # elements per tile
CHUNK = 32 * TILE                               # elements per reference chunk (its temporaries stay in cache)
_M32 = 0xFFFFFFFF
_SCALE = 4.6566127342e-10                       # Triton's uint_to_uniform_float for 32-bit words
_TWO_PI = 6.283185307179586
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def philox4x32(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of ``counters`` (int64) under key ``seed``: four int64 tensors in ``[0, 2^32)``.

    Products of two 32-bit words wrap in int64 with the bits of the uint64 product,
    so ``hi = (x >> 32) & M32`` (masking undoes the sign extension) and ``lo = x & M32``."""
    zero = torch.zeros_like(counters)
    return philox_rounds(counters & _M32, (counters >> 32) & _M32, zero, zero, seed & _M32, (seed >> 32) & _M32)


def philox_rounds(x0, x1, x2, x3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """The 10 rounds on counter words ``x0..x3`` (int64 tensors in ``[0, 2^32)``) and key ``(k0, k1)``."""
    for _ in range(ROUNDS):
        pa, pb = x0 * PHILOX_A, x2 * PHILOX_B
        x0, x1, x2, x3 = ((pb >> 32) & _M32) ^ x1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ x3 ^ k1, pa & _M32
        k0, k1 = (k0 + KEY_A) & _M32, (k1 + KEY_B) & _M32
    return x0, x1, x2, x3


def uniform(words: torch.Tensor) -> torch.Tensor:
    """fp32 in [0, 1) from 32-bit words: as int32, ``~v`` when negative, times 2^-31 (rounded below 1)."""
    v = torch.where(words >= 1 << 31, words ^ _M32, words)
    return v.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(torch.clamp_min(u1, 1e-7)))
    th = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    return r * torch.cos(th), r * torch.sin(th)


def philox_normal(seed: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``z[start : start + n]`` of ``seed`` in fp32 (reference)."""
    t0, t1 = start // TILE, -(-(start + n) // TILE)
    counters = torch.arange(t0 * LANES, t1 * LANES, dtype=torch.int64, device=device)   # (T * LANES,)
    u = [uniform(x) for x in philox4x32(seed, counters)]
    n1, n2 = box_muller(u[0], u[1])
    n3, n4 = box_muller(u[2], u[3])
    z = torch.stack([n1, n2, n3, n4]).view(4, t1 - t0, LANES).transpose(0, 1)          # (T, 4, LANES)
    off = start - t0 * TILE
    return z.reshape(-1)[off:off + n]


def _by_chunks(flat: torch.Tensor, seed: int, apply, pool: Executor | None, first: int = 0) -> None:
    """``apply(piece, z)`` on chunks of ``flat``, which holds the elements ``first + (0 .. n-1)`` of ``z``
    (on ``pool``'s threads when given)."""
    n = flat.numel()

    def work(start: int) -> None:
        stop = min(start + CHUNK, n)
        apply(flat[start:stop], philox_normal(seed, first + start, stop - start, flat.device))

    starts = range(0, n, CHUNK)
    if pool is None or len(starts) < 2:
        for s in starts:
            work(s)
    else:
        list(pool.map(work, starts))


def _kernel_ok(t: torch.Tensor) -> bool:
    return t.dtype in _KERNEL_DTYPES and t.is_contiguous() and use_triton(t)


def _update_ref(piece: torch.Tensor, z: torch.Tensor, restore: float, decay: float, alpha: float) -> None:
    """The operations of :func:`lowmem.optim.zo_noise.sgd_update_` on one chunk."""
    if restore:
        piece.add_(z, alpha=restore)
    if decay != 1.0:
        piece.mul_(decay)
    piece.add_(z, alpha=alpha)


def write_normal_ref_(out: torch.Tensor, seed: int, pool: Executor | None = None, start: int = 0) -> torch.Tensor:
    _by_chunks(out.view(-1), seed, lambda piece, z: piece.copy_(z), pool, start)
    return out


def add_ref_(t: torch.Tensor, seed: int, alpha: float, pool: Executor | None = None, start: int = 0) -> None:
    if t.is_contiguous():
        _by_chunks(t.view(-1), seed, lambda piece, z: piece.add_(z, alpha=alpha), pool, start)
    else:
        t.add_(philox_normal(seed, start, t.numel(), t.device).view(t.shape), alpha=alpha)


def update_ref_(t: torch.Tensor, seed: int, restore: float, decay: float, alpha: float,
                pool: Executor | None = None, start: int = 0) -> None:
    if t.is_contiguous():
        _by_chunks(t.view(-1), seed, lambda piece, z: _update_ref(piece, z, restore, decay, alpha), pool, start)
    else:
        _update_ref(t, philox_normal(seed, start, t.numel(), t.device).view(t.shape), restore, decay, alpha)


def write_normal_(out: torch.Tensor, seed: int, pool: Executor | None = None, start: int = 0) -> torch.Tensor:
    """``out`` (contiguous) <- ``z(seed)[start : start + numel]`` shaped like it, in its dtype (``start``:
    the flat position of ``out``'s first element in its parameter, e.g. an FSDP2 shard's)."""
    if not _kernel_ok(out):
        return write_normal_ref_(out, seed, pool, start)
    from lowmem.kernels.perturb_triton import perturb_triton

    perturb_triton(out, seed, mode=0, start=start)
    return out


def add_(t: torch.Tensor, seed: int, alpha: float, pool: Executor | None = None, start: int = 0) -> None:
    """In place: ``t += alpha * z(seed)[start : start + numel]`` (the kernel: one fp32 multiply-add per
    element, one rounding)."""
    if not _kernel_ok(t):
        return add_ref_(t, seed, alpha, pool, start)
    from lowmem.kernels.perturb_triton import perturb_triton

    perturb_triton(t, seed, mode=1, alpha=alpha, start=start)


def update_(t: torch.Tensor, seed: int, restore: float, decay: float, alpha: float,
            pool: Executor | None = None, start: int = 0) -> None:
    """In place, one draw of ``z = z(seed)[start : start + numel]``: ``t += restore z`` (its own rounding),
    ``t *= decay``, ``t += alpha z``."""
    if not _kernel_ok(t):
        return update_ref_(t, seed, restore, decay, alpha, pool, start)
    from lowmem.kernels.perturb_triton import perturb_triton

    perturb_triton(t, seed, mode=3 if restore else 2, restore=restore, decay=decay, alpha=alpha, start=start)
