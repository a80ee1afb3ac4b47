"""Steps through the offload engines (:mod:`lowmem.offload`): the decoder blocks live on the host or
NVMe and are streamed through the device.

* :class:`ZO2Step`: MeZO through :class:`~lowmem.offload.engine.ZO2Engine` (Wang et al. 2025, ZO2 §3:
  one dual forward per step, each block's update deferred to its next upload). The pending update
  travels in the checkpoint's ``extra["zo2"]`` and is flushed before evaluation and at the end.
* :class:`FirstOrderOffloadStep`: :class:`~lowmem.offload.firstorder.FirstOrderEngine` (``grad_accum``
  micro-batches, each block's gradient summed on the host and the block stepped there after the last, Fuyou, Liao et al. 2024). Its blocks' optimizer
  state may sit on NVMe: it is brought back while a checkpoint is written or read.

Checkpoints hold the trainable weights read from the engine's block store.

The ZO2 engine's step is its optimizer's step (it draws the step seed and applies the update itself, without
calling ``optimizer.step``). :class:`EngineStepped` makes that visible: its ``step(closure)`` runs the
engine's step, so the LR scheduler built on it sees an optimizer step before its own (torch warns otherwise,
pytorch/pytorch#20124, and the warning would be false here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lowmem.dtypes import DTYPES
from lowmem.offload.rounding import is_lower_precision
from lowmem.steps.base import MicroBatch, Step, WrappingOptimizer, eval_mode
from lowmem.steps.zeroth_order import check_zeroth_order


def build_engine(recipe, model, optimizer, zeroth_order: bool, accelerator, loss_fn):
    """The offload engine driving ``model``: ZO2 for MeZO (the LM objective is the engine's own, any
    other, classification, goes through ``loss_fn``), else the first-order one (LM objective)."""
    from lowmem.offload.engine import ZO2Engine
    from lowmem.offload.firstorder import FirstOrderEngine

    if accelerator.num_processes > 1:
        raise ValueError("offload.enabled: the offload engines run on one process")
    lm_objective = recipe.data.task in ("lm", "sft")  # sft: the LM loss on the labels it keeps
    if zeroth_order:
        return ZO2Engine(model, optimizer, recipe.offload, loss_fn=None if lm_objective else loss_fn)
    if not lm_objective:
        raise ValueError("offload.enabled: the first-order offload engine trains the LM objective only "
                         "(data.task: lm or sft)")
    return FirstOrderEngine(model, optimizer, recipe.offload, device_budget_gb=recipe.train.device_memory_gb)


class EngineStepped(WrappingOptimizer):
    """``optimizer`` as stepped by an engine: ``step(closure)`` runs ``closure`` (the engine's step) and
    returns its result. The parameter groups, the state and the state dict are read through to
    ``optimizer`` at every access (the engine reloads it on resume), so a scheduler built on this object
    drives the LR the engine reads. ``Optimizer.__init__`` is not run: it would copy the groups."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def step(self, closure):
        return closure()


class Renamed(Mapping):
    """``tensors`` under other names: ``names[new] = old``; read only when asked for."""

    def __init__(self, tensors: Mapping, names: dict[str, str]):
        self.tensors, self.names = tensors, names

    def __getitem__(self, name: str):
        return self.tensors[self.names[name]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _Offloaded(Step):
    zeroth_order = False

    @classmethod
    def check(cls, recipe) -> None:
        if recipe.train.loss_chunk_tokens is not None:
            raise ValueError("train.loss_chunk_tokens: not supported with the offload engines (offload.enabled); "
                             "set it to null")
        cls.check_engine(recipe)
        if recipe.model.lora is not None:
            raise ValueError("model.lora: the offload engines (offload.enabled) train the model's own weights "
                             "(all, or with ZO2 the model.trainable subset); set it to null")
        if recipe.model.dtype == "int8":  # lowmem.int8_weights: dequantized per layer in memory
            raise ValueError("model.dtype: int8 weights are trained in memory; the offload engines keep their own "
                             "copies; set offload.enabled to false")
        if recipe.model.quantize is not None:
            raise ValueError("model.quantize: the offload engines stream the model's own weights, not a frozen "
                             "bitsandbytes base; set it to null")

    @classmethod
    def check_engine(cls, recipe) -> None:
        """The engine's own rules (:meth:`check` adds those of both engines)."""

    def setup(self, model, optimizer):
        self.engine = build_engine(self.recipe, model, optimizer, self.zeroth_order, self.accelerator,
                                   self.loss_fn)
        return model, optimizer

    def evaluate(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.engine.evaluate(self.eval_fn, batch)  # flushes the deferred update first

    def close(self) -> None:
        self.engine.close()  # flush, blocks back into the model

    def model_parts(self):
        return self.engine.export_parts()  # flushed; one block read at a time when written

    def release(self) -> None:
        self.engine.close(restore=False)

    def save_kwargs(self) -> dict:
        """The trainable weights as parts read from the engine's tiers one block at a time when written."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {"weights": self.engine.checkpoint_parts(trainable), "extra": self.engine_extra()}

    def load_kwargs(self) -> dict:
        return {"load_weights": self._load_weights}

    def _load_weights(self, weights: Mapping) -> None:
        """The checkpoint's trainable tensors (a lazy mapping: read one block at a time), tied aliases
        included; the weights it does not hold (frozen ones) keep their values."""
        first, alias = {}, {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
            if first[id(p)] in weights:
                alias[name] = first[id(p)]
        self.engine.load_model_state_dict(Renamed(weights, alias), partial=True)

    def engine_extra(self) -> dict:
        raise NotImplementedError


HOST_BLOCK = "zo2.host_block."  # checkpoint key prefix of the int8 host copies


class ZO2Step(_Offloaded):
    name = "zo2"
    zeroth_order = True
    memory_plan = "zo2"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return recipe.train.distributed == "ddp" and zeroth_order and recipe.offload.enabled

    @classmethod
    def check(cls, recipe) -> None:
        super().check(recipe)
        check_zeroth_order(recipe)

    @classmethod
    def check_engine(cls, recipe) -> None:
        """ZO2 keeps the only copy of a block on the host: the training dtype, a coarser 16-bit one or
        int8 plus scales (stochastically rounded, :mod:`lowmem.offload.host_format`)."""
        host, compute = recipe.offload.host_dtype, recipe.model.dtype
        if host in (None, compute, "int8"):
            return
        if not is_lower_precision(DTYPES[host], DTYPES[compute]):
            raise ValueError(f"offload.host_dtype: {host} is not coarser than the training dtype "
                             f"{compute} (model.dtype); use it or a 16-bit type below fp32")

    def prepare_optimizer(self, model, optimizer):
        return EngineStepped(optimizer)  # what the checkpoint saves and the scheduler drives

    def setup(self, model, optimizer):
        return super().setup(model, optimizer.optimizer)  # the engine and the step use MeZO itself

    def step(self, micro_batch: MicroBatch) -> tuple[float, None]:
        batch = micro_batch(0)
        with eval_mode(self.model):  # as the in-memory zeroth-order step: no dropout in the difference
            loss = self.inner_optimizer.step(lambda: self.engine.step(batch))
        return (math.nan if self.optimizer.last_step_skipped else float(loss)), None

    def flush(self) -> None:
        self.engine.flush()

    def engine_extra(self) -> dict:
        state = self.engine.state_dict()
        return {"zo2": {k: state[k] for k in ("steps", "pending")}}

    def save_kwargs(self) -> dict:
        """The trainable weights and, with an int8 host copy, the stored blocks themselves (payload and
        scales: a resume requantizing dequantized weights would not be exact), as ``zo2.host_block.<i>``,
        each read from the store when written."""
        kwargs = super().save_kwargs()
        kwargs["weights"] = [*kwargs["weights"], *self.engine.host_block_parts(HOST_BLOCK)]
        return kwargs

    def _load_weights(self, weights: Mapping) -> None:
        super()._load_weights(weights)  # reads the parameters' names only
        count = sum(1 for k in weights if k.startswith(HOST_BLOCK))
        if count not in (0, len(self.engine.packed)):
            raise ValueError(f"checkpoint: {count} host blocks for a model of {len(self.engine.packed)} blocks")
        for i in range(count):  # one block read at a time
            self.engine.load_host_block(i, weights[f"{HOST_BLOCK}{i}"])

    def restore(self, extra: dict) -> None:
        self.engine.load_state_dict({**extra["zo2"], "optimizer": self.optimizer.state_dict()})


class FirstOrderOffloadStep(_Offloaded):
    name = "first_order_offload"
    memory_plan = "first_order_offload"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        return recipe.train.distributed == "ddp" and not zeroth_order and recipe.offload.enabled

    @classmethod
    def check_engine(cls, recipe) -> None:
        """The engine updates each block inside backward (layer-wise rules) and keeps fp32 masters."""
        if recipe.optim.max_grad_norm is not None:
            raise ValueError("optim.max_grad_norm: the first-order offload engine steps each block inside "
                             "backward (layer-wise), before a global norm exists; set it to null")
        if recipe.model.trainable is not None:
            raise ValueError("model.trainable: the first-order offload engine trains every weight; set it to null")
        if recipe.train.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision: fp16 needs loss scaling, which the first-order offload "
                             "engine does not do; use bf16 or no")
        host = recipe.offload.host_dtype
        if host is not None and host != recipe.model.dtype and host != "float32":
            raise ValueError(f"offload.host_dtype: the first-order offload engine keeps fp32 master weights "
                             f"on the host; got {host!r}, use null")

    def step(self, micro_batch: MicroBatch) -> tuple[float, None]:
        closures = [lambda m=m: self.loss_fn(self.model, micro_batch(m)) for m in range(self.recipe.train.grad_accum)]
        loss, nonfinite = self.engine.step(closures, self.accelerator.autocast)  # gradients summed on the host
        return (math.nan if nonfinite or not math.isfinite(float(loss)) else float(loss)), None

    def engine_extra(self) -> dict:
        return {"offload": {"steps": self.engine.steps}}

    def save_kwargs(self) -> dict:
        """The weights and the blocks' optimizer state written one block at a time (lowmem.offload.fo_checkpoint)."""
        return {**super().save_kwargs(), "optimizer_parts": self.engine.checkpoint_state.parts}

    def saving(self):
        self.engine.barrier()
        return self.engine.checkpoint_state.placeholders()

    def load_kwargs(self) -> dict:
        return {**super().load_kwargs(), "load_optimizer": self.engine.checkpoint_state.load}

    def loading(self):
        return self.engine.loading_state()

    def restore(self, extra: dict) -> None:
        self.engine.steps = extra["offload"]["steps"]
