"""Step one parameter alone, and check a gradient without a full-size temporary.

The pieces shared by every update made one parameter at a time: in-memory layer-wise updates
(:mod:`lowmem.steps.layerwise`, GaLore, Zhao et al. 2024, §4.3) and the first-order offload
engine, which steps each block's parameters on the host (:mod:`lowmem.offload.fo_host`, Fuyou,
Liao et al. 2024).
"""

from __future__ import annotations

import torch


def step_one(optimizer: torch.optim.Optimizer, group_index: int, p: torch.Tensor) -> None:
    """Run ``optimizer`` on ``p`` alone, with the current hyper-parameters (and the name) it has in
    group ``group_index``, then free its gradient: one layer-wise update (also used by the
    first-order offload engine, which steps each block's parameters on the host)."""
    groups = optimizer.param_groups
    group = groups[group_index]
    single = {**group, "params": [p]}
    if group.get("param_names"):  # the parameter's own name (8-bit state choice, error messages)
        single["param_names"] = [group["param_names"][next(i for i, q in enumerate(group["params"]) if q is p)]]
    optimizer.param_groups = [single]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups
    p.grad = None


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, from its smallest and largest element (``torch.aminmax``,
    which propagates NaN): exact, and it allocates nothing the size of ``t``. ``torch.isfinite(t).all()``
    allocates 1.25x the bytes of an fp32 ``t`` (135 MiB for SmolLM2's embedding gradient), and a bf16/fp16
    ``t.sum(dtype=torch.float32)`` copies ``t`` to fp32 inside the CPU kernel, where the planner's trace does not
    see it: 128 MiB on a 65536 x 512 bf16 embedding gradient, the layer-wise step's measured peak above its
    plan."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


# torch's optimizers whose update of an element reads that element, its gradient and its own state alone
# (state tensors shaped as the parameter, and a 0-d step count): Adam, AdamW, SGD with momentum
_BY_ROWS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def steps_by_rows(optimizer: torch.optim.Optimizer) -> bool:
    """Whether stepping each chunk of a parameter's rows alone (with its rows of the state) equals stepping
    the parameter whole, bit for bit: the elementwise rules of :data:`_BY_ROWS` (the first-order offload
    engine steps its large offloaded parameters so, :mod:`lowmem.offload.fo_resident`)."""
    return isinstance(optimizer, _BY_ROWS)
