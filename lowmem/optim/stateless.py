"""The base of the stateless matrix optimizers (SWAN, SinkGD): no optimizer state for the 2-D
weights of the blocks, AdamW for everything else.

For a target weight ``W`` (the registry's ``targets`` group: 2-D ``nn.Linear`` weights of the
blocks, or ``optim.target_modules``) with gradient ``G``, each step::

    D = direction(G)                         # a normalised copy of G (SWAN: §3 of 2412.13148,
                                             # SinkGD: Algorithm 4 of 2502.06742), fp32 or fp64
    W <- W * (1 - lr_S * wd) - lr_S * D      # lr_S = lr * lr_scale, decoupled weight decay

``lr_scale`` (alpha) is a group key because ``D`` has per-entry RMS ~1 whatever the size of
``G``: it plays the role Adam's normalisation plays for the other parameters, which share ``lr``
(the split of Zhao et al.'s GaLore LLaMA benchmark, which both papers use: embeddings, norms and
``lm_head`` on Adam). Nothing is written to ``optimizer.state`` for a target weight, so the
state is that of AdamW over the non-target parameters only (fp32, or 8-bit with
``state_bits=8``). The direction is computed in fp32 (fp64 for fp64 gradients) and depends on
``G`` only through its direction: loss scaling and global-norm clipping do not change it.

Helpers shared by both methods: :func:`compute_dtype` and :func:`oriented` (transpose so that
``p <= q``).
"""

from __future__ import annotations

import torch

from lowmem.optim.adam_math import MomentOptimizer
from lowmem.optim.args import Betas, GroupArgs, NonNegative, StateBits, check_group, typed


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 tensors (exact tests), fp32 otherwise (bf16/fp16 gradients are widened)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def oriented(direction, g: torch.Tensor, orient: bool) -> torch.Tensor:
    """``direction(g)`` computed on the wide orientation (rows <= columns) when ``orient``:
    ``direction(g.T).T`` for a tall ``g``, so ``f(G.T) == f(G).T``."""
    if orient and g.shape[0] > g.shape[1]:
        return direction(g.t()).t()
    return direction(g)


class StatelessMatrixOptimizer(MomentOptimizer):
    """AdamW (HF-style eps, bias-corrected, as GaLore/APOLLO's non-target groups) for groups
    without ``MARKER``; ``W -= lr*lr_scale*direction(G)`` with no state for groups with it.

    Subclasses set ``MARKER``, ``GROUP`` (the typed target-group keys) and implement
    ``_direction(g, group, p)``.
    """

    MARKER = ""
    GROUP: type[GroupArgs] = GroupArgs

    def elementwise(self, group: dict) -> bool:
        return self.MARKER not in group  # the AdamW groups; the target groups read the whole matrix

    @typed
    def __init__(self, params, lr: NonNegative = 1e-3, betas: Betas = (0.9, 0.999), eps: NonNegative = 1e-8,
                 weight_decay: NonNegative = 0.0, correct_bias: bool = True, state_bits: StateBits = 32):
        super().__init__(params, lr, betas, eps, weight_decay, state_bits, correct_bias=correct_bias)
        for group in self.param_groups:
            if self.MARKER in group:
                self._check_group(group)

    def _check_group(self, group: dict) -> None:
        check_group(group, self.GROUP, type(self).__name__)
        if any(p.dim() != 2 for p in group["params"]):
            raise ValueError(f"optim.target_modules: {type(self).__name__} needs 2-D weights in its target group")

    def _step_param(self, p: torch.Tensor, group: dict, name: str | None) -> None:
        if self.MARKER not in group:
            super()._step_param(p, group, name)  # AdamW, state in self.state[p]
            return
        g = p.grad.to(compute_dtype(p.grad))  # never touches self.state: no entry is created
        update = self._direction(g, group, p)
        lr = group["lr"] * group["lr_scale"]
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - lr * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr)

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        self._adamw_update(p, group, state)

    def _direction(self, g: torch.Tensor, group: dict, p: torch.Tensor) -> torch.Tensor:
        """The update of ``p`` (a plain tensor, or the stand-in of an FSDP2 shard) from its gradient ``g``."""
        raise NotImplementedError
