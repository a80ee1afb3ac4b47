"""One definition of a training step, used by the trainer, the planner's trace, the Hugging Face
integration and the benchmarks.

:data:`STEPS` is the registry: the first class whose ``applies(recipe, zeroth_order)`` holds is the
way a recipe steps (:func:`make_step`, called once by :func:`lowmem.build.build_run`). A new way of
stepping is one :class:`~lowmem.steps.base.Step` subclass added here.
"""

from __future__ import annotations

from typing import Callable

from lowmem.steps.base import OneProcess, Step, all_finite, eval_mode
from lowmem.steps.first_order import FirstOrderStep, LayerwiseStep
from lowmem.steps.fsdp import FSDP2Step
from lowmem.steps.offload import FirstOrderOffloadStep, ZO2Step
from lowmem.steps.zeroth_order import ZerothOrderStep

STEPS: list[type[Step]] = [FSDP2Step, ZO2Step, FirstOrderOffloadStep, ZerothOrderStep, LayerwiseStep, FirstOrderStep]


def step_class(recipe, zeroth_order: bool) -> type[Step]:
    """The registered way ``recipe`` steps (``zeroth_order``: its optimizer is a zeroth-order one)."""
    return next(cls for cls in STEPS if cls.applies(recipe, zeroth_order))


def make_step(recipe, model, optimizer, zeroth_order: bool, accelerator, loss_fn: Callable,
              eval_fn: Callable) -> Step:
    """The step object of ``recipe`` on ``model`` and ``optimizer`` (as :func:`lowmem.build.build_optimizer` made it)."""
    return step_class(recipe, zeroth_order)(recipe, model, optimizer, accelerator, loss_fn, eval_fn)


__all__ = ["STEPS", "FSDP2Step", "FirstOrderOffloadStep", "FirstOrderStep", "LayerwiseStep", "OneProcess", "Step",
           "ZO2Step", "ZerothOrderStep", "all_finite", "eval_mode", "make_step", "step_class"]
