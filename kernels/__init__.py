"""Triton kernels, each beside its pure-PyTorch reference (shipped as ``lowmem.kernels``).

* :mod:`~lowmem.kernels.dynamic_map`     -- the 8-bit dynamic quantization maps;
* :mod:`~lowmem.kernels.quantize`        -- blockwise quantize/dequantize: reference and entry points;
* :mod:`~lowmem.kernels.quantize_triton` -- their Triton kernels;
* :mod:`~lowmem.kernels.adamw8bit_step`  -- the fused 8-bit AdamW / SGD-momentum step (reference, entry points);
* :mod:`~lowmem.kernels.adamw8bit_step_triton` -- its Triton kernels.

Triton is imported only by the ``*_triton`` modules and the fused-step launcher,
so CPU-only installs without Triton use the references.
"""
