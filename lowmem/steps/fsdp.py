"""The FSDP2 step (``train.distributed: fsdp2``, :mod:`lowmem.fsdp`): a first-order step on a model
sharded by ``fully_shard``, equal to the one-process step on the whole batch.

What differs from :class:`~lowmem.steps.first_order.FirstOrderStep` (DDP through accelerate):
the model is sharded here, not by ``accelerator.prepare``; the gradient norm is the norm of the
whole ``DTensor`` gradients (each rank's shard norms all-reduced by ``clip_grad_norm_``);
gradient accumulation reduce-scatters every micro-batch (shards accumulate; nothing whole is held);
``close`` all-gathers the weights back into a plain model for ``save_pretrained``; checkpoints are
sharded (:mod:`lowmem.fsdp_checkpoint`).

Refused with one line (:meth:`FSDP2Step.check`): combinations that cannot work yet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem.checkpoint import SHARDED, latest_checkpoint
from lowmem.fsdp import (bytes_per_rank, ensure_process_group, load_from_rank0, reshard, shard_model, teardown,
                         unshard_to_plain)
from lowmem.fsdp_checkpoint import load_sharded, save_sharded, staging_dir
from lowmem.steps.base import OneProcess
from lowmem.steps.first_order import FirstOrderStep


def loads_on_rank0(recipe, processes: int) -> bool:
    """Whether only rank 0 reads the weights of ``recipe``'s run on ``processes`` (the others build the
    model on ``meta`` and get their shards from rank 0 in :meth:`FSDP2Step.setup`): under FSDP2 on several
    processes. The same answer on every rank: every rank issues the collectives or none does."""
    return recipe.train.distributed == "fsdp2" and processes > 1


class FSDP2Step(FirstOrderStep):
    name = "fsdp2"
    memory_plan = "fsdp2"  # one rank's shards and gathers (lowmem.planner.fsdp)

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return recipe.train.distributed == "fsdp2" and not zeroth_order

    @classmethod
    def check(cls, recipe) -> None:
        """One-line ``ValueError`` for what FSDP2 cannot run here (README, "Sharded data parallel")."""
        where = "train.distributed: fsdp2"
        if recipe.offload.enabled:
            raise ValueError(f"{where}: the offload engines (offload.enabled) hold the blocks off the device "
                             f"themselves; use one or the other")
        if recipe.optim.layerwise:
            raise ValueError(f"{where}: optim.layerwise updates inside backward, before FSDP2 has reduced "
                             f"the gradient shard; set optim.layerwise: false")
        if recipe.model.quantize is not None:
            raise ValueError(f"{where}: a quantized base (model.quantize) is not sharded here (bitsandbytes' packed "
                             f"weights); use train.distributed: ddp, each process holding the quantized base")
        if recipe.model.dtype == "int8":
            raise ValueError(f"{where}: int8 weights (model.dtype: int8) are not sharded here; they train in "
                             f"one process, or choose a float model.dtype")
        if recipe.train.mixed_precision == "fp16":
            raise ValueError(f"{where}: fp16 needs a loss scaler over sharded gradients; use bf16")

    def setup(self, model, optimizer):
        acc = self.accelerator
        self.started_group = False
        if isinstance(acc, OneProcess):  # the planner's trace and the measurement: the whole model on
            return super().setup(model, optimizer)  # one process, an upper bound of a rank's peak
        self.started_group = ensure_process_group(acc.device)
        from_rank0 = loads_on_rank0(self.recipe, acc.num_processes)
        whole = model.state_dict() if from_rank0 and acc.is_main_process else {}  # references, before sharding
        # no model.to(device) first: fully_shard moves each group's states to the mesh's device (the current
        # GPU) as it shards it, so a GPU holds one whole block at a time during setup, never the whole model
        model = shard_model(model, optimizer)
        if from_rank0:
            load_from_rank0(model, whole, acc.device)
        return model, optimizer

    def step(self, micro_batch):
        """The first-order step; the loss returned is the mean over all ranks' micro-batches (the
        loss of the global batch, as one process with ``N`` times the batch logs it)."""
        loss, norm = super().step(micro_batch)
        if isinstance(self.accelerator, OneProcess):
            return loss, norm
        mean = self.accelerator.reduce(torch.tensor(loss, dtype=torch.float64, device=self.accelerator.device), "mean")
        return float(mean), norm

    def clip(self, max_norm: float) -> torch.Tensor:
        if isinstance(self.accelerator, OneProcess):
            return super().clip(max_norm)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def summary(self) -> dict:
        return bytes_per_rank(self.model, self.inner_optimizer)

    # ------------------------------------------------------------ checkpoints (lowmem.fsdp_checkpoint)
    def save_kwargs(self) -> dict:
        """Every rank writes its shards now (a collective); rank 0's checkpoint moves them in."""
        reshard(self.model)  # an evaluation leaves the root group's whole weights registered: save the shards
        staging = staging_dir(Path(self.recipe.output.dir))
        meta = save_sharded(self.model, self.inner_optimizer, staging)
        return {"weights": {}, "extra": {"fsdp2": meta}, "sharded": staging}

    def load_kwargs(self) -> dict:
        return {"load_weights": lambda weights: None}  # the weights are in sharded/, read in restore

    def restore(self, extra: dict) -> None:
        path = latest_checkpoint(self.recipe.output.dir)  # the one the trainer just read
        load_sharded(self.model, self.inner_optimizer, extra["fsdp2"], path / SHARDED)

    def close(self) -> None:
        super().close()
        unshard_to_plain(self.model)
        teardown(self.started_group)  # a group this process started for itself ends here
