"""Processes of the FSDP2 exchange test (started by torchrun): the bytes each optimizer's step sends.

``python fsdp_exchange_worker.py RUNS.json`` builds each ``[recipe path, [override, ...]]`` sharded
over the launch (the trainer's step object under accelerate's process group), takes 3 steps and
counts, during each ``optimizer.step`` only, the payload of every collective the step issues
(PyTorch's functional collectives, what ``DTensor`` and :mod:`lowmem.optim.dtensor` use, seen by a
dispatch mode): an all-gather's whole output, an all-reduce's tensor; and whether the ranks then hold the
same replicated optimizer state. Rank 0 prints one JSON object:
per run, the bytes of each step and, for the test's formulas, each parameter group's shapes, element
size, whether each parameter is stepped whole and whether its gradient is said to be gathered (the FSDP2 plan's
``gathers_gradient``), its Sinkhorn rounds, projection rank and kind, FRUGAL's
density and subspace kind, SWAN's centring.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.build import build_step, sample_batch
from lowmem.models import load_model
from lowmem.recipe import load_recipe


class CollectiveBytes(TorchDispatchMode):
    """Sums the payload bytes of the functional collectives dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name.startswith("_c10d_functional::all_gather"):
            self.bytes += out.numel() * out.element_size()
        elif name.startswith("_c10d_functional::all_reduce") or name.startswith("_c10d_functional::reduce_scatter"):
            self.bytes += args[0].numel() * args[0].element_size()
        return out


def replicated_state_agrees(optimizer) -> bool:
    """Whether the ranks hold the same state for the groups whose state is replicated (not stepped elementwise):
    the exchanges keep it one process's. (A rank's own update of an elementwise Adam over FRUGAL's chosen
    entries, or over ``G v^T``, needs only its rows; the all-reduce is what makes the saved state whole.)"""
    elementwise = getattr(optimizer, "elementwise", lambda group: True)
    mine = [v.double().flatten() for group in optimizer.param_groups if not elementwise(group)
            for p in group["params"] for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    flat = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.float64)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return all(torch.equal(every[0], t) for t in every)


def measure(recipe) -> dict:
    from accelerate import Accelerator

    model = load_model(recipe.model)
    stepper = build_step(recipe, model, Accelerator())
    optimizer = stepper.inner_optimizer
    counted, inner_step = [], optimizer.step

    def counting_step(*args, **kwargs):
        with CollectiveBytes() as mode:
            result = inner_step(*args, **kwargs)
        counted.append(mode.bytes)
        return result

    optimizer.step = counting_step
    batch = sample_batch(recipe, model.config.vocab_size)
    for _ in range(3):
        stepper.step(lambda micro: batch)
    rows = getattr(optimizer, "steps_rows", lambda group, p: True)
    gathers = getattr(optimizer, "gathers_gradient", lambda group, p: False)
    groups = [{"shapes": [list(p.shape) for p in group["params"]], "element_size": group["params"][0].element_size(),
               "whole": [not rows(group, p) for p in group["params"]],
               "gathers": [gathers(group, p) for p in group["params"]],
               **{key: group.get(key) for key in ("sinkhorn_iters", "rank", "proj", "density", "proj_type", "center")}}
              for group in optimizer.param_groups if group["params"]]
    return {"steps": counted, "groups": groups, "replicated_state_agrees": replicated_state_agrees(optimizer)}


def main(argv: list[str]) -> None:
    found = {}
    for name, recipe, overrides in json.loads(open(argv[0]).read()):
        found[name] = measure(load_recipe(recipe, overrides))
    if dist.get_rank() == 0:
        print(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
