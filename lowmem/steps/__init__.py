"""One definition of a training step, used by the trainer, the planner's trace, the Hugging Face
integration and the benchmarks.

:data:`STEPS` is the registry: exactly one class's ``applies(recipe, zeroth_order)`` holds for a
recipe, and it is the way that recipe steps. The class also decides what it refuses
(``check(recipe)``, asked by the recipe's validator) and prepares the optimizer and model
(``setup``); :func:`make_step` builds it (called by :func:`lowmem.build.build_step`). A new way of
stepping is one :class:`~lowmem.steps.base.Step` subclass added here.
"""

from __future__ import annotations

from typing import Callable

from lowmem.steps.base import OneProcess, Step, eval_mode, finite_on_every_process, unwrap
from lowmem.steps.first_order import FirstOrderStep, LayerwiseStep
from lowmem.steps.fsdp import FSDP2Step
from lowmem.steps.fsdp_zeroth_order import FSDP2ZerothOrderStep
from lowmem.steps.offload import FirstOrderOffloadStep, ZO2Step
from lowmem.steps.zeroth_order import ZerothOrderStep

STEPS: list[type[Step]] = [FSDP2Step, FSDP2ZerothOrderStep, ZO2Step, FirstOrderOffloadStep, ZerothOrderStep, LayerwiseStep, FirstOrderStep]


def step_class(recipe, zeroth_order: bool) -> type[Step]:
    """The registered way ``recipe`` steps (``zeroth_order``: its optimizer is a zeroth-order one): the
    one class of :data:`STEPS` that applies (two or none is a defect of the registry, not of the recipe)."""
    found = [cls for cls in STEPS if cls.applies(recipe, zeroth_order)]
    if len(found) != 1:
        raise RuntimeError(f"lowmem.steps.STEPS: {len(found)} step classes apply to this recipe "
                           f"({', '.join(cls.__name__ for cls in found) or 'none'}); exactly one must")
    return found[0]


def make_step(recipe, model, optimizer, zeroth_order: bool, accelerator, loss_fn: Callable,
              eval_fn: Callable) -> Step:
    """The step object of ``recipe`` on ``model`` and ``optimizer`` (as :func:`lowmem.build.build_optimizer` made it)."""
    return step_class(recipe, zeroth_order)(recipe, model, optimizer, accelerator, loss_fn, eval_fn)


__all__ = ["STEPS", "FSDP2Step", "FSDP2ZerothOrderStep", "FirstOrderOffloadStep", "FirstOrderStep", "LayerwiseStep", "OneProcess", "Step",
           "ZO2Step", "ZerothOrderStep", "eval_mode", "finite_on_every_process", "make_step", "step_class", "unwrap"]
