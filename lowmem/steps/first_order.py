"""First-order steps: forward/backward over ``train.grad_accum`` micro-batches, then the update.

* :class:`FirstOrderStep`: clip to ``optim.max_grad_norm`` (the norm is always computed and
  logged), ``optimizer.step()``, ``zero_grad``. A non-finite loss or gradient norm skips the step
  with the weights and the optimizer state untouched.
* :class:`LayerwiseStep`: the optimizer is a :class:`~lowmem.steps.layerwise.LayerwiseOptimizer`,
  which updates each parameter inside backward (GaLore, Zhao et al. 2024, §4.3); ``step()`` then
  updates what backward left. A NaN/Inf gradient is dropped by the hooks (its parameter untouched)
  and the step reported as skipped; the parameters already updated in that backward keep their update.

Gradient accumulation: each micro-batch's loss is divided by ``grad_accum`` before backward, and
data-parallel gradients are synchronised only on the last micro-batch (``accelerator.no_sync``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from lowmem.steps.base import MicroBatch, Step, finite_on_every_process
from lowmem.steps.layerwise import LayerwiseOptimizer, check_layerwise


class _Backprop(Step):
    def _forward_backward(self, micro_batch: MicroBatch) -> float | None:
        """Mean loss over the micro-batches, gradients accumulated; None if a loss was not finite."""
        acc, n = self.accelerator, self.recipe.train.grad_accum
        total = 0.0
        for micro in range(n):
            batch = micro_batch(micro)
            with nullcontext() if micro == n - 1 else acc.no_sync(self.model):
                self.on_phase("forward")
                with acc.autocast():
                    loss = self.loss_fn(self.model, batch)
                if not finite_on_every_process(acc, loss.detach()):
                    return None
                self.on_phase("backward")
                acc.backward(loss / n)
            total += loss.item() / n
            del loss
        return total

    def _skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class FirstOrderStep(_Backprop):
    name = "first_order"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return (recipe.train.distributed == "ddp" and not zeroth_order and not recipe.optim.layerwise
                and not recipe.offload.enabled)

    def setup(self, model, optimizer):
        if self.recipe.model.dtype == "int8" and self.accelerator.num_processes > 1:
            raise ValueError("model.dtype: int8 weights train in one process (DDP's first broadcast writes every "
                             "weight, and an int8 layer's weight is a one-element placeholder); launch one process")
        return self.accelerator.prepare(model, optimizer)  # DDP wrapper, mixed precision, device

    def step(self, micro_batch: MicroBatch) -> tuple[float, float | None]:
        total = self._forward_backward(micro_batch)
        if total is None:
            self._skip()
            return math.nan, None
        self.on_phase("step")
        max_norm = self.recipe.optim.max_grad_norm or float("inf")
        norm = self.clip(max_norm)
        if not torch.isfinite(torch.as_tensor(norm)):
            self._skip()
            return math.nan, float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, float(norm)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to ``max_norm`` and return their norm before clipping."""
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)


class LayerwiseStep(_Backprop):
    name = "layerwise"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return (recipe.train.distributed == "ddp" and not zeroth_order and recipe.optim.layerwise
                and not recipe.offload.enabled)

    @classmethod
    def check(cls, recipe) -> None:
        check_layerwise("optim.layerwise", max_grad_norm=recipe.optim.max_grad_norm,
                        fp16=recipe.train.mixed_precision == "fp16")

    def prepare_optimizer(self, model, optimizer):
        check_layerwise("optim.layerwise", processes=self.accelerator.num_processes)
        return LayerwiseOptimizer(optimizer, grad_accum_steps=self.recipe.train.grad_accum,
                                  max_grad_norm=self.recipe.optim.max_grad_norm, model=model)

    def step(self, micro_batch: MicroBatch) -> tuple[float, None]:
        total = self._forward_backward(micro_batch)
        if total is None:
            self._skip()
            return math.nan, None
        self.on_phase("step")
        nonfinite = self.optimizer.take_nonfinite()  # updates already happened inside backward
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (math.nan if nonfinite else total), None
