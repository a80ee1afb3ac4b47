"""The zeroth-order step on a model sharded by FSDP2 (``train.distributed: fsdp2`` with MeZO or
ZO-AdaMU), equal to the one-process step on the whole batch.

MeZO's step (Malladi et al. 2023, Algorithm 1) on ``N`` processes holding one model between them:
every rank perturbs its shards with their slices of the one-process ``z``
(:mod:`lowmem.optim.zo_shard`), each forward all-gathers the perturbed weights block by block
(FSDP2), and the loss of the step's batch is the ranks' mean losses on their ``b`` rows each,
weighted by the terms ``n_r`` each averages (predicted tokens; examples for classification)::

    L(theta +- eps z) = sum_r n_r L_r(theta +- eps z) / sum_r n_r     (one all-reduce of 2 float64)

-- the loss one process computes on the ``N b`` rows. So every rank gets the
same projected gradient ``g = (L+ - L-) / 2 eps`` and makes the one-process update of its rows;
unlike ZO under DDP (one perturbation per process, the scalars exchanged: ``lowmem.optim.mezo``)
nothing else is sent. Before each forward, and after the step and each evaluation, the model is
resharded: FSDP2 keeps the root group's all-gathered weights after a forward (a backward would free
them), so the next forward would not see the perturbation of its shards and a checkpoint would save
the stale whole weights.

The rest (sharding, per-rank bytes, sharded checkpoints, the plain model at the end) is
:class:`~lowmem.steps.fsdp.FSDP2Step`'s.
"""

from __future__ import annotations

import torch

from lowmem.fsdp import reshard
from lowmem.objectives import loss_terms
from lowmem.steps.base import OneProcess
from lowmem.steps.fsdp import FSDP2Step
from lowmem.steps.zeroth_order import ZerothOrderStep, check_zeroth_order


class ShardedZerothOrderStep(ZerothOrderStep):
    """:class:`ZerothOrderStep` on a model that FSDP2 already shards and whose optimizer was told so
    (``optimizer.shard()``): the losses of the global batch, the model resharded before each forward.
    ``ZOTrainer`` steps a model sharded by ``lowmem.shard_for_trainer`` with it."""

    sharded = True

    def step(self, micro_batch):
        """The zeroth-order step, then the root group's all-gathered weights freed (no backward does it
        here): between steps every rank holds its shards only, which a checkpoint saves."""
        out = super().step(micro_batch)
        if self.sharded:
            reshard(self.model)
        return out

    def evaluate(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().evaluate(batch)
        if self.sharded:
            reshard(self.model)
        return out

    def forward_loss(self, batch: dict) -> torch.Tensor:
        """The global batch's loss: every rank's forward of its rows, weighted by its loss terms."""
        if not self.sharded:
            return super().forward_loss(batch)
        reshard(self.model)  # the next forward all-gathers the shards as they are now
        loss = super().forward_loss(batch)
        terms = torch.tensor(loss_terms(batch), dtype=torch.float64, device=loss.device)
        both = torch.stack([loss.detach().double() * terms, terms])
        total, count = self.accelerator.reduce(both, "sum")  # float64: g is a small difference of two
        return total / count


class FSDP2ZerothOrderStep(ShardedZerothOrderStep, FSDP2Step):
    """:class:`ZerothOrderStep`'s ``step`` with :class:`FSDP2Step`'s setup, summary, checkpoints and close."""

    name = "fsdp2_zeroth_order"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return recipe.train.distributed == "fsdp2" and zeroth_order

    @classmethod
    def check(cls, recipe) -> None:
        check_zeroth_order(recipe)
        FSDP2Step.check(recipe)

    def setup(self, model, optimizer):
        model, optimizer = FSDP2Step.setup(self, model, optimizer)
        self.sharded = not isinstance(self.accelerator, OneProcess)  # the planner traces one process
        if self.sharded:
            optimizer.shard()
        return model, optimizer
