"""The WTA-CRS linear layer: exact forward, sampled weight gradient, exact input and bias gradients.

Liu et al. 2023 (WTA-CRS), §3; reference ``approxlinear/functional.py``
(``approxlinear_only_bw``). For y = x Wᵀ + b with x of shape (..., d_in), N rows::

    forward : y exact; saves only x[S] (m <= k rows, see ``sampler.sample_rows``), S, w
    backward: ∂x = gy · W                          (exact)
              ∂b = Σ_i gy_i                        (exact)
              ∂W = Σ_{j∈S} w_j · gy_j x_jᵀ         (unbiased: E[∂W] = gyᵀ x)

The full x is not kept, so the activation memory of the layer drops from N·d_in to
about k·d_in elements. The layer samples only in a training forward with grad enabled
and a trainable weight; otherwise (eval, ``torch.no_grad``, frozen weight, or k = N) it
is the original module's forward, bit for bit.

Swapping changes the module's class in place (``swap.py``): the object, its parameters
and hooks stay the same, so optimizers and ``state_dict`` keys are unaffected.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowmem.activations.sampler import GradNormTracker, RowSample, budget, row_norms, row_probabilities, sample_rows


class WTACRSLinearFunction(torch.autograd.Function):
    """y = F.linear(x, weight, bias) saving only the sampled rows of x for ∂W."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, row_weight, tracker):
        # x (..., d_in) · weight (d_out, d_in) -> (..., d_out)
        out = F.linear(x, weight, bias)
        x_rows = x.reshape(-1, x.shape[-1]).index_select(0, index)  # (m, d_in)
        ctx.save_for_backward(x_rows, index, row_weight, weight)
        ctx.tracker = tracker
        ctx.batch_seq = batch_seq(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_rows, index, row_weight, weight = ctx.saved_tensors
        gy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)  # (..., d_in), exact
        if ctx.needs_input_grad[1]:
            gy_rows = (gy.index_select(0, index).float() * row_weight.unsqueeze(1)).to(gy.dtype)  # (m, d_out)
            grad_w = gy_rows.t().mm(x_rows)  # (d_out, d_in)
        if ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        if ctx.tracker is not None:
            ctx.tracker.update(gy, *ctx.batch_seq)
        return grad_x, grad_w, grad_b, None, None, None


def batch_seq(x: torch.Tensor) -> tuple[int, int]:
    """(batch, sequence) of the rows of x: the last two leading dims (a 2-D x is one sequence)."""
    seq = x.shape[-2] if x.dim() >= 2 else 1
    return x.numel() // (x.shape[-1] * seq), seq


CHECKPOINTING_ERROR = "activations.wta_crs: cannot be combined with gradient checkpointing; disable one of them"


@dataclass
class SamplingContext:
    """What all swapped layers of one model share: the private generator, the budget floor, and
    the modules whose ``gradient_checkpointing`` flag Hugging Face sets (watched, not owned)."""

    generator: torch.Generator
    minimal_k: int
    checkpoint_flags: tuple[weakref.ref, ...]

    def check_supported(self) -> None:
        if any(getattr(ref(), "gradient_checkpointing", False) for ref in self.checkpoint_flags):
            # Non-reentrant checkpointing re-runs the forward and would draw a second, different
            # sample; checkpointing also already drops the activations WTA-CRS would thin out.
            raise ValueError(CHECKPOINTING_ERROR)


def autocast_inputs(x, *tensors):
    """Cast like ``F.linear`` would under an active autocast (the Functions run with it off);
    ``None`` entries (absent biases) stay ``None``."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def draw_rows(x: torch.Tensor, keep_ratio: float, context: SamplingContext,
              tracker: GradNormTracker | None) -> RowSample | None:
    """The WTA-CRS sample of the rows of ``x`` (..., d) for one training forward, or None when
    the budget keeps every row (k = N: the exact gradient, nothing to sample)."""
    n_rows = x.numel() // x.shape[-1]
    k = budget(n_rows, keep_ratio, context.minimal_k)
    if k >= n_rows:
        return None
    context.check_supported()
    with torch.no_grad():
        x_norms = row_norms(x.reshape(n_rows, -1))
        grad_norms = None if tracker is None else tracker.estimate(*batch_seq(x))
        return sample_rows(row_probabilities(x_norms, grad_norms), k, context.generator)


class _WTACRSMixin:
    """The sampled forward, shared by the ``nn.Linear`` and GPT-2 ``Conv1D`` layers."""

    wta_keep_ratio: float
    wta_context: SamplingContext
    wta_tracker: GradNormTracker | None

    def _linear_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        n_rows = x.numel() // x.shape[-1]
        if (not (self.training and torch.is_grad_enabled() and self.weight.requires_grad)
                or budget(n_rows, self.wta_keep_ratio, self.wta_context.minimal_k) >= n_rows):
            return super().forward(x)  # the original layer, bit for bit
        x_c, weight, bias = autocast_inputs(x, self._linear_weight(), self.bias)
        sample = draw_rows(x_c, self.wta_keep_ratio, self.wta_context, self.wta_tracker)
        with torch.autocast(x.device.type, enabled=False):
            return WTACRSLinearFunction.apply(x_c, weight, bias, sample.index, sample.weight, self.wta_tracker)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, wta_keep_ratio={self.wta_keep_ratio}"


class WTACRSLinear(_WTACRSMixin, nn.Linear):
    def _linear_weight(self) -> torch.Tensor:
        return self.weight  # (d_out, d_in)


class WTACRSConv1D(_WTACRSMixin, Conv1D):
    """GPT-2's ``Conv1D`` (y = x W + b, weight (d_in, d_out)), sampled the same way."""

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.t()  # a view: the gradient flows back to the (d_in, d_out) parameter


# The exact classes that can be swapped, and what they become.
SAMPLED_CLASS: dict[type, type] = {nn.Linear: WTACRSLinear, Conv1D: WTACRSConv1D}
