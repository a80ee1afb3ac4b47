"""The host's peak RSS in each phase of a run -- build, step, eval, save -- and the check against the host's RAM.

A step's plan (:mod:`lowmem.planner.plan`) predicts one phase; a run has four, and on a machine whose RAM
is smaller than the model the step is not the one that fails (issue 25: an offloaded 3B run was killed
while saving). With ``W`` the model's weights (training dtype, as built or read), ``B`` one decoder block's,
``T`` the largest tensor, ``M`` what the model object holds once built (:func:`held_bytes`, on fake tensors:
``W`` and its buffers; LoRA: plus the adapters; a frozen 4/8-bit base: codes and constants, the fp32 norms and
embeddings of peft's k-bit preparation; int8 weights: payloads and scales), ``S`` the optimizer state, ``R`` the
runtime (torch, transformers, and peft / bitsandbytes where the run imports them: :func:`runtime_baseline_bytes`)
and ``H`` what an offloaded run keeps in host RAM between steps (masters and states on the host tier, or ZO2's
blocks)::

    build : offloaded (streamed, lowmem.block_source): R + H_w + (W - L B) + 2 B + T32: the blocks' host
            copies already placed in RAM (H_w: first-order masters, ZO2 blocks), the modules outside the
            L blocks, a block filled and its packed copy, and the fp32 scratch buffer of the largest
            tensor T that a config build draws its skipped initialisation into; in memory: the model in its
            dtype, R + W (a config in a 16-bit dtype is built the same way, then its blocks filled one by one
            from an fp32 block: the larger of that, without H_w, and R + W + B32), then R + M (adapters
            added, int8 payloads in the weights' place); a frozen quantized base: quantized as transformers
            reads each weight, then peft casts each remaining 16-bit tensor to fp32 beside it: R + M + T on a
            CPU (R + T on a GPU, where the codes go), after R + W + T when the 16-bit model is first built in
            memory (a config, a GGUF file) and saved for that load. The checkpoint's pages that safetensors
            maps while transformers reads it are left out: clean page cache, counted in VmHWM while mapped but
            reclaimed under pressure (a 4-bit 70B base loads on a host smaller than its 16-bit files)
    step  : the step's plan on the CPU; on a GPU: R + H (+ the engines' host buffers: ZO2's NVMe staging)
    eval  : in memory on the CPU: the no-grad forward's plan + S (a zeroth-order step's noise buffer, the size
            of the largest parameter, is dropped when the step ends: lowmem.optim.zo_noise.release_scratch);
            first-order offloaded: what stays (as for the save, below) + (2 depth + 3) fp32 blocks when masters
            are on NVMe (the stores' read-ahead and write buffers, resident once a step has used them); ZO2: as
            its step (its eval streams the same blocks)
    save  : in memory: what stays (R + M + S on the CPU, R on a GPU) + the largest tensor written (safetensors
            0.8 writes each tensor from its own memory: at most one is copied, to make it contiguous; LoRA
            writes its adapters only; int8 weights are written dequantized, the L fp32 blocks at once); offloaded
            (streamed, lowmem.model_save): what stays (R + H, on a CPU with the modules outside the
            blocks and the engine's transfer buffers, which stay allocated: device slots, staging, ZO2's
            NVMe staging) + 2 x the largest part written (a checkpoint's block with its fp32 master and
            state; else a block)
"""

from __future__ import annotations

import psutil
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.dtypes import DTYPES
from lowmem.planner.trace import fake_model, held_tensors
from lowmem.recipe import Recipe
from lowmem.structure import block_container

PHASES = ("build", "step", "eval", "save")


def weight_bytes(recipe: Recipe, config) -> tuple[int, int, int]:
    """(all weights, one block's weights, the largest tensor) in bytes of the training dtype."""
    return _sizes(config, _weight_dtype(recipe))


def _weight_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the weights are built in (int8 weights: fp32, then quantized)."""
    return DTYPES[recipe.model.dtype] if recipe.model.dtype != "int8" else torch.float32


def _sizes(config, dtype: torch.dtype) -> tuple[int, int, int]:
    """(all weights, one block's weights, the largest tensor) in bytes of ``dtype``, from a model built on
    the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    size = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * size
    found = block_container(model)
    block = 0 if found is None else sum(p.numel() for p in found[1][0].parameters()) * size
    return weights, block, max(p.numel() for p in model.parameters()) * size


def held_bytes(recipe: Recipe, config) -> tuple[int, int]:
    """(the weights the model object holds, the largest tensor its save writes from them) in bytes, of the model
    as :func:`lowmem.models.load_model` returns it, built on fake tensors by the planner (:func:`fake_model`):
    a frozen 4/8-bit base's codes and constants, the fp32 norms and embeddings of peft's k-bit preparation,
    LoRA adapters, int8 payloads and scales. A LoRA model saves its adapters only (bound: its largest trained
    tensor)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_model(recipe.model, config)
        held = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in held_tensors(model)}
        saved = [t.untyped_storage().nbytes() for t in model.parameters() if t.requires_grad] \
            if recipe.model.lora is not None else list(held.values())
    return sum(held.values()), max(saved, default=0)


def host_phases(recipe: Recipe, config, step_plan, runtime: int, forward_plan=None) -> dict[str, int]:
    """Predicted host peak RSS (bytes) of each of :data:`PHASES`; ``step_plan``: the run's step plan on its
    device, ``forward_plan``: the no-grad forward's (used in memory on the CPU), ``runtime``: ``R``."""
    cpu, offload = step_plan.device == "cpu", recipe.offload.enabled
    weights, block, largest = weight_bytes(recipe, config)
    outside = weights - block * config.num_hidden_layers
    size = _weight_dtype(recipe).itemsize

    def fp32(nbytes: int) -> int:  # the same tensors in fp32: masters, initialisation draws
        return nbytes * 4 // size

    state = step_plan.totals.get("optimizer_states", 0)
    host = step_plan.host_parts
    if offload and host:  # first order: masters and states on the host tier, and the outside on a CPU device
        kept, built = host["host_masters"] + host["host_states"], host["host_masters"]
        part = 2 * max(fp32(block), state // max(1, config.num_hidden_layers))  # a master, or its state (bound)
    elif offload:  # ZO2: the blocks in host RAM up to the budget
        budget = recipe.offload.host_memory_budget_gb
        kept = weights if budget is None else min(weights, int(budget * 2**30))
        part, built = 2 * block, kept
    else:
        kept, part, built = 0, 0, 0
    # ZO2 on a GPU: the host also holds the NVMe tier's staging buffers (the plan's total; on a CPU they are in its
    # transfer buffers)
    staging = step_plan.totals.get("nvme_staging", 0) if offload and not host and not cpu else 0
    step = step_plan.peak_bytes if cpu else runtime + (step_plan.host_rss_bytes - step_plan.host_runtime_bytes
                                                      if host else kept + staging)
    streamed = runtime + outside + 2 * block + fp32(largest)
    if offload:
        resident = runtime + kept + (outside + step_plan.parts.get("transfer_buffers", 0) if cpu else staging)
        save = resident + part
        # first order: the masters stream through the NVMe stores' read and write buffers; ZO2: its step
        nvme = step_plan.totals.get("nvme_masters", 0) > 0
        evaluation = resident + nvme * (2 * recipe.offload.prefetch_depth + 3) * fp32(block) if host else step
        return {"build": streamed + built, "step": step, "eval": evaluation, "save": save}
    held, saved = held_bytes(recipe, config)
    resident = runtime + (held + state if cpu else 0)
    # int8 weights save dequantized: the blocks' fp32 weights all at once (lowmem.int8_weights)
    save = resident + (block * config.num_hidden_layers if recipe.model.dtype == "int8" else saved)
    evaluation = (forward_plan.peak_bytes + state) if cpu and forward_plan is not None else resident
    # the model in its dtype, built from a config (filled block by block) or read
    whole = max(streamed, runtime + weights + fp32(block)) if recipe.model.config is not None and size < 4 \
        else runtime + weights
    if recipe.model.quantize is None:  # then adapters, or int8 payloads in its place
        build = max(whole, runtime + held)
    else:  # built in memory: saved for the quantized load; then peft casts each 16-bit tensor to fp32
        written = whole + largest if recipe.model.config is not None or recipe.model.gguf_file else 0
        build = max(written, runtime + (held if cpu else 0) + largest)
    return {"build": build, "step": step, "eval": evaluation, "save": save}


def host_together(phases: dict[str, int], local: int, from_rank0: bool, holds_rank0: bool) -> dict[str, int]:
    """The host's peak RSS in each phase with ``local`` processes of a launch on it. Each builds the whole
    model and holds its own ``phases``; but when only rank 0 reads the weights (``from_rank0``: FSDP2,
    :func:`lowmem.steps.fsdp.loads_on_rank0`) every other process builds nothing and holds its shards, at most
    its step's peak, and only the host of rank 0 (``holds_rank0``) holds rank 0's phases besides."""
    if not from_rank0:
        return {k: local * v for k, v in phases.items()}
    others = (local - 1 if holds_rank0 else local) * phases["step"]
    return {k: others + (v if holds_rank0 else 0) for k, v in phases.items()}


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of host RAM now (psutil)."""
    vm = psutil.virtual_memory()
    return vm.available, vm.total


def format_phases(phases: dict[str, int]) -> str:
    return "  host peak RSS by phase: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in phases.items())


def host_refusal(phases: dict[str, int], available: int, total: int, processes: int = 1) -> str | None:
    """One line refusing a run whose predicted host peak (of ``processes`` on this host together) exceeds the
    available RAM, or None when it fits."""
    phase = max(phases, key=phases.get)
    if phases[phase] <= available:
        return None
    whose = f" ({processes} processes on this host)" if processes > 1 else ""
    fix = "start fewer processes on this host" if processes > 1 else \
        "lower offload.host_memory_budget_gb or set offload.nvme_dir"
    return (f"host memory: predicted peak RSS {phases[phase] / 2**30:.2f} GiB{whose} in the {phase} phase exceeds the "
            f"{available / 2**30:.2f} GiB available (of {total / 2**30:.2f} GiB RAM); {fix}; pass --force to run "
            f"anyway")
