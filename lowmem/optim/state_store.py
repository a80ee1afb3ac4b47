"""Where an optimizer keeps a moment tensor: fp32, or 8-bit blockwise-quantized.

DESIGN.md §2: the math is written once, in fp32, separate from storage. A
state-full part (AdamW, GaLore/FRUGAL's subspace Adam, APOLLO's moments) asks
a :class:`MomentStore` for a moment as an fp32 tensor, updates it, and hands
it back; the store decides how it lives in ``optimizer.state[p]``:

* ``bits=32``: ``state[key]`` is the fp32 tensor itself;
* ``bits=8`` : ``state[key + "_codes"]`` (uint8, flat) and ``state[key + "_absmax"]``
  (fp32, one per block), dynamic-map quantization of Dettmers et al. (2021),
  signed map for first moments, unsigned for second moments. Tensors smaller
  than ``min_8bit_size`` stay fp32, as in bitsandbytes.

Everything in the state is a plain tensor, so state dicts save to safetensors.
"""

from __future__ import annotations

import torch

from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import dequantize_blockwise, quantize_blockwise


class MomentStore:
    def __init__(self, bits: int = 32, blocksize: int = 256, min_8bit_size: int = 4096):
        if bits not in (8, 32):
            raise ValueError(f"optim.state_bits: must be 8 or 32, got {bits}")
        self.bits, self.blocksize, self.min_8bit_size = bits, blocksize, min_8bit_size

    def quantized(self, numel: int) -> bool:
        return self.bits == 8 and numel >= self.min_8bit_size

    def init(self, state: dict, key: str, like: torch.Tensor) -> None:
        """Create a zero moment shaped like ``like``."""
        if self.quantized(like.numel()):
            nblocks = -(-like.numel() // self.blocksize)
            state[key + "_codes"] = torch.zeros(like.numel(), dtype=torch.uint8, device=like.device)
            state[key + "_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=like.device)
        else:
            state[key] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def load(self, state: dict, key: str, shape: torch.Size, signed: bool) -> torch.Tensor:
        """The moment as an fp32 tensor of ``shape`` (a view of the state when fp32)."""
        if key in state:
            return state[key]
        code = dynamic_map(signed, state[key + "_codes"].device)
        return dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], code, self.blocksize, shape)

    def store(self, state: dict, key: str, value: torch.Tensor, signed: bool) -> None:
        """Write back an fp32 moment returned by :meth:`load` and updated in place or replaced."""
        if key in state:
            if value is not state[key]:
                state[key].copy_(value)
            return
        code = dynamic_map(signed, value.device)
        codes, absmax = quantize_blockwise(value, code, self.blocksize)
        state[key + "_codes"].copy_(codes)
        state[key + "_absmax"].copy_(absmax)
