"""The plan of a run as it will step: the model its step class declares (``Step.memory_plan``) decides
between one rank's peak under FSDP2 (:func:`lowmem.planner.fsdp.plan_fsdp2`, ``"fsdp2"``) and one
process's (:func:`lowmem.planner.plan.plan`, every other model), so no caller branches on the recipe."""

from __future__ import annotations

from lowmem.optim.registry import get_spec
from lowmem.planner.fsdp import plan_fsdp2
from lowmem.planner.plan import Plan, plan
from lowmem.recipe import Recipe
from lowmem.steps import step_class


def plan_run(recipe: Recipe, device: str = "cpu", device_memory_gb: float | None = None, processes: int | None = None,
             suggest: bool = True, runtime_bytes: int | None = None) -> Plan:
    """:func:`plan` of ``recipe``, or one rank's of ``processes`` (default: the launcher's) under FSDP2."""
    if step_class(recipe, get_spec(recipe.optim.name).zeroth_order).memory_plan == "fsdp2":
        return plan_fsdp2(recipe, processes, device, device_memory_gb, runtime_bytes=runtime_bytes)
    return plan(recipe, device, device_memory_gb, suggest=suggest, runtime_bytes=runtime_bytes)
