"""The memory of a ZO2 step (Wang et al. 2025, arXiv 2503.12668): what the engine allocates beside the
traced in-memory zeroth-order step on the doubled batch (ZO2's dual forward), and where the blocks live.

The blocks' host copies take ``offload.host_dtype``'s bytes (:mod:`lowmem.offload.host_format`): the
training dtype's, a 16-bit type's, or int8 with one fp32 scale per 256 weights of each parameter,
``numel + 4 ceil(numel / 256)`` bytes. On the device: ``prefetch_depth + 2`` slots in the training dtype
(the dequantized blocks) and, when the host copy differs, as many staging buffers of its encoding. On a
CPU "device" the host is the device: the slots, staging buffers and host copies are all in the one RSS."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.dtypes import DTYPES
from lowmem.offload.hooks import model_units
from lowmem.offload.host_format import host_format
from lowmem.offload.store import nvme_staging_bytes
from lowmem.offload.tiers import Placement
from lowmem.offload.transfer import Packed, device_buffer_bytes
from lowmem.planner.trace import fake_model
from lowmem.recipe import Recipe


def zo2_device_buffers(recipe: Recipe, config) -> dict[str, int]:
    """What the ZO2 engine allocates besides the resident weights, from the model's shapes alone:
    ``slots`` and ``staging`` (:func:`lowmem.offload.transfer.device_buffer_bytes`, the engine's own
    sizes), the copy of each tied resident weight held during the dual forward (``tied_copy``,
    :class:`lowmem.offload.resident.ResidentPerturber`), the blocks' weight bytes in the training dtype
    (``in_blocks``) and their host copies held in RAM (``host_blocks``: placed by the engine's own rule,
    :class:`lowmem.offload.tiers.Placement`; beyond ``offload.host_memory_budget_gb`` they are NVMe files,
    ``nvme_blocks``, read and written through host staging buffers: ``nvme_staging``, :func:`lowmem.offload.store.nvme_staging_bytes`)."""
    compute = DTYPES[recipe.model.dtype]
    host = recipe.offload.host_dtype
    with FakeTensorMode(allow_non_fake_inputs=True):
        blocks, units = model_units(fake_model(recipe.model, config))
        fmt = host_format(None if host is None else getattr(torch, host), compute,
                          [Packed.of(b, compute) for b in blocks])
        owners: dict[int, list] = {}
        for _, module in units:
            for p in module.parameters():
                owners.setdefault(id(p), []).append(p)
        tied = sum(ps[0].numel() * ps[0].element_size() for ps in owners.values()
                   if len(ps) > 1 and ps[0].requires_grad)
        in_blocks = sum(p.numel() * p.element_size() for p in blocks.parameters())
    sizes = [fmt.numel(i) * fmt.store_dtype.itemsize for i in range(len(fmt.packed))]
    budget = recipe.offload.host_memory_budget_gb
    placed = Placement(None if budget is None else budget * 2**30, recipe.offload.nvme_dir).place_all(sizes, "blocks")
    host_blocks = sum(n for n, tier in zip(sizes, placed) if tier.in_ram)  # the rest are NVMe files
    return {**device_buffer_bytes(fmt, recipe.offload.prefetch_depth), "tied_copy": tied,
            "in_blocks": in_blocks, "host_blocks": host_blocks, "nvme_blocks": sum(sizes) - host_blocks,
            "nvme_staging": nvme_staging_bytes(sizes, placed, recipe.offload.prefetch_depth)}


def zo2_parts(recipe: Recipe, config, parts: dict[str, int], totals: dict[str, int],
              device: str = "cuda") -> tuple[dict[str, int], dict[str, int]]:
    """(parts, totals) of a ZO2 step. Parts: resident weights (on a CPU, with the blocks' host copies), the
    engine's device buffers (on a CPU, with the NVMe tier's staging buffers), the tied-weight copy (with the
    step temporaries) and the dual-forward activations; totals: with ``offload.nvme_dir``, the NVMe tier's
    files (``nvme_files``) and its host staging buffers (``nvme_staging``: on a GPU in host RAM, beside the plan's
    device parts; :mod:`lowmem.planner.phases` adds them to the host's phases)."""
    buffers = zo2_device_buffers(recipe, config)
    weights = parts["weights"] - buffers["in_blocks"] + (buffers["host_blocks"] if device == "cpu" else 0)
    parts = {**parts, "weights": weights,
             "step_temporaries": parts.get("step_temporaries", 0) + buffers["tied_copy"],
             "transfer_buffers": buffers["slots"] + buffers["staging"]
             + (buffers["nvme_staging"] if device == "cpu" else 0)}
    if recipe.offload.nvme_dir is not None:
        totals = {**totals, "nvme_files": buffers["nvme_blocks"], "nvme_staging": buffers["nvme_staging"]}
    return parts, totals
