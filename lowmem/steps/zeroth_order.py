"""The zeroth-order step (MeZO, Malladi et al. 2023, Alg. 1; ZO-AdaMU): ``optimizer.step(closure)``,
the closure a no-grad forward of one micro-batch returning the loss.

The model is in eval mode during the step: both forwards of the finite difference must be the same
function, so dropout may not draw masks (MeZO's trainer evaluates the perturbed losses in eval mode).
The forwards run in fp32 unless the optimizer was built with ``fp32_forward=False``: under autocast
the difference ``L+ - L-`` drowns in rounding (MeZO §3, the precision discussion; lowmem issue #9).
A NaN/Inf projected gradient makes the optimizer skip the update (``last_step_skipped``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from lowmem.optim.zo_noise import release_scratch
from lowmem.steps.base import MicroBatch, Step, eval_mode
from lowmem.steps.layerwise import check_layerwise


def check_zeroth_order(recipe) -> None:
    """What every zeroth-order step (in memory or ZO2) refuses: several micro-batches per step (the
    finite difference is taken on one batch), layer-wise hooks (there is no backward) and trainable int8
    weights (:mod:`lowmem.int8_weights` rounds a first-order optimizer's update)."""
    if recipe.train.grad_accum != 1:
        raise ValueError("train.grad_accum: zeroth-order optimizers take one batch per step (set it to 1)")
    if recipe.optim.layerwise:
        check_layerwise("optim.layerwise", zeroth_order=True)
    if recipe.model.dtype == "int8":
        raise ValueError(f"model.dtype: int8 weights take first-order updates; {recipe.optim.name} is zeroth "
                         "order")


def zo_autocast(step: Step):
    """The context of a zeroth-order forward: none (fp32) unless the optimizer allows autocast."""
    return nullcontext() if getattr(step.inner_optimizer, "fp32_forward", False) else step.accelerator.autocast()


class ZerothOrderStep(Step):
    name = "zeroth_order"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return recipe.train.distributed == "ddp" and zeroth_order and not recipe.offload.enabled

    @classmethod
    def check(cls, recipe) -> None:
        check_zeroth_order(recipe)

    def forward_loss(self, batch: dict) -> torch.Tensor:
        """The closure's loss: one no-grad forward of ``batch`` (the finite difference's ``L``)."""
        with torch.no_grad(), zo_autocast(self):
            return self.loss_fn(self.model, batch)

    def step(self, micro_batch: MicroBatch) -> tuple[float, None]:
        batch = micro_batch(0)

        def closure() -> torch.Tensor:
            return self.forward_loss(batch)

        self.on_phase("forward")
        with eval_mode(self.model):
            loss = self.optimizer.step(closure)
        release_scratch()  # the noise's buffer is not held through an eval or a save
        return (math.nan if self.optimizer.last_step_skipped else float(loss)), None
