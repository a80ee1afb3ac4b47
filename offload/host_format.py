"""How a block's host copy encodes its packed compute buffer (``offload.host_dtype``).

ZO2 (Wang et al., 2025, arXiv 2503.12668) keeps the only copy of each block on the host, and its
step is bounded by the bytes that cross PCIe; the host copy may be coarser than the compute dtype:

* :class:`FloatCopy` -- a float dtype (the training dtype: a plain copy; a coarser 16-bit one:
  stochastic rounding on the way back, :mod:`lowmem.offload.rounding`);
* :class:`Int8Copy` -- each parameter blockwise int8 with one fp32 scale per 256 weights, the
  scheme of ``model.dtype: int8`` (Q-GaLore, Zhang et al. 2024, arXiv 2407.08296, §3.3;
  :mod:`lowmem.kernels.int8_weights`): ``s_b = absmax_b / 127``, ``q_j = SR(w_j / s_b)``,
  ``w_j ~= s_b q_j``. 1.016 bytes per weight, half of bf16's. A block moves to the device as its
  int8 payload and scales, is dequantized into its compute slot there, perturbed, evaluated and
  updated as in memory, and quantized again on the device with stochastic rounding (unbiased:
  ``E[s q] = w``, so ZO's updates of far less than one step ``s_b`` still reach the weights).

A format encodes block ``i`` (compute dtype, packed by :class:`~lowmem.offload.transfer.Packed`)
into a flat tensor of ``numel(i)`` elements of ``store_dtype`` and decodes it back. ``seed=None``
rounds to nearest (the first quantization of a loaded model); a seed draws the stochastic rounding
from a private generator seeded with it (the engine derives it from the step seed and the block,
so a run is reproducible and resumes exactly). Encoded layout of an int8 block (uint8 bytes)::

    [payload: int8 at the packed buffer's element offsets, packed.numel bytes | fp32 scales, per parameter]
"""

from __future__ import annotations

import torch

from lowmem.kernels.int8_weights import dequantize_int8, num_blocks, quantize_int8_
from lowmem.offload.rounding import round_into

BLOCKSIZE = 256           # weights per scale, as model.dtype: int8 (lowmem.int8_weights.BLOCKSIZE)
_DECODE_BLOCKS = 1 << 14  # quantization blocks dequantized at once: 4 M elements, 16 MB of fp32


class FloatCopy:
    """The host copy in a float dtype: exact upload, stochastic rounding back when it is coarser."""

    lossy_roundtrip = False  # decode(encode(x)) == x for every value encode wrote

    def __init__(self, host_dtype: torch.dtype, compute_dtype: torch.dtype, packed: list):
        self.store_dtype, self.compute_dtype, self.packed = host_dtype, compute_dtype, packed

    @property
    def same(self) -> bool:
        """Whether the host copy is the compute buffer itself (no device staging)."""
        return self.store_dtype == self.compute_dtype

    def numel(self, i: int) -> int:
        return self.packed[i].numel

    def encode(self, i: int, dst: torch.Tensor, src: torch.Tensor, seed: int | None) -> None:
        if seed is None:
            dst.copy_(src)  # round to nearest
        else:
            round_into(dst, src, seed)

    def decode(self, i: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)  # a host value is exact in the (finer) compute dtype

    def stored(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s host copy (CPU) of the packed buffer ``flat``, rounded to nearest."""
        if flat.dtype == self.store_dtype:
            return flat
        out = torch.zeros(self.numel(i), dtype=self.store_dtype)  # the padding between parameters stays 0
        self.encode(i, out, flat, None)
        return out

    def restored(self, i: int, encoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The packed buffer of block ``i`` in ``dtype`` from its host copy (``encoded`` itself when it
        is in ``dtype``)."""
        return encoded.to(dtype)


class Int8Copy(FloatCopy):
    """Each parameter of a block blockwise int8 plus fp32 scales (see the module docstring).

    ``trained[i]``: which parameters of block ``i`` are rewritten when it goes back (None: all); the
    others keep their stored bytes, so a frozen weight (``model.trainable``) never changes."""

    lossy_roundtrip = True  # dequantize -> quantize may move a weight by a step with tiny probability

    def __init__(self, compute_dtype: torch.dtype, packed: list, trained: list[list[bool]] | None = None):
        super().__init__(torch.uint8, compute_dtype, packed)
        self.trained = trained
        self.scale_at: list[list[int]] = []  # per block: each parameter's first scale, then the total
        for pk in packed:
            at = [0]
            for shape in pk.shapes:
                at.append(at[-1] + num_blocks(shape.numel(), BLOCKSIZE))
            self.scale_at.append(at)

    @property
    def same(self) -> bool:
        return False

    def numel(self, i: int) -> int:
        return self.packed[i].numel + 4 * self.scale_at[i][-1]  # packed.numel: a multiple of 128

    def _parts(self, i: int, encoded: torch.Tensor):
        """(payload int8 view, scales fp32 view, [(element offset, numel, first scale, scales)])."""
        pk, at = self.packed[i], self.scale_at[i]
        payload = encoded[:pk.numel].view(torch.int8)
        scales = encoded[pk.numel:self.numel(i)].view(torch.float32)
        return payload, scales, [(o, s.numel(), at[j], at[j + 1] - at[j])
                                 for j, (o, s) in enumerate(zip(pk.offsets, pk.shapes))]

    def encode(self, i: int, dst: torch.Tensor, src: torch.Tensor, seed: int | None) -> None:
        """Quantize each parameter of ``src`` into ``dst``, in order, from one generator."""
        gen = None if seed is None else torch.Generator(device=src.device).manual_seed(seed)
        payload, scales, params = self._parts(i, dst)
        for j, (o, n, s0, ns) in enumerate(params):
            if seed is not None and self.trained is not None and not self.trained[i][j]:
                continue  # frozen: its bytes (uploaded into dst) stay
            quantize_int8_(payload[o:o + n], scales[s0:s0 + ns], src[o:o + n], BLOCKSIZE, gen)

    def decode(self, i: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst`` (compute dtype) <- ``s_b q_j`` of each parameter, a few MB of temporaries at a time."""
        payload, scales, params = self._parts(i, src)
        step = _DECODE_BLOCKS * BLOCKSIZE
        for o, n, s0, _ in params:
            for a in range(0, n, step):
                b = min(a + step, n)
                dst[o + a:o + b] = dequantize_int8(payload[o + a:o + b], scales[s0 + a // BLOCKSIZE:
                                                                               s0 + num_blocks(b, BLOCKSIZE)],
                                                   BLOCKSIZE, dst.dtype)

    def restored(self, i: int, encoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(self.packed[i].numel, dtype=dtype, device=encoded.device)
        self.decode(i, out, encoded)
        return out


def host_format(host_dtype: torch.dtype | None, compute_dtype: torch.dtype, packed: list,
                trained: list[list[bool]] | None = None) -> FloatCopy:
    """The format of ``offload.host_dtype`` (a torch dtype; ``torch.int8``: :class:`Int8Copy`; None:
    the compute dtype) for blocks packed as ``packed``."""
    if host_dtype == torch.int8:
        return Int8Copy(compute_dtype, packed, trained)
    return FloatCopy(host_dtype or compute_dtype, compute_dtype, packed)
