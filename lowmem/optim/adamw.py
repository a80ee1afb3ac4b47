"""AdamW (Loshchilov & Hutter, 2019): the full-state baseline, ``torch.optim.AdamW``.

    m_t = b1 m_{t-1} + (1-b1) g ;  v_t = b2 v_{t-1} + (1-b2) g^2
    W  <- W (1 - lr wd) - lr m_t/(1-b1^t) / (sqrt(v_t/(1-b2^t)) + eps)
"""

import torch

from lowmem.optim.args import Betas, NonNegative
from lowmem.optim.registry import OptimizerSpec, register

# torch's own class: its signature gives the names and defaults, these annotations the ranges
register(OptimizerSpec(name="adamw", cls=torch.optim.AdamW,
                       types={"lr": NonNegative, "betas": Betas, "eps": NonNegative, "weight_decay": NonNegative}))
