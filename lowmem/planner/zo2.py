"""The device memory of a ZO2 step (Wang et al. 2025, arXiv 2503.12668): what the engine allocates
beside the traced in-memory zeroth-order step on the doubled batch (ZO2's dual forward)."""

from __future__ import annotations

from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.dtypes import DTYPES
from lowmem.offload.hooks import model_units
from lowmem.offload.transfer import Packed, device_buffer_bytes
from lowmem.planner.trace import fake_model
from lowmem.recipe import Recipe


def zo2_device_buffers(recipe: Recipe, config) -> dict[str, int]:
    """What the ZO2 engine allocates on the device besides the resident weights, from the model's
    shapes alone: ``prefetch_depth + 2`` block slots in the training dtype and as many staging buffers
    in ``offload.host_dtype`` when it differs (:func:`lowmem.offload.transfer.device_buffer_bytes`,
    the engine's own sizes), and the copy of each tied resident weight held during the dual forward
    (:class:`lowmem.offload.resident.ResidentPerturber`). Also ``in_blocks``: the blocks' weight bytes."""
    compute = DTYPES[recipe.model.dtype]
    host = DTYPES[recipe.offload.host_dtype or recipe.model.dtype]
    with FakeTensorMode(allow_non_fake_inputs=True):
        blocks, units = model_units(fake_model(recipe.model, config))
        numels = [Packed.of(b, compute).numel for b in blocks]
        owners: dict[int, list] = {}
        for _, module in units:
            for p in module.parameters():
                owners.setdefault(id(p), []).append(p)
        tied = sum(ps[0].numel() * ps[0].element_size() for ps in owners.values()
                   if len(ps) > 1 and ps[0].requires_grad)
        in_blocks = sum(p.numel() * p.element_size() for p in blocks.parameters())
    return {**device_buffer_bytes(numels, compute, host, recipe.offload.prefetch_depth), "tied_copy": tied,
            "in_blocks": in_blocks}


def zo2_parts(recipe: Recipe, config, parts: dict[str, int]) -> dict[str, int]:
    """Device parts of a ZO2 step: resident weights, the engine's device buffers, the tied-weight
    copy (with the step temporaries) and the dual-forward activations."""
    buffers = zo2_device_buffers(recipe, config)
    return {**parts, "weights": parts["weights"] - buffers["in_blocks"],
            "step_temporaries": parts.get("step_temporaries", 0) + buffers["tied_copy"],
            "transfer_buffers": buffers["slots"] + buffers["staging"]}
