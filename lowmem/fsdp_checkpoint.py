"""Sharded checkpoints of an FSDP2 run through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its shards of the weights and of the optimizer state into one staging directory
(:func:`save_sharded`); rank 0 then moves it into the atomic checkpoint of :mod:`lowmem.checkpoint`
as ``sharded/`` (every file checksummed in the manifest, the manifest written last), beside the
scheduler, RNG states and step. Each optimizer tensor is saved as one of four layouts (``meta``):

* ``dtensor``: already a ``DTensor`` (``torch.optim.AdamW``'s moments under FSDP2);
* ``shard``: a plain tensor of the local shard's shape kept by an optimizer that steps the shard
  (:mod:`lowmem.optim.dtensor`): saved as the ``DTensor`` it is a shard of;
* ``replicated``: the same on every rank (step counters; the state of a whole-matrix rule, which
  every rank computes alike): saved once;
* ``rank``: laid out on this rank's shard with no global meaning (the 8-bit codes and block
  absmax of a shard): saved per rank.

DCP reshards the first three on load, so a checkpoint resumes on another number of processes
with the same numbers, cut differently (the weights, fp32 state, a zeroth-order optimizer's shard
momentum and seed generator; tested saved on 2 and loaded on 1 and on 4, where a save right after
the load writes back the same tensors bit for bit). The ``rank`` tensors are 8-bit codes (one per
element) and block absmax (one per ``blocksize`` elements), cut on each shard
(:mod:`lowmem.optim.dtensor`). When every non-empty shard starts on a block boundary, in the saved
layout and in this run's (row lengths that are multiples of the block size: most LLM matrices),
the shards' blocks are the one-process blocks: the saved ranks' codes and absmax put end to end are
the one-process state, and each rank takes its slice of them (:func:`_redealt`), exactly. Otherwise
the state depends on the layout, and another number of processes is refused with one line.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lowmem.state_encoding import CheckpointError, optimizer_state_from_tensors, optimizer_state_to_tensors
from lowmem.optim.dtensor import flat_start, is_sharded


def staging_dir(run_dir: Path) -> Path:
    """A fresh ``.tmp-sharded-*`` directory under ``run_dir/checkpoints`` (rank 0 names it, all ranks get it);
    a kill leaves it as a ``.tmp-`` directory, which the next save removes."""
    name = [f".tmp-sharded-{uuid.uuid4().hex[:12]}"]
    dist.broadcast_object_list(name, src=0)
    path = Path(run_dir) / "checkpoints" / name[0]
    if dist.get_rank() == 0:
        path.mkdir(parents=True)
    dist.barrier()
    return path


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _steps_shard(optimizer, group_of: dict[int, dict], p) -> bool:
    """Whether ``optimizer`` steps ``p``'s local shard (state laid out on it) rather than the whole matrix."""
    elementwise = getattr(optimizer, "elementwise", None)
    return is_sharded(p) and (elementwise is None or elementwise(group_of[id(p)]))


def _as_dtensor(local: torch.Tensor, p):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def _layout(optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """``{name: [kind, dtype, shape]}`` of the optimizer tensors (module doc; shape global unless ``rank``)."""
    from torch.distributed.tensor import DTensor

    params = _params(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    layout = {}
    for name, t in tensors.items():
        p = params[int(name.split(".")[1])] if name.startswith("state.") else None
        if isinstance(t, DTensor):
            kind = "dtensor"
        elif p is not None and t.dim() > 0 and _steps_shard(optimizer, group_of, p):
            kind = "shard" if t.shape == p.to_local().shape else "rank"
        else:
            kind = "replicated"
        layout[name] = [kind, str(t.dtype).removeprefix("torch."), list(t.shape)]
    return layout


def _dcp_name(name: str, kind: str, rank: int) -> str:
    return f"optim.rank{rank}.{name}" if kind == "rank" else f"optim.{name}"


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> dict:
    """Write ``model``'s trainable weights and ``optimizer``'s state into ``directory`` (a collective);
    return the JSON-able meta that :func:`load_sharded` needs (every rank's layout)."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
    layout = _layout(optimizer, tensors)
    params = _params(optimizer)
    state = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for name, t in tensors.items():
        kind = layout[name][0]
        state[_dcp_name(name, kind, rank)] = _as_dtensor(t, params[int(name.split(".")[1])]) if kind == "shard" else t
    dcp.save(state, checkpoint_id=str(directory))
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"optimizer": json.dumps(opt_meta), "layout": json.dumps(layout)})
    return {"processes": len(ranks), "ranks": ranks, "blocksize": getattr(optimizer, "state_blocksize", None)}


def _starts_on_blocks(sizes: list[int], blocksize: int) -> bool:
    """Whether each non-empty shard of ``sizes`` elements, end to end in rank order, starts on a block."""
    start = 0
    for n in sizes:
        if n and start % blocksize:
            return False
        start += n
    return True


def _layout_sizes(p, world: int) -> list[int]:
    """Each rank's element count of ``p`` sharded by rows over ``world`` ranks (``torch.chunk``'s split, as
    FSDP2's ``Shard(0)``): the same on every rank, so every rank refuses alike."""
    rows = p.shape[0]
    step, per_row = -(-rows // world), p.numel() // rows if rows else 0
    return [(min(rows, (r + 1) * step) - min(rows, r * step)) * per_row for r in range(world)]


def _saved_blocks(layouts: list[dict], params: list, meta: dict, directory: Path, world: int) -> dict[str, list]:
    """For a resume on another number of processes: ``{name: [its shape on saved rank r, ...]}`` of the
    ``rank`` tensors, when their blocks are the one-process blocks in both layouts (module doc); else
    a one-line ``CheckpointError``."""
    processes, blocksize = meta["processes"], meta.get("blocksize")
    refusal = f"{directory}: 8-bit optimizer state laid out on {processes} shards; resume with {processes} processes"
    names = [sorted(n for n, (kind, _, _) in layout.items() if kind == "rank") for layout in layouts]
    if not names[0]:
        return {}
    if blocksize is None or any(n != names[0] for n in names):
        raise CheckpointError(refusal)
    for name in names[0]:
        codes = name if name.endswith("_codes") else name.removesuffix("_absmax") + "_codes"
        p = params[int(name.split(".")[1])]
        sizes = [math.prod(layout[codes][2]) if codes in layout else -1 for layout in layouts]
        if not name.endswith(("_codes", "_absmax")) or -1 in sizes:
            raise CheckpointError(refusal)
        if not (_starts_on_blocks(sizes, blocksize) and _starts_on_blocks(_layout_sizes(p, world), blocksize)):
            raise CheckpointError(f"{refusal} (a shard starts inside a block of {blocksize} elements: "
                                  f"the state depends on the layout)")
    return {name: [layout[name][2] for layout in layouts] for name in names[0]}


def _redealt(name: str, pieces: list[torch.Tensor], p, blocksize: int) -> torch.Tensor:
    """This rank's slice of the one-process codes or block absmax that ``pieces`` (the saved ranks') make."""
    whole, start, n = torch.cat([t.reshape(-1) for t in pieces]), flat_start(p), p.to_local().numel()
    if name.endswith("_codes"):
        return whole[start:start + n].clone()
    return whole[start // blocksize:-(-(start + n) // blocksize)].clone()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, directory: Path) -> None:
    """Read what :func:`save_sharded` wrote into ``model`` and ``optimizer`` (a collective), resharded
    to this run's number of processes where the layouts allow it (module doc)."""
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    same = meta["processes"] == world
    layouts, params = [json.loads(r["layout"]) for r in meta["ranks"]], _params(optimizer)
    blocks = {} if same else _saved_blocks(layouts, params, meta, directory, world)  # 8-bit state re-dealt
    mine = meta["ranks"][rank if same else 0]
    layout = json.loads(mine["layout"])
    state = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for name, (kind, dtype, shape) in layout.items():
        dtype = getattr(torch, dtype)
        if name in blocks:  # every saved rank's piece
            state.update({_dcp_name(name, kind, r): torch.empty(s, dtype=dtype) for r, s in enumerate(blocks[name])})
        elif kind in ("shard", "dtensor"):
            p = params[int(name.split(".")[1])]
            state[_dcp_name(name, kind, rank)] = _as_dtensor(torch.empty_like(p.to_local(), dtype=dtype), p)
        else:
            state[_dcp_name(name, kind, rank)] = torch.empty(shape, dtype=dtype)
    dcp.load(state, checkpoint_id=str(directory))
    tensors = {}
    for name, (kind, _, _) in layout.items():
        if name in blocks:
            pieces = [state[_dcp_name(name, kind, r)] for r in range(len(blocks[name]))]
            tensors[name] = _redealt(name, pieces, params[int(name.split(".")[1])], meta["blocksize"])
            continue
        t = state[_dcp_name(name, kind, rank)]
        tensors[name] = t.to_local() if kind == "shard" else t
    optimizer.load_state_dict(optimizer_state_from_tensors(tensors, json.loads(mine["optimizer"])))
