"""Where an optimizer keeps a moment tensor: fp32, or 8-bit blockwise-quantized.

The math is written once, in fp32, separate from storage (as torchao's low-bit optimizers). A
state-full part (AdamW, GaLore/FRUGAL's subspace Adam, APOLLO's moments) asks
a :class:`MomentStore` for a moment as an fp32 tensor, updates it, and hands
it back; the store decides how it lives in ``optimizer.state[p]``:

* ``bits=32``: ``state[key]`` is the fp32 tensor itself;
* ``bits=8`` : ``state[key + "_codes"]`` (uint8, flat) and ``state[key + "_absmax"]``
  (fp32, one per block), dynamic-map quantization of Dettmers et al. (2021),
  signed map for first moments, unsigned for second moments. Tensors smaller
  than ``min_8bit_size`` stay fp32, as in bitsandbytes.

A large moment is loaded and stored by :meth:`MomentStore.chunks` of whole blocks:
blocks quantize independently, so a chunked update is bit-identical to a whole-tensor
one and holds only one chunk's fp32 temporaries.

Everything in the state is a plain tensor, so state dicts save to safetensors.
"""

from __future__ import annotations

import torch

from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import CHUNK_NUMEL, block_chunks, dequantize_blockwise, quantize_blockwise

Chunk = tuple[slice, slice]  # (elements, blocks) of the flat moment, whole quantization blocks


class MomentStore:
    def __init__(self, bits: int = 32, blocksize: int = 256, min_8bit_size: int = 4096,
                 chunk_numel: int = CHUNK_NUMEL):
        if bits not in (8, 32):
            raise ValueError(f"optim.state_bits: must be 8 or 32, got {bits}")
        self.bits, self.blocksize, self.min_8bit_size = bits, blocksize, min_8bit_size
        self.chunk_numel = chunk_numel

    def quantized(self, numel: int) -> bool:
        return self.bits == 8 and numel >= self.min_8bit_size

    def chunks(self, numel: int) -> list[Chunk]:
        """Pieces of a moment of ``numel`` elements for :meth:`load`/:meth:`store` one at a time
        (:func:`~lowmem.kernels.quantize.block_chunks`), so that an update holds one chunk's fp32
        copy of an 8-bit moment, not the whole tensor's (issue #8: the 28M-element embedding)."""
        return block_chunks(numel, self.blocksize, self.chunk_numel)

    def init(self, state: dict, key: str, like: torch.Tensor) -> None:
        """Create a zero moment shaped like ``like``."""
        if self.quantized(like.numel()):
            nblocks = -(-like.numel() // self.blocksize)
            state[key + "_codes"] = torch.zeros(like.numel(), dtype=torch.uint8, device=like.device)
            state[key + "_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=like.device)
        else:
            state[key] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def load(self, state: dict, key: str, shape: torch.Size, signed: bool, chunk: Chunk | None = None) -> torch.Tensor:
        """The moment as an fp32 tensor of ``shape``, or the flat elements of ``chunk`` (a view of
        the state when fp32)."""
        part, blocks = chunk or (slice(None), slice(None))
        if key in state:
            flat = state[key].view(-1)[part]
        else:
            code = dynamic_map(signed, state[key + "_codes"].device)
            flat = dequantize_blockwise(state[key + "_codes"][part], state[key + "_absmax"][blocks], code,
                                        self.blocksize)
        return flat if chunk else flat.view(shape)

    def store(self, state: dict, key: str, value: torch.Tensor, signed: bool, chunk: Chunk | None = None) -> None:
        """Write back an fp32 moment (or ``chunk`` of it) from :meth:`load`, updated in place or replaced."""
        part, blocks = chunk or (slice(None), slice(None))
        if key in state:
            target = state[key].view(-1)[part]
            if not _same_elements(target, value):
                target.copy_(value.reshape(-1))
            return
        code = dynamic_map(signed, value.device)
        codes, absmax = quantize_blockwise(value, code, self.blocksize)
        state[key + "_codes"][part].copy_(codes)
        state[key + "_absmax"][blocks].copy_(absmax)


def _same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same elements of one storage (``b`` is :meth:`MomentStore.load`'s
    view, updated in place), told from metadata alone. ``Tensor.is_set_to`` would do, but it reads the
    storages' data pointers, which fake tensors (the planner's trace) deprecate, and there it answers
    False even for one tensor against itself."""
    return (a.untyped_storage() is b.untyped_storage() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride())


def load_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict, base_load) -> None:
    """Load ``state_dict`` into ``optimizer`` with every state tensor as saved (fp32 moments of a
    bf16 model, uint8 codes, indices): ``base_load`` (``torch.optim.Optimizer.load_state_dict``)
    gets the param groups only, since it would cast each state tensor of a floating-point
    parameter to the parameter's dtype. Tensors move to their parameter's device (no copy when
    already there, as in torch's own load)."""
    base_load({**state_dict, "state": {}})
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in zip(ids, params):
        if i in state_dict["state"]:
            optimizer.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v
                                  for k, v in state_dict["state"][i].items()}
