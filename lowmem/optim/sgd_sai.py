"""SGD-SaI: SGD with momentum and learning-rate scaling at initialisation (Xu et al., 2024,
"No More Adam: Learning Rate Scaling at Initialization is All You Need", arXiv 2412.11768).

For each parameter tensor ``W`` with gradient ``g``::

    first gradient of W:  gsnr = ||g||_2 / (std(g) + eps)       # unbiased std, NaN -> 0; kept for good
    buf = g  (first step, no (1 - mu) factor) ;  afterwards  buf <- mu buf + (1 - mu) g
    W <- W * (1 - lr wd) - lr * gsnr * buf                       # decoupled decay uses lr, not lr*gsnr

As the reference package ``sgd-sai`` 1.0.3 (``SGD_sai``, the authors' release): same defaults
(lr 1e-2, momentum 0.9, eps 1e-8, weight decay 1e-2), same order of operations, and the g-SNR
from the first gradient, never recomputed. Its pitfalls get one rule each here:

* ``momentum=0`` (the reference leaves ``buf`` undefined): plain SGD, ``W -= lr*gsnr*g``, no buffer.
* A parameter without a gradient at the first step (the reference computes every g-SNR at the
  first ``step()`` and later fails with a KeyError): its g-SNR comes from its own first gradient.
  This also makes the rule per-parameter, as layer-wise mode needs.
* A 1-element tensor (std undefined; the reference's ``|g|/eps`` is a 1e8x LR): ``gsnr = 1``.
* An all-zero first gradient (the reference's ``gsnr = 0`` freezes the tensor for good): the
  tensor is skipped until its first non-zero gradient.

The g-SNR is a 0-d tensor in ``state["gsnr"]`` (saved in checkpoints); the momentum buffer
lives in a :class:`~lowmem.optim.state_store.MomentStore` (``state_bits=8``: blockwise 8-bit,
updated chunk by chunk). Arithmetic is in fp32, fp64 for fp64 parameters.
"""

from __future__ import annotations

import torch

from lowmem.optim.adam_math import DenseGradOptimizer
from lowmem.optim.args import Fraction, NonNegative, StateBits, typed
from lowmem.optim.dtensor import row_shard, sum_over_shards
from lowmem.optim.registry import OptimizerSpec, register
from lowmem.optim.stateless import compute_dtype

BUF = "momentum_buffer"


def gradient_snr(g: torch.Tensor, eps: float, q: torch.Tensor | None = None) -> torch.Tensor | None:
    """``||g|| / (std(g) + eps)`` (unbiased std, NaN -> 0); 1 for a 1-element tensor; None for an all-zero
    ``g``. ``g``: the gradient of ``q``, or of the rows of the FSDP2 shard ``q`` stands for
    (:mod:`lowmem.optim.dtensor`): then from sums all-reduced over the shards, two passes as ``std``
    (``[sum g, sum g^2, nonzeros]``, then ``sum (g - mean)^2``): 16 bytes sent, at the first step only."""
    shard = None if q is None else row_shard(q)
    if shard is None:
        if not g.any():
            return None
        if g.numel() == 1:
            return torch.ones((), dtype=g.dtype, device=g.device)
        return g.norm() / (g.std().nan_to_num() + eps)
    n = shard.numel()
    sums = sum_over_shards(torch.stack([g.sum(), g.square().sum(), g.ne(0).sum().to(g.dtype)]), q)
    if sums[2] == 0:
        return None
    if n == 1:
        return torch.ones((), dtype=g.dtype, device=g.device)
    spread = sum_over_shards((g - sums[0] / n).square().sum(), q)
    return sums[1].sqrt() / ((spread / (n - 1)).sqrt().nan_to_num() + eps)


class SGDSaI(DenseGradOptimizer):
    """Drop-in for ``sgd_sai.SGD_sai`` (same arguments), plus ``state_bits``."""

    @typed
    def __init__(self, params, lr: NonNegative = 1e-2, momentum: Fraction = 0.9, eps: NonNegative = 1e-8,
                 weight_decay: NonNegative = 1e-2, state_bits: StateBits = 32):
        from lowmem.optim.state_store import MomentStore  # 8-bit kernels load on first use

        self.store = MomentStore(state_bits)
        self.state_bits = state_bits
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))

    def elementwise(self, group: dict) -> bool:
        return True  # an element's update reads it and the per-tensor g-SNR (sums over the shards)

    def _step_param(self, p: torch.Tensor, group: dict, name: str | None) -> None:
        g = p.grad.to(compute_dtype(p.grad))
        state = self.state[p]
        if "gsnr" not in state:
            gsnr = gradient_snr(g, group["eps"], p)
            if gsnr is None:  # no signal yet: wait for the first non-zero gradient
                if not state:
                    del self.state[p]
                return
            state["gsnr"] = gsnr
        step_size = group["lr"] * float(state["gsnr"])
        p.mul_(1.0 - group["weight_decay"] * group["lr"])
        if group["momentum"] == 0.0:
            p.add_(g.to(p.dtype), alpha=-step_size)
            return
        self._momentum_step(p, g, group["momentum"], state, step_size)

    def _momentum_step(self, p: torch.Tensor, g: torch.Tensor, momentum: float, state: dict,
                       step_size: float) -> None:
        """``buf = g`` or ``mu buf + (1-mu) g``, then ``W -= step_size * buf``, one store chunk at a time."""
        first = not any(k.startswith(BUF) for k in state)
        if first:
            if self.store.quantized(g.numel()):
                self.store.init(state, BUF, g)
            else:  # fp32 (fp64 for fp64 params): the buffer is the first gradient itself
                state[BUF] = g.clone()
        flat_g, flat_p = g.reshape(-1), p.view(-1)
        for chunk in self.store.chunks(g.numel()):
            gc = flat_g[chunk[0]]
            buf = self.store.load(state, BUF, gc.shape, signed=True, chunk=chunk)
            if first:
                buf.copy_(gc)
            else:
                buf.mul_(momentum).add_(gc.to(buf.dtype), alpha=1.0 - momentum)
            self.store.store(state, BUF, buf, signed=True, chunk=chunk)
            flat_p[chunk[0]].add_(buf.to(p.dtype), alpha=-step_size)


register(OptimizerSpec(name="sgd_sai", cls=SGDSaI))
