"""Blockwise symmetric int8 weights with stochastic rounding: PyTorch reference.

The storage of Q-GaLore's trainable low-precision weights (Zhang et al. 2024, arXiv 2407.08296, §3.3
"Low-Precision Training with Stochastic Rounding"): a weight is flattened and cut into blocks of ``B``
elements (the last one zero-padded); per block ``b``::

    s_b = absmax_b / 127                                      (fp32 scale, one per block)
    q_j = SR(w_j / s_b)  in [-127, 127]                       (int8 payload)
    w_j ~= s_b * q_j                                          (dequantization)

with stochastic rounding ``SR(y) = floor(y) + [u < y - floor(y)]``, ``u ~ U[0, 1)``: ``E[SR(y)] = y``,
so ``E[s_b * q_j] = w_j`` exactly and an update far below one step ``s_b`` still reaches the weight in
expectation (Gupta et al. 2015), where round-to-nearest would drop it every time. ``generator=None``
rounds to nearest (the first quantization of a loaded weight). Q-GaLore's reference quantizes
asymmetrically (a zero point per group of 256); this keeps the zero exact and one scale per block,
as torchao's int8 quantized training and bitsandbytes' blockwise quantizer do.

Bytes per weight: 1 + 4 / B (B = 256: 1.016). Work is chunked: the fp32 temporaries stay a few MB.
"""

from __future__ import annotations

import torch

CHUNK_BLOCKS = 1 << 14  # blocks per chunk: 4 M elements at B = 256, 16 MB of fp32 per temporary


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    nb = num_blocks(flat.numel(), blocksize)
    return torch.nn.functional.pad(flat, (0, nb * blocksize - flat.numel())).view(nb, blocksize)


@torch.no_grad()
def quantize_int8_(payload: torch.Tensor, scales: torch.Tensor, w: torch.Tensor, blocksize: int,
                   generator: torch.Generator | None = None) -> None:
    """``payload`` (int8, ``w``'s numel) and ``scales`` (fp32, one per block) <- ``w`` quantized,
    stochastically rounded with ``generator`` (nearest when None). Reads 4n bytes, writes n + 4n/B."""
    flat, out = w.reshape(-1), payload.view(-1)
    step = CHUNK_BLOCKS * blocksize
    for start in range(0, flat.numel(), step):
        blocks = _blocks(flat[start:start + step].float(), blocksize)            # (nb, B)
        absmax = blocks.abs().amax(dim=1)                                         # (nb,)
        s = absmax / 127
        y = blocks * torch.where(absmax > 0, 1 / s, torch.zeros_like(s))[:, None]  # in [-127, 127]
        if generator is None:
            q = y.round_()
        else:
            q = torch.floor(y)
            q += torch.rand(y.shape, generator=generator, device=y.device) < (y - q)  # up w.p. frac(y)
        n = min(step, flat.numel() - start)
        out[start:start + n] = q.clamp_(-127, 127).to(torch.int8).view(-1)[:n]
        scales[start // blocksize:start // blocksize + s.numel()] = s


@torch.no_grad()
def dequantize_int8(payload: torch.Tensor, scales: torch.Tensor, blocksize: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s_b * q_j`` in ``dtype``, shaped as ``payload``. Reads n + 4n/B bytes, writes n * itemsize."""
    blocks = _blocks(payload.reshape(-1), blocksize)                              # (nb, B) int8
    w = (blocks.float() * scales[:, None]).to(dtype)                              # fp32 product, one rounding
    return w.view(-1)[: payload.numel()].view(payload.shape)
