"""The plan of a run as it will step: the model its step class declares (``Step.memory_plan``) decides
between one rank's peak under FSDP2 (:func:`lowmem.planner.fsdp.plan_fsdp2`, ``"fsdp2"``) and one
process's (:func:`lowmem.planner.plan.plan`, every other model), so no caller branches on the recipe.
From it, the run's host phases (:func:`run_host_phases`) and the plan its files are counted from
(:func:`whole_run_plan`): what the CLI checks before a run, and what ``benchmarks/bench_largest.py`` puts
next to a run's measured figures."""

from __future__ import annotations

from lowmem.optim.registry import get_spec
from lowmem.planner.fsdp import plan_fsdp2
from lowmem.planner.phases import host_phases
from lowmem.planner.plan import Plan, adapter_imports, plan, runtime_baseline_bytes
from lowmem.recipe import Recipe
from lowmem.steps import step_class


def plan_run(recipe: Recipe, device: str = "cpu", device_memory_gb: float | None = None, processes: int | None = None,
             suggest: bool = True, runtime_bytes: int | None = None) -> Plan:
    """:func:`plan` of ``recipe``, or one rank's of ``processes`` (default: the launcher's) under FSDP2."""
    if step_class(recipe, get_spec(recipe.optim.name).zeroth_order).memory_plan == "fsdp2":
        return plan_fsdp2(recipe, processes, device, device_memory_gb, runtime_bytes=runtime_bytes)
    return plan(recipe, device, device_memory_gb, suggest=suggest, runtime_bytes=runtime_bytes)


def run_host_phases(recipe: Recipe, config, device: str, processes: int | None = None,
                    predicted: Plan | None = None) -> dict[str, int]:
    """One process's predicted host peak RSS by phase (:func:`lowmem.planner.phases.host_phases`): the step as
    it will step (:func:`plan_run`, one rank's under FSDP2; ``predicted`` when it is a plan on ``device``), the
    no-grad forward's plan for an in-memory CPU run's eval, and the runtime baseline of a fresh process."""
    step = predicted if predicted is not None and predicted.device == device \
        else plan_run(recipe, device, processes=processes, suggest=False)
    forward = plan(recipe, device, suggest=False, forward_only=True) \
        if device == "cpu" and not recipe.offload.enabled else None
    return host_phases(recipe, config, step, runtime_baseline_bytes(config.model_type, adapter_imports(recipe.model)),
                       forward)


def whole_run_plan(recipe: Recipe, device: str, predicted: Plan | None = None) -> Plan:
    """The plan the run's files are counted from (:func:`lowmem.planner.disk.disk_needs`): the whole run's, under
    FSDP2 too; ``predicted`` when it is one process's plan on ``device``."""
    if predicted is not None and predicted.device == device and predicted.processes == 1:
        return predicted
    return plan(recipe, device, suggest=False)
