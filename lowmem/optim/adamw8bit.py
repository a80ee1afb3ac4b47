"""8-bit AdamW and 8-bit SGD with momentum: blockwise-quantized states (Dettmers et al., 2021,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022; bitsandbytes ``AdamW8bit`` / ``SGD8bit``).

AdamW8bit, per parameter with step t (bias-corrected Adam, decoupled decay after the update)::

    m_t = b1 m_{t-1} + (1-b1) g ;  v_t = b2 v_{t-1} + (1-b2) g^2
    W  <- (W - lr sqrt(1-b2^t)/(1-b1^t) m_t / (sqrt(v_t) + sqrt(1-b2^t) eps)) (1 - lr wd)

SGD8bit (coupled decay, no dampening)::  g <- g + wd W ;  m_t = g (t=1) or b1 m_{t-1} + g ;  W <- W - lr m_t

Storage (paper §2.1-2.2): m with the signed dynamic map, v with the unsigned one, 8-bit codes
plus one fp32 absmax per block of ``blocksize`` (256) elements: 2 + 8/256 bytes per parameter
for Adam. The fused step (:mod:`lowmem.kernels.adamw8bit_step`) dequantizes, updates in fp32,
writes W in its own dtype and requantizes in one pass (Triton on CUDA).

Choices, as bitsandbytes unless noted:

* tensors with fewer than ``min_8bit_size`` (4096) elements keep fp32 state;
* a gradient element that is NaN/inf wipes that element's moments and leaves W untouched
  (the 8-bit Adam kernel's rule; we apply it to fp32-state tensors too); SGD8bit has no such rule;
* stable embedding: instead of swapping in ``bnb.nn.StableEmbedding`` (whose extra LayerNorm changes
  a pretrained model's function), parameters whose name matches ``fp32_state_params``
  (default: input/position embeddings, ``*embed*``, ``*wte*``, ``*wpe*``) keep fp32 state, as
  ``StableEmbedding`` registers ``optim_bits=32``. Names come from the groups' ``param_names``
  (:func:`lowmem.optim.registry.create_optimizer` sets them); pass ``()`` for all-8-bit;
* percentile clipping and ``gnorm_scale`` (removed from bitsandbytes in 2026) are not provided.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated

import torch
from pydantic import AfterValidator, Field

from lowmem.kernels.adamw8bit_step import (AdamScalars, adam8bit_step, adam_fp32_step, momentum8bit_step,
                                           momentum_fp32_step)
from lowmem.kernels.quantize import check_blocksize
from lowmem.optim.adam_math import DenseGradOptimizer
from lowmem.optim.args import Betas, NonNegative, NonNegativeInt, Positive, typed
from lowmem.optim.registry import OptimizerSpec, register
from lowmem.optim.state_store import MomentStore

EMBEDDING_PATTERNS = ("*embed*", "*wte*", "*wpe*")
BlockSize = Annotated[int, AfterValidator(lambda b: check_blocksize(b) or b)]  # a power of two the kernels take


class _Blockwise8bit(DenseGradOptimizer):
    """Shared loop: state creation (8-bit or fp32 by size and name), step counter, safe state loading.
    The subclasses' ``@typed`` constructors validate the arguments."""

    moments: tuple[tuple[str, bool], ...] = ()  # (state key, signed map)

    def __init__(self, params, defaults: dict, blocksize: int, min_8bit_size: int,
                 fp32_state_params: tuple[str, ...]):
        super().__init__(params, defaults)
        self.store8 = MomentStore(bits=8, blocksize=blocksize, min_8bit_size=min_8bit_size)
        self.store32 = MomentStore(bits=32)
        self.fp32_state_params = tuple(fp32_state_params)

    def _store_for(self, name: str | None) -> MomentStore:
        if name is not None and any(fnmatch.fnmatchcase(name, pat) for pat in self.fp32_state_params):
            return self.store32
        return self.store8

    def _sparse_error(self, name: str | None) -> Exception:
        return ValueError(f"grad: {name or 'a parameter'} is sparse; 8-bit optimizers need dense grads")

    def elementwise(self, group: dict) -> bool:
        return True

    @property
    def state_blocksize(self) -> int:
        """Elements per 8-bit block: a sharded checkpoint re-deals whole blocks (lowmem.fsdp_checkpoint)."""
        return self.store8.blocksize

    def _step_param(self, p, group: dict, name: str | None) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            for key, _ in self.moments:
                self._store_for(name).init(state, key, p)
        state["step"] += 1
        self._update(p, p.grad, state, group, int(state["step"]))

    def _update(self, p, g, state: dict, group: dict, step: int) -> None:
        raise NotImplementedError


class AdamW8bit(_Blockwise8bit):
    moments = (("exp_avg", True), ("exp_avg_sq", False))

    @typed
    def __init__(self, params, lr: NonNegative = 1e-3, betas: Betas = (0.9, 0.999), eps: Positive = 1e-8,
                 weight_decay: NonNegative = 1e-2, blocksize: BlockSize = 256, min_8bit_size: NonNegativeInt = 4096,
                 fp32_state_params: tuple[str, ...] = EMBEDDING_PATTERNS):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, blocksize, min_8bit_size, fp32_state_params)

    def _update(self, p, g, state, group, step):
        k = AdamScalars.of(group["lr"], *group["betas"], group["eps"], group["weight_decay"], step)
        if "exp_avg" in state:  # fp32 state: same maths, no quantization
            adam_fp32_step(p, g, state["exp_avg"], state["exp_avg_sq"], k)
            return
        adam8bit_step(p, g, state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"],
                      state["exp_avg_sq_absmax"], k, self.store8.blocksize)


class SGD8bit(_Blockwise8bit):
    moments = (("momentum_buffer", True),)

    @typed  # momentum > 0: without it there is no state to quantize (use SGD)
    def __init__(self, params, lr: NonNegative = 1e-3, momentum: Annotated[float, Field(gt=0, lt=1)] = 0.9,
                 weight_decay: NonNegative = 0.0, blocksize: BlockSize = 256, min_8bit_size: NonNegativeInt = 4096,
                 fp32_state_params: tuple[str, ...] = EMBEDDING_PATTERNS):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, blocksize, min_8bit_size, fp32_state_params)

    def _update(self, p, g, state, group, step):
        hp = (group["lr"], group["momentum"], group["weight_decay"], step)
        if "momentum_buffer" in state:
            momentum_fp32_step(p, g, state["momentum_buffer"], *hp)
            return
        momentum8bit_step(p, g, state["momentum_buffer_codes"], state["momentum_buffer_absmax"], *hp,
                          blocksize=self.store8.blocksize)


register(OptimizerSpec(name="adamw8bit", cls=AdamW8bit))
register(OptimizerSpec(name="sgd8bit", cls=SGD8bit))
