"""Sharded data parallel with PyTorch FSDP2 (``train.distributed: fsdp2``): the model's parameters,
gradients and optimizer state split by rows over the processes of the launch.

FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP", VLDB, and the
per-parameter ``DTensor`` redesign of torch 2.4) is the engine: :func:`shard_model` applies it to
each decoder block, then to the root (the embeddings, final norm and ``lm_head`` form the root's
group), as torchtitan's ``parallelize`` does. A forward all-gathers one block's weights at a time;
backward reduce-scatters the gradients, averaged over the processes as DDP averages them, so N
processes with per-process batch b take the step one process takes with batch N b.

lowmem applies ``fully_shard`` itself inside the process group that ``accelerate launch
--multi_gpu`` or ``torchrun`` starts (accelerate's own FSDP launch starts independent processes on
a CPU); a run without a launcher gets a one-process group, so the same code path (and checkpoint
layout) serves one process. The optimizers step ``DTensor`` shards through
:mod:`lowmem.optim.dtensor`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lowmem.memory import tensor_bytes
from lowmem.optim.dtensor import is_sharded, replace_params
from lowmem.structure import block_container


def ensure_process_group(device: torch.device) -> bool:
    """Start a one-process group when no launcher started one; True if this call started it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer | None, mixed_precision=None) -> nn.Module:
    """``fully_shard`` each decoder block, then the root, and point ``optimizer`` (if any) at the sharded
    parameters (``fully_shard`` replaces each parameter by a ``DTensor`` one of the same name)."""
    from torch.distributed.fsdp import fully_shard

    found = block_container(model)
    if found is None:
        raise ValueError("train.distributed: fsdp2 shards per decoder block; the model has no nn.ModuleList of blocks")
    before = dict(model.named_parameters(remove_duplicate=False))
    kwargs = {} if mixed_precision is None else {"mp_policy": mixed_precision}
    for block in found[1]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if optimizer is None:
        return model
    after = dict(model.named_parameters(remove_duplicate=False))
    replace_params(optimizer, {before[name]: after[name] for name in before if after[name] is not before[name]})
    return model


def reshard(model: nn.Module) -> None:
    """Free every all-gathered weight of ``model`` (FSDP2 keeps the root group's after a forward), so
    that the next forward all-gathers the shards again, with whatever changed in them since."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def load_from_rank0(model: nn.Module, whole: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill every rank's shards of the sharded ``model`` from rank 0's weights (a collective). ``whole``: on
    rank 0 its ``state_dict()`` taken before sharding (the whole tensors, not copied), ``{}`` on the others,
    whose parameters are on ``meta`` (:func:`lowmem.models.load_model`'s ``on_meta``): they are allocated on
    ``device``, then rank 0 broadcasts one tensor at a time and each rank keeps its rows
    (``set_model_state_dict(..., broadcast_from_rank0=True)``); the buffers are broadcast last (the
    non-persistent ones, rotary tables, are in no state dict). So a host holds the whole model once, in
    rank 0, not once per process; the others hold their shards and one whole tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def unshard_to_plain(model: nn.Module) -> None:
    """On rank 0, replace every sharded parameter of ``model`` by a plain one holding the whole tensor in
    host memory, so that ``save_pretrained`` and ``state_dict`` see a plain model (rank 0 saves it). A
    collective: every rank all-gathers one tensor at a time (no device holds more than its shards and one
    whole tensor); the other ranks drop it, their parameters stay sharded. The model is not trained afterwards."""
    from torch.distributed.tensor import DTensor

    keep = dist.get_rank() == 0
    reshard(model)  # the sharded parameters registered again (the root keeps its all-gathered weights)
    plain: dict[int, nn.Parameter] = {}  # a tied weight is gathered once and stays tied
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in plain:
                    whole = p.full_tensor()
                    plain[id(p)] = nn.Parameter(whole.cpu(), requires_grad=p.requires_grad) if keep else p
                module._parameters[name] = plain[id(p)]


def _local_bytes(tensors) -> int:
    return sum(tensor_bytes(t.to_local() if is_sharded(t) else t) for t in tensors if torch.is_tensor(t))


def bytes_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Parameter and optimizer-state MiB held by each rank (its shards, and whatever it replicates),
    the largest over the ranks, and the state summed over the ranks (a collective). The root group
    keeps its all-gathered weights after a forward; they are resharded first, so the figures are the shards'."""
    reshard(model)
    mine = torch.tensor([_local_bytes(model.parameters()),
                         _local_bytes(v for state in optimizer.state.values() for v in state.values())],
                        dtype=torch.float64)
    most, total = mine.clone(), mine.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    dist.all_reduce(total)
    mib = 2.0 ** 20
    return {"parameter_mb_per_rank": round(most[0].item() / mib, 3),
            "optimizer_state_mb_per_rank": round(most[1].item() / mib, 3),
            "optimizer_state_mb": round(total[1].item() / mib, 3)}


def teardown(started_here: bool) -> None:
    """Wait for every rank, then end the group this process started (gloo aborts at exit otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        if started_here:
            dist.destroy_process_group()
