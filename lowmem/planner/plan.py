"""The memory planner: predict a recipe's peak memory for one training step, without weights.

How (issue #8): :func:`lowmem.planner.trace.trace_step` builds the model from its config alone
(``model.config``, a local/hub ``config.json``, or a GGUF header) on fake tensors, builds the
real optimizer and runs the trainer's own step and loss (a chunked ``train.loss_chunk_tokens``
loss included) on it, counting the bytes of live tensors: the parts at the peak (weights,
gradients, optimizer states, activations, step temporaries) and the whole-run totals. Two pieces are modelled here, not traced:

* CPU: a process holds a runtime baseline besides tensors (Python, torch, transformers
  code and allocator pools). It is measured once: a fresh process imports the same
  modules, builds a two-layer model of the same ``model_type`` and reports its RSS
  (:func:`runtime_baseline_bytes`). Peak RSS = baseline + the traced tensor peak holds
  because a run keeps glibc's mmap threshold fixed, so freed tensors leave the process
  (:func:`lowmem.memory.fix_malloc_threshold`). CUDA: no baseline (``max_memory_allocated``
  counts tensors only).
* ZO2 offload on a GPU: only resident parameters (embeddings, norms, head) stay on the
  device; the transfer buffers are what the engine allocates (:func:`lowmem.planner.zo2.zo2_device_buffers`:
  ``prefetch_depth + 2`` slots in the training dtype, staging buffers of the ``offload.host_dtype``
  encoding when it differs, a copy of a tied weight during the forward). On a CPU the same parts
  plus the blocks' host copies (int8: 1 + 4/256 bytes per weight); activations are those of the
  in-memory zeroth-order step object on the doubled batch (ZO2's dual forward). ``ZO2Step`` is
  not traced itself: its streams and pinned host buffers have no fake-tensor counterpart, and its
  computation is the in-memory step's (ZO2 equals MeZO bit for bit, tests/offload).

Which of these applies is declared by the recipe's step class (``Step.memory_plan``, looked up in
:data:`MEMORY_MODELS`): the planner never branches on the class itself.

With a capacity, a plan that does not fit comes with :func:`suggestions`: the changes of
:data:`CHANGES` that apply, each with its own predicted peak.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass, field

from lowmem.models import model_config
from lowmem.optim.registry import get_spec
from lowmem.planner.first_order import offload_parts
from lowmem.planner.trace import trace_step
from lowmem.planner.zo2 import zo2_parts
from lowmem.recipe import Recipe, with_overrides
from lowmem.steps import step_class


@dataclass
class Plan:
    """A predicted step peak on ``device``: ``parts`` (bytes live at the peak, summing to
    ``peak_bytes``) and ``totals`` (whole-run sizes: all weights, all gradients, the state)."""

    device: str
    parts: dict[str, int]
    totals: dict[str, int]
    capacity_bytes: int | None = None
    suggestions: list[tuple[str, list[str], int]] = field(default_factory=list)
    host_parts: dict[str, int] = field(default_factory=dict)  # first-order offload: host RAM besides runtime
    host_runtime_bytes: int = 0
    processes: int = 1  # FSDP2 (lowmem.planner.fsdp): the peak is one rank's of this many

    @property
    def host_rss_bytes(self) -> int | None:
        """Predicted host peak RSS of a first-order offloaded run (on a CPU device: the peak itself)."""
        if not self.host_parts:
            return None
        return self.peak_bytes if self.device == "cpu" else self.host_runtime_bytes + sum(self.host_parts.values())

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.peak_bytes <= self.capacity_bytes


def config_section(recipe: Recipe, config) -> Recipe:
    """``recipe`` with ``model.config`` set from ``config`` (random init of the same shapes)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    model = recipe.model.model_copy(update={"path": None, "gguf_file": None, "config": cfg, "tokenizer": "bytes"})
    return recipe.model_copy(update={"model": model})


def adapter_imports(section) -> tuple[str, ...]:
    """The packages a run of ``model`` section imports for adapters and a quantized base (part of its RSS)."""
    return (("peft",) if section.lora is not None or section.quantize is not None else ()) + \
        (("bitsandbytes",) if section.quantize is not None else ())


@functools.lru_cache(maxsize=None)
def runtime_baseline_bytes(model_type: str, imports: tuple[str, ...] = ()) -> int:
    """RSS of a fresh process after it imported what a run imports (torch, transformers,
    accelerate, the engine, the ``model_type`` modelling code and ``imports``): what a CPU run
    holds besides its tensors. With :func:`~lowmem.memory.fix_malloc_threshold`, as a run has it,
    freed tensors leave the process, so baseline + live tensors is the model of peak RSS."""
    code = ("import lowmem.memory as m; m.fix_malloc_threshold();"
            "import json, torch, transformers, accelerate, lowmem.build;"
            + "".join(f"import {name};" for name in imports) +
            "from transformers import AutoConfig, AutoModelForCausalLM;"
            f"AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model({model_type!r}))];"
            "print(json.dumps(m.current_rss_bytes()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def in_memory_parts(recipe: Recipe, config, device: str, forward_only: bool):
    """(device parts, host parts, totals) of the step object traced on fake tensors (:func:`trace_step`)."""
    parts, totals = trace_step(recipe, config, 1, forward_only, device)
    return parts, {}, totals


def zo2_step_parts(recipe: Recipe, config, device: str, forward_only: bool):
    """ZO2: the in-memory zeroth-order step traced on the doubled batch (the dual forward), the blocks'
    weights replaced by the engine's buffers (:func:`zo2_parts`): on a GPU its device; on a CPU its step
    (host copies and buffers in the one RSS). A CPU no-grad forward is the in-memory one."""
    if device != "cuda" and forward_only:
        return in_memory_parts(recipe, config, device, forward_only)
    parts, totals = zo2_parts(recipe, config, *trace_step(recipe, config, 2, forward_only, device), device)
    return parts, {}, totals


def first_order_offload_parts(recipe: Recipe, config, device: str, forward_only: bool):
    """A first-order offloaded step (:func:`offload_parts`, Fuyou): device and host parts (on a CPU device
    both in the peak); a no-grad forward is planned as the in-memory one."""
    if forward_only:
        return in_memory_parts(recipe, config, device, forward_only)
    parts, host, totals = offload_parts(recipe, config, device)
    return ({**parts, **host} if device == "cpu" else parts), host, totals


# Step.memory_plan -> (recipe, config, device, forward_only) -> (device parts, host parts, totals); "fsdp2": here
# the whole model on one process (an upper bound of a rank's), one rank's in lowmem.planner.run.plan_run
MEMORY_MODELS = {"in_memory": in_memory_parts, "zo2": zo2_step_parts, "first_order_offload": first_order_offload_parts,
                 "fsdp2": in_memory_parts}


def plan(recipe: Recipe, device: str = "cpu", device_memory_gb: float | None = None,
         suggest: bool = True, forward_only: bool = False, runtime_bytes: int | None = None) -> Plan:
    """Predict the peak of one training step of ``recipe`` on ``device`` ("cpu": peak RSS,
    "cuda": peak allocated), or of one no-grad forward. With ``device_memory_gb``, say whether
    it fits and, if not, which changes make it fit (with their predicted peaks). ``runtime_bytes``: the
    runtime baseline when the caller measured it itself (the CLI: its own fresh process after its imports);
    default: :func:`runtime_baseline_bytes`."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: must be cpu or cuda, got {device!r}")
    if device_memory_gb is not None and device_memory_gb <= 0:
        raise ValueError(f"train.device_memory_gb: must be > 0, got {device_memory_gb}")
    config = model_config(recipe.model)
    recipe = config_section(recipe, config)  # from here on the config alone: no weights, no tokenizer files
    way = step_class(recipe, get_spec(recipe.optim.name).zeroth_order)  # how the run steps, decided once
    parts, host, totals = MEMORY_MODELS[way.memory_plan](recipe, config, device, forward_only)
    baseline = 0 if device != "cpu" and not host else \
        runtime_bytes if runtime_bytes is not None else runtime_baseline_bytes(config.model_type,
                                                                             adapter_imports(recipe.model))
    parts["runtime"] = baseline if device == "cpu" else 0
    capacity = None if device_memory_gb is None else int(device_memory_gb * 2**30)
    result = Plan(device=device, parts=parts, totals=totals, capacity_bytes=capacity, host_parts=host,
                  host_runtime_bytes=baseline)
    if suggest and not result.fits:
        result.suggestions = suggestions(recipe, device, capacity)
    return result


# (label, overrides): the changes tried, alone and combined, for a recipe that does not fit
CHANGES = [
    ("APOLLO-Mini", ["optim.name=apollo_mini", "optim.args={}"]),
    ("8-bit AdamW, 8-bit embedding state", ["optim.name=adamw8bit", "optim.args={fp32_state_params: []}"]),
    ("layer-wise updates", ["optim.layerwise=true", "optim.max_grad_norm=null"]),
    ("gradient checkpointing", ["model.gradient_checkpointing=true", "activations.wta_crs=null"]),
    ("chunked LM loss", ["train.loss_chunk_tokens=256"]),
    ("WTA-CRS keep 0.3", ["activations.wta_crs={keep_ratio: 0.3}", "model.gradient_checkpointing=false"]),
    ("lean RMSNorm and MLP", ["activations.lean=true"]),
    ("APOLLO-Mini + layer-wise + checkpointing",
     ["optim.name=apollo_mini", "optim.args={}", "optim.layerwise=true", "optim.max_grad_norm=null",
      "model.gradient_checkpointing=true", "activations.wta_crs=null"]),
    ("8-bit AdamW (8-bit embedding) + layer-wise + checkpointing",
     ["optim.name=adamw8bit", "optim.args={fp32_state_params: []}", "optim.layerwise=true",
      "optim.max_grad_norm=null", "model.gradient_checkpointing=true", "activations.wta_crs=null"]),
    ("MeZO (zeroth order)", ["optim.name=mezo", "optim.args={}", "optim.layerwise=false", "train.grad_accum=1"]),
    ("ZO2 (MeZO, blocks offloaded to the host)",
     ["optim.name=mezo", "optim.args={}", "optim.layerwise=false", "train.grad_accum=1", "offload.enabled=true"]),
]


def _already(recipe: Recipe, changed: Recipe) -> bool:
    """Whether ``recipe`` already does what the change made ``changed`` do: the same recipe, except for
    optimizer arguments the change only dropped (e.g. "APOLLO-Mini" on an APOLLO-Mini recipe with ``scale_front``)."""
    before, after = recipe.model_dump(), changed.model_dump()
    args_before, args_after = before["optim"].pop("args"), after["optim"].pop("args")
    return before == after and all(k in args_before and args_before[k] == v for k, v in args_after.items())


def suggestions(recipe: Recipe, device: str, capacity: int | None) -> list[tuple[str, list[str], int]]:
    """Each change of :data:`CHANGES` that applies, with its predicted peak, smallest first
    (ZO2 only on a GPU: on the CPU the host is the device)."""
    found = []
    for label, overrides in CHANGES:
        if "offload.enabled=true" in overrides and device != "cuda":
            continue
        try:
            changed = with_overrides(recipe, overrides)
            if _already(recipe, changed):
                continue
            changed = plan(changed, device, suggest=False)
        except ValueError:  # the change does not combine with this recipe (e.g. grad_accum with ZO)
            continue
        found.append((label, overrides, changed.peak_bytes))
    return sorted(found, key=lambda item: item[2])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(p: Plan) -> str:
    """The plan as text: the parts live at the peak (their sum is the peak), the step's totals and why a total
    exceeds its part at the peak, verdict, suggestions."""
    what = "peak RSS" if p.device == "cpu" else "peak CUDA memory"
    where = p.device if p.processes == 1 else f"{p.device}, rank 0 of {p.processes} FSDP2 processes"
    lines = [f"memory plan ({where}): predicted {what} {_gib(p.peak_bytes)} of one step = the sum of what is live "
             "at its peak:"]
    lines += [f"  {name:<18} {_gib(n):>12}" for name, n in p.parts.items() if n]
    lines.append("  whole step (not all live at once): " + ", ".join(f"{k} {_gib(v)}" for k, v in p.totals.items()))
    later = p.totals.get("optimizer_states", 0) - p.parts.get("optimizer_states", 0)
    if p.totals.get("gradients", 0) > p.parts.get("gradients", 0) and not p.host_parts:
        lines.append(f"    gradients: {_gib(p.parts.get('gradients', 0))} at the peak: the backward makes them as it "
                     "frees the activations (layer-wise updates free each one at once)")
    if later > 0 and not p.host_parts:
        lines.append(f"    optimizer states: {_gib(later)} of them are made by the optimizer step, after the peak; "
                     f"they persist, so a later step's peak may be up to {_gib(later)} higher")
    if p.host_parts:
        lines.append(f"  host (offloaded blocks): predicted peak RSS {_gib(p.host_rss_bytes)}: "
                     + ", ".join(f"{k} {_gib(v)}" for k, v in p.host_parts.items()))
    if p.capacity_bytes is not None:
        lines.append(f"  fits in {_gib(p.capacity_bytes)}: {'yes' if p.fits else 'NO'}")
    for label, overrides, peak in p.suggestions:
        mark = "fits" if p.capacity_bytes is None or peak <= p.capacity_bytes else "too big"
        lines.append(f"  - {label}: {_gib(peak)} ({mark}): {' '.join(overrides)}")
    return "\n".join(lines)


def refusal(p: Plan) -> str:
    """One line saying why a run that does not fit is not started, and what would fit."""
    fitting = [s for s in p.suggestions if s[2] <= p.capacity_bytes]
    hint = f"; {fitting[0][0]} would need {_gib(fitting[0][2])} ({' '.join(fitting[0][1])})" if fitting else ""
    return (f"train.device_memory_gb: predicted peak {_gib(p.peak_bytes)} exceeds {_gib(p.capacity_bytes)} "
            f"on {p.device}{hint}; pass --force to run anyway")
