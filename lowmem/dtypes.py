"""The recipe's dtype names and the one map from them to torch dtypes.

``model.dtype``, ``offload.host_dtype`` and ZO-AdaMU's ``momentum_dtype`` name a storage dtype
(:data:`DtypeName`, mapped by :data:`DTYPES`); ``train.mixed_precision`` names an autocast
mode (:data:`MixedPrecision`, mapped by :data:`AUTOCAST_DTYPES`; ``"no"`` is absent).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}

MixedPrecision = Literal["no", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
