"""Blockwise dynamic quantization (Dettmers et al., 2021, §2.1): reference and entry points.

A tensor is flattened and cut into consecutive blocks of ``B`` elements (the
last block may be partial). Per block ``b``::

    absmax_b = max_j |x_j|                                   (fp32, stored exactly)
    code_j   = argmin_k |map[k] - x_j / absmax_b|            (uint8, nearest map value)
    x_j     ~= map[code_j] * absmax_b                        (dequantization)

Nearest rounding is a bisection over the 255 midpoints ``(map[k] + map[k+1])/2``
(``torch.bucketize``, a value exactly on a midpoint goes to the lower code), the
same rule as bitsandbytes' reference backend; ``x / absmax`` is computed as
``x * (1 / absmax)`` like it. An all-zero block has absmax 0 and quantizes to
the code of 0.

``quantize_blockwise`` / ``dequantize_blockwise`` dispatch to the Triton kernels
(:mod:`lowmem.kernels.quantize_triton`) for CUDA tensors, and for any tensor when
``TRITON_INTERPRET=1`` (the tests); on the CPU to the C kernels of
:mod:`lowmem.kernels.blockwise_cpu` (the same bits, a table lookup instead of the
bisection); to the PyTorch references below where neither applies.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lowmem.kernels import blockwise_cpu

MIN_BLOCKSIZE, MAX_BLOCKSIZE = 16, 4096
CHUNK_NUMEL = 1 << 20  # elements per chunk of whole blocks: 4 MiB of fp32 per temporary


def check_blocksize(blocksize: int) -> None:
    if not (isinstance(blocksize, int) and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
            and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"blocksize: must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")


def _check_code(code: torch.Tensor) -> None:
    if code.numel() != 256 or code.dtype != torch.float32:
        raise ValueError(f"code: must be 256 float32 values, got {code.numel()} {code.dtype}")


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def block_chunks(numel: int, blocksize: int, chunk_numel: int = CHUNK_NUMEL) -> list[tuple[slice, slice]]:
    """``(elements, blocks)`` slices cutting ``numel`` elements into chunks of whole blocks, each of
    at most ``max(chunk_numel, blocksize)`` elements. Blocks are quantized independently, so a
    chunked update equals the whole-tensor one bit for bit, while its fp32 temporaries (the
    dequantized moments, the int64 gather indices) are one chunk's instead of the tensor's."""
    step = max(chunk_numel // blocksize, 1) * blocksize
    return [(slice(i, min(i + step, numel)), slice(i // blocksize, num_blocks(min(i + step, numel), blocksize)))
            for i in range(0, numel, step)]


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA, or on any device under the interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _padded_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    nblocks = num_blocks(flat.numel(), blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - flat.numel())).view(nblocks, blocksize)


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference. Bytes moved: reads n*elt (x), writes n (codes) + 4*n/B (absmax)."""
    flat = x.reshape(-1).float()
    blocks = _padded_blocks(flat, blocksize)                                  # (nblocks, B), zero padded
    absmax = blocks.abs().amax(dim=1)                                         # (nblocks,)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * inv[:, None]).clamp_(-1, 1)
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)               # nearest, ties down
    return codes.to(torch.uint8).reshape(-1)[: flat.numel()], absmax


def dequantize_blockwise_ref(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                             shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """PyTorch reference. Bytes moved: reads n (codes) + 4*n/B (absmax), writes 4*n (fp32)."""
    blocks = _padded_blocks(codes.reshape(-1), blocksize)                    # (nblocks, B) uint8
    values = code[blocks.long()] * absmax[:, None]
    return values.reshape(-1)[: codes.numel()].reshape(shape)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any float dtype) -> (codes uint8 flat ``(numel,)``, absmax fp32 ``(nblocks,)``)."""
    check_blocksize(blocksize)
    _check_code(code)
    if use_triton(x):
        from lowmem.kernels.quantize_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(x, code, blocksize)
    if blockwise_cpu.takes(code, x):
        return blockwise_cpu.quantize_blockwise_cpu(x, code, blocksize)
    return quantize_blockwise_ref(x, code, blocksize)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                         shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """fp32 tensor of ``shape`` (default: flat) from codes and per-block absmax."""
    check_blocksize(blocksize)
    _check_code(code)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes: must be uint8, got {codes.dtype}")
    if absmax.numel() != num_blocks(codes.numel(), blocksize):
        raise ValueError(f"absmax: expected {num_blocks(codes.numel(), blocksize)} blocks, got {absmax.numel()}")
    shape = (codes.numel(),) if shape is None else shape
    if use_triton(codes):
        from lowmem.kernels.quantize_triton import dequantize_blockwise_triton

        return dequantize_blockwise_triton(codes, absmax, code, blocksize, shape)
    if blockwise_cpu.takes(code, codes, absmax):
        return blockwise_cpu.dequantize_blockwise_cpu(codes, absmax, code, blocksize, shape)
    return dequantize_blockwise_ref(codes, absmax, code, blocksize, shape)
