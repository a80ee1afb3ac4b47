"""The memory plan of a first-order offloaded run (:mod:`lowmem.offload.firstorder`, Fuyou).

Traced, not guessed, where it can be: one training step of the same recipe on the same model
with **one** decoder block (offload off, all gradients kept, as the engine keeps the resident
ones until the end of backward) gives, on fake tensors, the resident weights, gradients and
optimizer state plus one block's weights, gradients and recompute activations and the
head's activations (logits), at two peaks (:func:`lowmem.planner.trace.trace_phases`): during the
forward/backward, and during the optimizer step after it. A fake optimizer step on the one-block
model splits the state bytes into the block's and the resident parameters'. The rest is the
engine's fixed layout, added to the phase it belongs to:

device  = trace(1 block, phase) with the states of the resident parameters E does not move
          + (slots - 1) * W_c + slots * W_32 [if compute != fp32]   # mover slots (+ fp32 staging)
          + [backward] (N - 1 - swapped) * B*S*H*c              # kept block-boundary activations
host    = masters on the host tier + states on the host tier    # budget: masters first, then states
          + masters of E's chunks and states of E within the budget  # offloaded embeddings (in placement order)
          + [grad_accum > 1] N * W_32                           # each block's gradient sum
          + buffers(phase)
buffers(backward) = (depth + 1) * W_32                          # gradient buffers of the CPU step
          + swapped * B*S*H*c                                   # swapped block-boundary activations
          + [a master on NVMe] (2 depth + 4) * W_32             # read/write buffers, a read master
          + [a state on NVMe] 2 * state(block)                  # the payload read, the one written
buffers(step) = max over E's row chunks C of: C_32 [the gradient's fp32 copy, unless it is the fp32 CPU
          gradient itself] + [its master on NVMe] C_32 + [its state on NVMe] 2 * state(C), else state(C)
          [a first step's fresh chunk state]                    # E's step, one chunk at a time
and the step phase's traced optimizer temporaries scaled from E's largest parameter (traced whole, in
the compute dtype) to its largest chunk in fp32. E is stepped in row chunks of at most a block's
elements where the optimizer allows it (:func:`lowmem.optim.step_one.steps_by_rows`), else whole
(:mod:`lowmem.offload.fo_resident`).
with ``slots = min(depth + 1, N)``, ``W_c``/``W_32`` a block's weights in the compute dtype /
fp32, ``E`` the parameters outside the blocks that ``offload.offload_embeddings`` moves (their
state read from the same fake step), ``swapped`` the boundary activations
``offload.swap_activations: on`` swaps (``auto`` decides after a profile step that swaps none, so
the plan keeps them). On a CPU "device" both live in one process: peak RSS = runtime + device +
host at the larger phase. On a GPU the device parts are those of the phase with the larger device
total, the host buffers the larger of the two.
"""

from __future__ import annotations

import torch

from lowmem.dtypes import DTYPES
from lowmem.offload.fo_resident import row_chunks
from lowmem.offload.tiers import Placement
from lowmem.optim.step_one import steps_by_rows
from lowmem.planner.trace import fake_optimizer_step, trace_phases
from lowmem.recipe import Recipe, with_overrides
from lowmem.structure import block_container


def _one_block(recipe: Recipe, config):
    one = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    rec = with_overrides(recipe, ["offload.enabled=false", "optim.layerwise=false", "optim.max_grad_norm=null"])
    return rec, one


def _state_split(recipe: Recipe, config) -> tuple[int, int, int, list[tuple[int, int, torch.Size]], bool]:
    """(one block's parameter count, its optimizer-state bytes, hidden size, [(numel, state bytes, shape)] of
    each parameter outside the blocks, whether the optimizer steps by rows) after one fake step."""
    model, optimizer = fake_optimizer_step(recipe, config)
    params = list({id(p): p for p in model.parameters()}.values())

    def state_of(ps):
        return sum(v.numel() * v.element_size() for p in ps for v in optimizer.state[p].values()
                   if isinstance(v, torch.Tensor))

    block = list(block_container(model)[1][0].parameters())
    outside = [p for p in params if all(p is not q for q in block)]
    return (sum(p.numel() for p in block), state_of(block), config.hidden_size,
            [(p.numel(), state_of([p]), p.shape) for p in outside], steps_by_rows(optimizer))


def _chunk_numel(shape: torch.Size, rows: slice) -> int:
    return (rows.stop - rows.start) * max(1, shape[1:].numel()) if len(shape) else 1


def _placed(n: int, w32: int, state: int, moved: list, chunk: int | None, budget: float | None):
    """The engine's placement (:mod:`lowmem.offload.tiers`, in its order: the blocks' masters, E's master
    chunks, the blocks' states, E's states): (host bytes of the masters, host bytes of the states, the
    blocks' masters on NVMe, the blocks' states on NVMe, [(E's chunk elements, master in RAM, state in RAM, state bytes per element)])."""
    place = Placement(budget, "nvme")
    host_masters = sum(place.place(w32).in_ram for _ in range(n))
    chunks = [[_chunk_numel(shape, r) for r in row_chunks(shape, chunk)] for _, _, shape in moved]
    master_in = [[place.place(4 * c).in_ram for c in cs] for cs in chunks]
    host_states = sum(place.place(state).in_ram for _ in range(n))
    state_in = [place.place(s).in_ram for _, s, _ in moved]
    masters = host_masters * w32 + sum(4 * c for cs, ins in zip(chunks, master_in) for c, i in zip(cs, ins) if i)
    states = host_states * state + sum(s for (_, s, _), i in zip(moved, state_in) if i)
    items = [(c, m_in, state_in[j], moved[j][1] / moved[j][0])
             for j, (cs, ins) in enumerate(zip(chunks, master_in)) for c, m_in in zip(cs, ins)]
    return masters, states, host_masters < n, host_states < n, items


def _moved_step(items: list, copy_grad: bool) -> tuple[int, int]:
    """(host buffers of E's step, its largest chunk's elements): per chunk its gradient's fp32 copy, its master
    read from NVMe, its state read and written (NVMe) or a first step's fresh chunk state (host)."""
    after = max((4 * c * copy_grad + 4 * c * (not m_in) + int(c * per) * (1 if s_in else 2)
                 for c, m_in, s_in, per in items), default=0)
    return after, max((c for c, *_ in items), default=0)


def offload_parts(recipe: Recipe, config, device: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(device parts, host parts, totals) of one step of a first-order offloaded run."""
    rec1, one = _one_block(recipe, config)
    phases, totals = trace_phases(rec1, one, device)
    numel, traced_state, hidden, outside, by_rows = _state_split(rec1, one)  # the states as the trace holds them
    _, state, _, outside32, _ = (_state_split(with_overrides(rec1, ["model.dtype=float32"]), one)
                                 if recipe.model.dtype != "float32" else (numel, traced_state, hidden, outside, by_rows))
    mode = recipe.offload.offload_embeddings  # the parameters outside the blocks that follow their placement
    which = [mode == "on" or (mode == "auto" and count > numel) for count, *_ in outside]
    traced_moved = sum(s for (_, s, _), m in zip(outside, which) if m)  # their state as the trace holds it
    moved = [item for item, m in zip(outside32, which) if m]  # the host steps fp32 masters: fp32 state
    n, off = config.num_hidden_layers, recipe.offload
    compute = DTYPES[recipe.model.dtype].itemsize
    w32 = numel * 4  # fp32 master (the packing's 512-byte alignment is negligible)
    slots = min(off.prefetch_depth + 1, n)
    boundary = recipe.train.batch_size * recipe.train.seq_len * hidden * compute
    swapped = n - 1 if off.swap_activations == "on" else 0
    budget = None if off.host_memory_budget_gb is None else off.host_memory_budget_gb * 2**30
    host_masters, host_states, nvme_masters, nvme_states, items = _placed(n, w32, state, moved, numel if by_rows else None, budget)
    # after the backward, when the block buffers are gone: E stepped chunk by chunk
    after, chunk = _moved_step(items, copy_grad=compute != 4 or device != "cpu")
    # the traced step's temporaries: E's largest parameter in the compute dtype -> its largest chunk in fp32
    temporaries = 4 * chunk / (max((c for c, *_ in outside), default=1) * compute) if moved else 1.0
    backward = (off.prefetch_depth + 1) * w32 + swapped * boundary  # host buffers during the backward
    if nvme_masters:  # the store's read-ahead and write buffers, a master read for its step
        backward += (2 * off.prefetch_depth + 3) * w32 + w32
    if nvme_states:   # a state payload read and the one written
        backward += 2 * state
    resident_states = max(0, totals["optimizer_states"] - traced_state - traced_moved)
    candidates = []
    for phase, buffers in (("backward", backward), ("step", after)):
        if phase not in phases:
            continue
        parts = {**phases[phase], "optimizer_states": resident_states,
                 "transfer_buffers": (slots - 1) * numel * compute + (slots * w32 if compute != 4 else 0)}
        if phase == "backward":  # the block-boundary activations kept for it
            parts["activations"] += (n - 1 - swapped) * boundary
        else:
            parts["step_temporaries"] = int(parts["step_temporaries"] * temporaries)
        candidates.append((sum(parts.values()) + (buffers if device == "cpu" else 0), parts, buffers))
    _, device_parts, buffers = max(candidates, key=lambda c: c[0])
    if device != "cpu":  # the host's peak need not fall in the device's peak phase
        buffers = max(backward, after)
    host = {"host_masters": host_masters, "host_states": host_states, "host_buffers": buffers + (n * w32 if recipe.train.grad_accum > 1 else 0)}
    moved_states = sum(s for _, s, _ in moved)
    totals = {"weights": totals["weights"] + (n - 1) * numel * compute, "gradients": totals["gradients"]
              + (n - 1) * numel * compute, "optimizer_states": resident_states + n * state + moved_states}
    if off.nvme_dir is not None:  # what the placement leaves out of the host budget: NVMe files
        masters = n * w32 + sum(4 * c for c, *_ in items)
        totals["nvme_files"] = masters + n * state + moved_states - host_masters - host_states
        totals["nvme_masters"] = masters - host_masters  # read through the stores' NVMe buffers
    return device_parts, host, totals
