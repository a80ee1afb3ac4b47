"""The recipe's dtype names and the one map from them to torch dtypes.

``model.dtype``, ``offload.host_dtype`` and ZO-AdaMU's ``momentum_dtype`` name a storage dtype
(:data:`DtypeName`, mapped by :data:`DTYPES`); ``train.mixed_precision`` names an autocast
mode (:data:`MixedPrecision`, mapped by :data:`AUTOCAST_DTYPES`; ``"no"`` is absent), and
``auto`` resolves to :func:`native_bf16_precision`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}

MASTER_DTYPE = torch.float32  # master weights the offload engines keep and step on the host (Fuyou)

# model.dtype may also be int8: trainable int8 block weights (lowmem.int8_weights), the rest of the model in fp32
WeightDtypeName = Literal[(*get_args(DtypeName), "int8")]
# offload.host_dtype may also be int8: ZO2's host copy blockwise int8 plus scales (lowmem.offload.host_format)
HostDtypeName = WeightDtypeName


def float_dtype(name: str) -> torch.dtype:
    """The float dtype a model of ``model.dtype`` ``name`` is built and computes in (int8 weights: fp32)."""
    return torch.float32 if name == "int8" else DTYPES[name]

MixedPrecision = Literal["no", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16_precision() -> str:
    """``bf16`` if this machine's matmuls run bf16 natively, else ``no``: on a CPU without AVX-512
    torch falls back to a scalar bf16 GEMM, about 50x slower than fp32 (measured: 512x576 @ 576x1536,
    1.34 s against 0.026 s on a 2-core AVX2 EPYC)."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_bf16_native() else "no"


def cpu_bf16_native() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 / AMX, or AVX-512 with its bf16 emulation)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()
