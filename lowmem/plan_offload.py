"""The memory plan of a first-order offloaded run (:mod:`lowmem.offload.firstorder`, Fuyou).

Traced, not guessed, where it can be: one training step of the same recipe on the same model
with **one** decoder block (offload off, all gradients kept, as the engine keeps the resident
ones until the end of backward) gives, on fake tensors, the resident weights, gradients and
optimizer state plus one block's weights, gradients and recompute activations and the
head's activations (logits). A fake optimizer step on the one-block model splits the state
bytes into the block's and the resident parameters'. The rest is the engine's fixed layout:

device  = trace(1 block) - state(block)                        # block states live on the host (fp32)
          + (slots - 1) * W_c + slots * W_32 [if compute != fp32]   # mover slots (+ fp32 staging)
          + (N - 1) * B*S*H*c                                   # kept block-boundary activations
host    = masters on the host tier + states on the host tier    # budget: masters first, then states
          + (depth + 1) * W_32                                  # gradient buffers of the CPU step
          + [a master on NVMe] (2 depth + 4) * W_32             # read/write buffers, a read master
          + [a state on NVMe] 2 * state(block)                  # the payload read, the one written
with ``slots = min(depth + 1, N)``, ``W_c``/``W_32`` a block's weights in the compute dtype /
fp32. On a CPU "device" both live in one process: peak RSS = runtime + device + host.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.dtypes import DTYPES
from lowmem.recipe import Recipe
from lowmem.step_trace import fake_model, trace_step


def _one_block(recipe: Recipe, config):
    from lowmem.planner import with_overrides

    one = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    rec = with_overrides(recipe, ["offload.enabled=false", "optim.layerwise=false", "optim.max_grad_norm=null"])
    return rec, one


def _state_split(recipe: Recipe, config) -> tuple[int, int, int]:
    """(one block's parameter count, its optimizer-state bytes, hidden size) after one fake step."""
    from types import SimpleNamespace

    from lowmem.build import build_optimizer
    from lowmem.optim.targets import block_container
    from lowmem.step_trace import _kernels, _LiveBytes

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, _kernels("cpu"):
        model = fake_model(recipe.model, config)
        optimizer, _, _ = build_optimizer(recipe, model, SimpleNamespace(num_processes=1))
        params = list({id(p): p for p in model.parameters()}.values())
        for p in params:
            p.grad = torch.zeros_like(p)
        with _LiveBytes(fake):  # reads a data-dependent scalar (.item()) as the trace does
            optimizer.step()
        block = list(block_container(model)[1][0].parameters())
        state = sum(v.numel() * v.element_size() for p in block for v in optimizer.state[p].values()
                    if isinstance(v, torch.Tensor))
        return sum(p.numel() for p in block), state, config.hidden_size


def _fits(count: int, each: int, budget: float | None) -> tuple[int, float | None]:
    """How many of ``count`` items of ``each`` bytes fit in ``budget`` (None: all); the budget left."""
    if budget is None:
        return count, None
    n = min(count, int(budget // each)) if each else count
    return n, budget - n * each


def offload_parts(recipe: Recipe, config, device: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(device parts, host parts, totals) of one step of a first-order offloaded run."""
    from lowmem.planner import with_overrides

    rec1, one = _one_block(recipe, config)
    parts, totals = trace_step(rec1, one, 1, False, device)
    numel, traced_state, hidden = _state_split(rec1, one)  # the block's state as the trace holds it
    masters = with_overrides(rec1, ["model.dtype=float32"])  # the host steps fp32 masters: fp32 state
    state = _state_split(masters, one)[1] if recipe.model.dtype != "float32" else traced_state
    n, off = config.num_hidden_layers, recipe.offload
    compute = DTYPES[recipe.model.dtype].itemsize
    w32 = numel * 4  # fp32 master (the packing's 512-byte alignment is negligible)
    slots = min(off.prefetch_depth + 1, n)
    device_parts = dict(parts)
    device_parts["optimizer_states"] = max(0, parts.get("optimizer_states", 0) - traced_state)
    device_parts["transfer_buffers"] = (slots - 1) * numel * compute + (slots * w32 if compute != 4 else 0)
    boundary = recipe.train.batch_size * recipe.train.seq_len * hidden * compute
    device_parts["activations"] = parts.get("activations", 0) + (n - 1) * boundary
    budget = None if off.host_memory_budget_gb is None else off.host_memory_budget_gb * 2**30
    host_masters, left = _fits(n, w32, budget)
    host_states, _ = _fits(n, state, left)
    host = {"host_masters": host_masters * w32, "host_states": host_states * state,
            "host_buffers": (off.prefetch_depth + 1) * w32}
    if host_masters < n:  # the store's read-ahead and write buffers, a master read for its step
        host["host_buffers"] += (2 * off.prefetch_depth + 3) * w32 + w32
    if host_states < n:   # a state payload read and the one written
        host["host_buffers"] += 2 * state
    totals = {"weights": totals["weights"] + (n - 1) * numel * compute, "gradients": totals["gradients"]
              + (n - 1) * numel * compute, "optimizer_states": device_parts["optimizer_states"] + n * state}
    return device_parts, host, totals
