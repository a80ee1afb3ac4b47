"""The fused 8-bit optimizer step (Dettmers et al., 2021, §2 and Algorithm 1): reference and entry points.

Per element of block ``b``, all maths in fp32 (bitsandbytes ``kOptimizerStatic8bit2StateBlockwise``)::

    m = map_s[c1] * A1[b] ;  v = map_u[c2] * A2[b]                   dequantize
    if g finite:  m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
    else:         m = v = 0, p untouched                             (the reference wipes the state)
    p = p - lr sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + sqrt(1-b2^t) eps)   rounded to p's dtype,
    p = p (1 - lr wd)                                                 then decoupled decay, rounded again
    A1[b] = max|m| ; A2[b] = max|v| ; c1 = nearest(map_s, m/A1[b]) ; c2 = nearest(map_u, v/A2[b])
    a negative m never rounds to code(+0): c1 -= 1 then, keeping the sign of the momentum

8-bit SGD with momentum (``kOptimizerStatic8bit1StateBlockwise``, MOMENTUM)::

    g = g + wd p ;  m = g if t == 1 else b1 m + g ;  p = p - lr m     (no non-finite handling, as the reference)

:func:`adam_update_` / :func:`momentum_update_` are the fp32 maths, written once
and also used for parameters whose state stays fp32 (:func:`adam_fp32_step`,
:func:`momentum_fp32_step`). :func:`adam8bit_step` and :func:`momentum8bit_step`
update ``p``, the codes and the absmax in place and dispatch to the Triton kernels
(:mod:`lowmem.kernels.adamw8bit_step_triton`) or, on the CPU, to the C kernels of
:mod:`lowmem.kernels.blockwise_cpu` (the references' bits) like
:func:`lowmem.kernels.quantize.quantize_blockwise`. The PyTorch paths run by chunks
of whole blocks (:func:`by_chunks`, issue #8): on a 28M-element embedding a
whole-tensor pass would hold about 1 GiB of fp32/int64 temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowmem.kernels import blockwise_cpu
from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import (block_chunks, check_blocksize, dequantize_blockwise_ref, quantize_blockwise_ref,
                                     use_triton)


@dataclass(frozen=True)
class AdamScalars:
    """The step's constants, computed once in float64 and used as fp32 by the reference and the kernel."""

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    step_size: float  # -lr sqrt(1-b2^t) / (1-b1^t)
    eps_hat: float  # eps sqrt(1-b2^t)
    decay: float  # 1 - lr wd

    @classmethod
    def of(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> AdamScalars:
        correction2 = math.sqrt(1.0 - beta2 ** step)
        return cls(beta1, beta2, 1.0 - beta1, 1.0 - beta2, -lr * correction2 / (1.0 - beta1 ** step),
                   eps * correction2, 1.0 - lr * weight_decay)


def adam_update_(p32: torch.Tensor, g32: torch.Tensor, m: torch.Tensor, v: torch.Tensor, k: AdamScalars,
                 dtype: torch.dtype) -> torch.Tensor:
    """fp32 Adam maths: updates ``m``, ``v`` in place, returns the new parameter in ``dtype``."""
    ok = torch.isfinite(g32)
    g = torch.where(ok, g32, 0.0)
    m.copy_(torch.where(ok, m * k.beta1 + g * k.one_minus_beta1, 0.0))
    v.copy_(torch.where(ok, v * k.beta2 + g * k.one_minus_beta2 * g, 0.0))
    new = (p32 + k.step_size * (m / (v.sqrt() + k.eps_hat))).to(dtype)
    new = (new.float() * k.decay).to(dtype)  # decoupled decay after the update, as the reference
    return torch.where(ok, new, p32.to(dtype))


def momentum_update_(p32: torch.Tensor, g32: torch.Tensor, m: torch.Tensor, lr: float, beta1: float,
                     weight_decay: float, step: int, dtype: torch.dtype) -> torch.Tensor:
    """fp32 SGD-momentum maths (coupled weight decay, no dampening): updates ``m``, returns the new parameter."""
    g = g32 + p32 * weight_decay
    m.copy_(g if step == 1 else m * beta1 + g)
    return (p32 - lr * m).to(dtype)


def _requantize_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                 blocksize: int) -> None:
    new_codes, new_absmax = quantize_blockwise_ref(x, code, blocksize)
    if code[0] < 0:  # signed map: keep the momentum's sign (a tiny negative value must not become +0)
        new_codes = torch.where((x.reshape(-1) < 0) & (code[new_codes.long()] >= 0), new_codes - 1, new_codes)
    codes.copy_(new_codes.to(torch.uint8).view_as(codes))
    absmax.copy_(new_absmax)


def by_chunks(step_chunk, numel: int, blocksize: int, flat: tuple[torch.Tensor, ...],
              per_block: tuple[torch.Tensor, ...] = (), *args) -> None:
    """``step_chunk(*flat[part], *per_block[blocks], *args)`` over chunks of whole blocks
    (:func:`~lowmem.kernels.quantize.block_chunks`; ``blocksize=1`` for fp32 state): the maths
    is elementwise within a block, so this equals one whole-tensor call bit for bit while the
    temporaries are one chunk's. ``flat`` are 1-D views, updated in place."""
    for part, blocks in block_chunks(numel, blocksize):
        step_chunk(*(t[part] for t in flat), *(t[blocks] for t in per_block), *args)


def _adam_fp32_chunk(p, g, m, v, k: AdamScalars) -> None:
    p.copy_(adam_update_(p.float(), g.float(), m, v, k, p.dtype))


def adam_fp32_step(p, g, m, v, k: AdamScalars) -> None:
    """AdamW with fp32 moments ``m``, ``v``, in place, chunk by chunk (:func:`by_chunks`)."""
    by_chunks(_adam_fp32_chunk, p.numel(), 1, (p.view(-1), g.reshape(-1), m.view(-1), v.view(-1)), (), k)


def _momentum_fp32_chunk(p, g, m, *hp) -> None:
    p.copy_(momentum_update_(p.float(), g.float(), m, *hp, p.dtype))


def momentum_fp32_step(p, g, m, lr: float, beta1: float, weight_decay: float, step: int) -> None:
    """SGD momentum with an fp32 buffer ``m``, in place, chunk by chunk (:func:`by_chunks`)."""
    by_chunks(_momentum_fp32_chunk, p.numel(), 1, (p.view(-1), g.reshape(-1), m.view(-1)), (),
              lr, beta1, weight_decay, step)


def _adam8bit_chunk(p, g, codes1, codes2, absmax1, absmax2, k: AdamScalars, blocksize: int) -> None:
    map1, map2 = dynamic_map(True, p.device), dynamic_map(False, p.device)
    m = dequantize_blockwise_ref(codes1, absmax1, map1, blocksize, (p.numel(),))
    v = dequantize_blockwise_ref(codes2, absmax2, map2, blocksize, (p.numel(),))
    p.copy_(adam_update_(p.float(), g.float(), m, v, k, p.dtype))
    _requantize_(m, codes1, absmax1, map1, blocksize)
    _requantize_(v, codes2, absmax2, map2, blocksize)


def adam8bit_step_ref(p, g, codes1, absmax1, codes2, absmax2, k: AdamScalars, blocksize: int) -> None:
    """Reference, by chunks of whole blocks (:func:`by_chunks`). Bytes moved for n elements of e bytes:
    reads e n (p) + e n (g) + 2 n (codes) + 8 n/B, writes e n + 2 n + 8 n/B; the dequantized fp32
    moments and the gather indices cost about 32 bytes per element of one chunk in temporaries."""
    by_chunks(_adam8bit_chunk, p.numel(), blocksize, (p.view(-1), g.reshape(-1), codes1, codes2),
              (absmax1, absmax2), k, blocksize)


def _momentum8bit_chunk(p, g, codes1, absmax1, lr, beta1, weight_decay, step, blocksize) -> None:
    map1 = dynamic_map(True, p.device)
    m = dequantize_blockwise_ref(codes1, absmax1, map1, blocksize, (p.numel(),))
    p.copy_(momentum_update_(p.float(), g.float(), m, lr, beta1, weight_decay, step, p.dtype))
    _requantize_(m, codes1, absmax1, map1, blocksize)


def momentum8bit_step_ref(p, g, codes1, absmax1, lr: float, beta1: float, weight_decay: float, step: int,
                          blocksize: int) -> None:
    """Reference, by chunks of whole blocks. Bytes moved: reads 2 e n + n + 4 n/B, writes e n + n + 4 n/B."""
    by_chunks(_momentum8bit_chunk, p.numel(), blocksize, (p.view(-1), g.reshape(-1), codes1), (absmax1,),
              lr, beta1, weight_decay, step, blocksize)


def _check(p: torch.Tensor, g: torch.Tensor, codes: tuple[torch.Tensor, ...], blocksize: int) -> None:
    check_blocksize(blocksize)
    if g.shape != p.shape:
        raise ValueError(f"grad: shape {tuple(g.shape)} differs from the parameter's {tuple(p.shape)}")
    if not p.is_contiguous():
        raise ValueError("p: must be contiguous (the step updates it through a flat view)")
    if any(c.dtype != torch.uint8 or c.numel() != p.numel() for c in codes):
        raise ValueError(f"codes: must be uint8 with {p.numel()} elements")


def adam8bit_step(p, g, codes1, absmax1, codes2, absmax2, k: AdamScalars, blocksize: int = 256) -> None:
    """One fused 8-bit AdamW step, in place on ``p`` (its own dtype), codes and absmax."""
    _check(p, g, (codes1, codes2), blocksize)
    if use_triton(p):
        from lowmem.kernels.adamw8bit_step_triton import adam8bit_step_triton

        return adam8bit_step_triton(p, g, codes1, absmax1, codes2, absmax2, k, blocksize)
    if blockwise_cpu.steps_take(p, g, codes1, absmax1, codes2, absmax2):
        return blockwise_cpu.adam8bit_step_cpu(p, g, codes1, absmax1, codes2, absmax2, k, blocksize)
    return adam8bit_step_ref(p, g, codes1, absmax1, codes2, absmax2, k, blocksize)


def momentum8bit_step(p, g, codes1, absmax1, lr: float, beta1: float, weight_decay: float, step: int,
                      blocksize: int = 256) -> None:
    """One fused 8-bit SGD-momentum step, in place."""
    _check(p, g, (codes1,), blocksize)
    if use_triton(p):
        from lowmem.kernels.adamw8bit_step_triton import momentum8bit_step_triton

        return momentum8bit_step_triton(p, g, codes1, absmax1, lr, beta1, weight_decay, step, blocksize)
    if blockwise_cpu.steps_take(p, g, codes1, absmax1):
        return blockwise_cpu.momentum8bit_step_cpu(p, g, codes1, absmax1, lr, beta1, weight_decay, step, blocksize)
    return momentum8bit_step_ref(p, g, codes1, absmax1, lr, beta1, weight_decay, step, blocksize)
