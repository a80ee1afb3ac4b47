"""The memory planner: predict a recipe's peak memory for one training step, without weights.

One package, one public interface (this module): :func:`plan` and its :class:`Plan`,
:func:`format_plan`, :func:`refusal`, :func:`suggestions`. Inside:

* :mod:`lowmem.planner.trace`: the trainer's own step traced on fake tensors (bytes by part);
* :mod:`lowmem.planner.plan`: the plan of a recipe (runtime baseline, suggestions, the text);
* :mod:`lowmem.planner.first_order`: a first-order offloaded run (Fuyou), device and host;
* :mod:`lowmem.planner.zo2`: the ZO2 engine's device buffers;
* :mod:`lowmem.planner.fsdp`: one rank's peak under FSDP2 (:func:`plan_fsdp2`);
* :mod:`lowmem.planner.fake_base`: LoRA adapters and a bitsandbytes base on fake tensors;
* :mod:`lowmem.planner.phases`: the host's peak in each phase of a run (build, step, eval, save);
* :mod:`lowmem.planner.disk`: the files a run writes (NVMe tier, model, checkpoints) against the free space;
* :mod:`lowmem.planner.run`: the plan of a run as its step class declares it (:func:`plan_run`), its host phases
  (:func:`run_host_phases`) and the plan its files are counted from (:func:`whole_run_plan`).

It sits above build/trainer (it builds the run's step object) and below the CLI and the tools.
"""

from lowmem.models import model_config
from lowmem.planner.plan import (CHANGES, Plan, adapter_imports, config_section, format_plan, plan, refusal,
                                 runtime_baseline_bytes, suggestions)
from lowmem.planner.disk import disk_needs, disk_refusal, fits_unplanned, reused_dirs, tree_bytes
from lowmem.planner.fsdp import plan_fsdp2, processes_of
from lowmem.planner.phases import (PHASES, format_phases, host_memory, host_phases, host_refusal, host_together,
                                   weight_bytes)
from lowmem.planner.run import plan_run, run_host_phases, whole_run_plan
from lowmem.planner.trace import fake_model, trace_phases, trace_step
from lowmem.planner.zo2 import zo2_device_buffers
from lowmem.recipe import with_overrides

__all__ = ["CHANGES", "PHASES", "adapter_imports", "config_section", "disk_needs", "disk_refusal", "fake_model",
           "fits_unplanned", "format_phases", "format_plan", "host_memory", "host_phases", "host_refusal",
           "model_config", "Plan", "plan", "plan_fsdp2", "plan_run", "processes_of", "refusal", "reused_dirs",
           "run_host_phases", "runtime_baseline_bytes", "suggestions", "trace_phases", "trace_step", "tree_bytes", "weight_bytes",
           "whole_run_plan", "with_overrides", "zo2_device_buffers"]
