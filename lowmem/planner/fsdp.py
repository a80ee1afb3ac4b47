"""The per-rank memory plan of a run sharded by FSDP2 (``train.distributed: fsdp2``) over N processes.

FSDP2 (:mod:`lowmem.fsdp`) shards every parameter by rows (``Shard(0)``, ``torch.chunk``'s split:
rank 0 holds ``ceil(m / N)`` of ``m`` rows, the largest shard), per decoder block and then the
root (embeddings, final norm, ``lm_head``). What rank 0 holds is built from the one-process step
traced on fake tensors (:func:`lowmem.planner.trace.trace_phases`: activations of the per-process
micro-batch, step temporaries, the optimizer state each parameter gets after a fake step) and
FSDP2's layout, at the larger of two phases:

backward = runtime + W/N + S_rank + A + G_b + [grad_accum > 1] G/N
           + E + 3 B_max                 # the root all-gathered for the whole forward/backward; the
                                         # current block, the one prefetched (or the all-gather's flat
                                         # output during copy-out) and its unsharded gradients
step     = runtime + W/N + G/N + S_rank + T + 2 M_max

with ``W``, ``G`` all weights and gradients, ``x/N`` rank 0's rows of each tensor, ``A``, ``G_1``,
``T`` the one-process backward-peak activations and the step temporaries, ``G_b`` the gradients one
process has made at that peak, the root's (``lm_head``'s, made first) whole and the blocks' sharded
(each block's are reduce-scattered as soon as its backward ends), ``E`` the root's parameters,
``B_max`` the largest block's, ``M_max`` the largest matrix whose whole gradient a rank all-gathers
(the optimizer's ``gathers_gradient``, :mod:`lowmem.optim.dtensor`; 0 when none does): every step with
a whole-size stand-in for SWAN's wide or square matrices (its tall ones, stepped on the rows, send sums
only), or at an SVD refresh with the refresh's temporaries for GaLore, APOLLO with ``proj: svd`` and
FRUGAL with ``proj_type: svd`` (APOLLO's random projection and FRUGAL's other subspaces are put
together from the shards by all-reduces of the projection or selection: nothing whole is gathered).
``S_rank``: the state of elementwise groups sharded (rank 0's rows), that of the others replicated
(whole-matrix rules, and GaLore's and APOLLO's projections, stepped on the rows with the projection
all-reduced), at the steady state (a later step's backward holds the state the first step made).
Not counted: the collectives' buffers inside gloo/NCCL. Rank 0 builds the full model in host RAM (the
build phase, :mod:`lowmem.planner.phases`), the others on ``meta``; ``fully_shard`` moves each group to the
device as it shards it and rank 0's weights are broadcast into the shards one tensor at a time
(:func:`lowmem.fsdp.load_from_rank0`), so the device never holds more than the shards and one whole block
before the first step.
"""

from __future__ import annotations

import math
import os

import torch

from lowmem.models import model_config
from lowmem.planner.plan import Plan, adapter_imports, config_section, runtime_baseline_bytes
from lowmem.planner.trace import fake_optimizer_step, trace_phases
from lowmem.recipe import Recipe
from lowmem.structure import block_container

# what a sharded run imports besides a one-process run: part of its runtime baseline
DISTRIBUTED_IMPORTS = ("torch.distributed.fsdp", "torch.distributed.checkpoint", "lowmem.fsdp")


def processes_of(flag: int | None) -> int:
    """The number of processes to plan for: ``--processes``, else the launcher's ``WORLD_SIZE``, else 1."""
    n = flag if flag is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if n < 1:
        raise ValueError(f"--processes: must be >= 1, got {n}")
    return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rank0(nbytes: int, t: torch.Tensor, n: int) -> int:
    """Rank 0's part of ``nbytes`` laid out like ``t``'s rows (``Shard(0)``: ``ceil(rows / n)`` of them)."""
    rows = t.shape[0] if t.dim() else 1
    return nbytes * math.ceil(rows / n) // rows if rows else 0


def _layout(recipe: Recipe, config, n: int, device: str) -> dict[str, int]:
    """Rank 0's weights, gradients and state, the root's and largest block's bytes and the largest
    parameter whose gradient a rank all-gathers, from the model and optimizer after a fake step."""
    model, optimizer = fake_optimizer_step(recipe, config, device)
    params = list({id(p): p for p in model.parameters()}.values())
    elementwise = getattr(optimizer, "elementwise", lambda group: True)  # torch's own: DTensor natively
    gathers = getattr(optimizer, "gathers_gradient", lambda group, p: False)
    states, whole = 0, 0
    for group in optimizer.param_groups:
        local = elementwise(group)
        for p in group["params"]:
            tensors = [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
            s = sum(_nbytes(v) for v in tensors if v.dim())
            states += (_rank0(s, p, n) if local else s) + sum(_nbytes(v) for v in tensors if not v.dim())  # counters
            whole = max(whole, _nbytes(p)) if gathers(group, p) else whole  # every step, or at an SVD refresh
    in_blocks = {id(p) for b in block_container(model)[1] for p in b.parameters()}
    blocks = [sum(_nbytes(p) for p in {id(q): q for q in b.parameters()}.values()) for b in block_container(model)[1]]
    return {"weights": sum(_rank0(_nbytes(p), p, n) for p in params) + sum(_nbytes(b) for b in model.buffers()),
            "gradients": sum(_rank0(_nbytes(p), p, n) for p in params if p.requires_grad),
            "optimizer_states": states, "whole_matrix": whole, "block": max(blocks),
            "root": sum(_nbytes(p) for p in params if id(p) not in in_blocks),
            "root_gradients": sum(_nbytes(p) for p in params if id(p) not in in_blocks and p.requires_grad)}


def plan_fsdp2(recipe: Recipe, processes: int, device: str = "cpu", device_memory_gb: float | None = None,
               runtime_bytes: int | None = None) -> Plan:
    """The predicted peak of one rank (rank 0, the largest shards) of ``recipe`` under FSDP2 on
    ``processes`` processes, ``device`` as in :func:`lowmem.planner.plan` (cpu: peak RSS with the runtime
    baseline of a process that imported FSDP2 too; cuda: peak allocated)."""
    config = model_config(recipe.model)
    recipe = config_section(recipe, config)
    n = processes_of(processes)
    lay = _layout(recipe, config, n, device)
    phases, _ = trace_phases(recipe, config, device)
    backward, step = phases["backward"], phases.get("step", dict.fromkeys(phases["backward"], 0))
    runtime = 0 if device != "cpu" else runtime_bytes if runtime_bytes is not None else \
        runtime_baseline_bytes(config.model_type, DISTRIBUTED_IMPORTS + adapter_imports(recipe.model))
    held = {"runtime": runtime, "weights": lay["weights"], "optimizer_states": lay["optimizer_states"]}
    accumulated = lay["gradients"] if recipe.train.grad_accum > 1 else 0
    made = backward["gradients"]  # by one process at its backward peak: the root's first (lm_head), unsharded
    unsharded = min(made, lay["root_gradients"]) + max(0, made - lay["root_gradients"]) // n
    candidates = [
        {**held, "gradients": unsharded + accumulated, "activations": backward["activations"],
         "step_temporaries": backward["step_temporaries"], "all_gathered": lay["root"] + 3 * lay["block"]},
        {**held, "gradients": lay["gradients"], "activations": step["activations"],
         "step_temporaries": step["step_temporaries"], "all_gathered": 2 * lay["whole_matrix"]},
    ]
    parts = max(candidates, key=lambda c: sum(c.values()))
    per_rank = {"weights": lay["weights"], "gradients": lay["gradients"], "optimizer_states": lay["optimizer_states"]}
    capacity = None if device_memory_gb is None else int(device_memory_gb * 2**30)
    return Plan(device=device, parts=parts, totals=per_rank, capacity_bytes=capacity, processes=n)
