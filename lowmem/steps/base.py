"""What every way of stepping shares: the interface, and a one-process stand-in for accelerate.

A step object owns the model and optimizer as one way of training uses them (first order, layer-wise,
zeroth order, ZO2, first-order offload) and offers the trainer one interface::

    loss, grad_norm = step.step(micro_batch)   # micro_batch(i) -> batch dict, i < train.grad_accum
    step.flush()                               # apply deferred work (the trainer: before evaluating)
    metrics = step.evaluate(batch)             # eval_fn(model, batch) with the current weights
    step.save_kwargs(), step.saving()          # what lowmem.checkpoint.save_checkpoint writes, and
    step.load_kwargs(), step.loading(), step.restore(extra)   # how it is read back
    step.close()                               # flush, hand offloaded weights back to the model

``loss`` is NaN when the step was skipped (a non-finite loss or gradient); the trainer then counts a
bad step, not an optimizer step, and does not advance the LR schedule. A non-finite loss, and a
non-finite gradient in the first-order and zeroth-order steps, leave the weights and the optimizer state
as they were. The layer-wise and first-order offload steps update each parameter inside backward, as
soon as its gradient is complete: there a non-finite gradient leaves its own parameter untouched
(the gradient is dropped), but the parameters updated before it in that backward keep their update.
A checkpoint carries deferred work (ZO2's pending update) instead of flushing it; :meth:`Step.close`
flushes at the end. ``on_phase`` is told "forward", "backward", "step" as each begins (the planner's
trace and the measurement label memory by phase).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ClassVar

import torch

from lowmem.dtypes import AUTOCAST_DTYPES
from lowmem.int8_weights import load_stored_weights, stored_weights
from lowmem.optim.step_one import all_finite

MicroBatch = Callable[[int], dict]


def finite_on_every_process(accelerator, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every process (one collective when there are several); no
    full-size temporary (:func:`lowmem.optim.step_one.all_finite`)."""
    finite = all_finite(value)
    if accelerator.num_processes == 1:
        return finite
    bad = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode inside (no dropout), its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers. Not accelerate's ``unwrap_model``:
    that imports DeepSpeed (when installed) to test for its engine, which a lowmem run never is
    (:func:`lowmem.integrations.deepspeed.refuse_deepspeed_launch`), and DeepSpeed's import prints its
    accelerator line in every run (issue 24)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class OneProcess:
    """The part of ``accelerate.Accelerator`` a step uses, for one process without wrappers: the
    planner's trace and the memory measurement run the trainer's step objects through it.
    ``autocast`` is what accelerate enters for ``mixed_precision`` (``torch.autocast`` with that dtype
    on the device's type); fp16 runs without the loss scaler (a scalar: no memory of note)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, mixed_precision: str = "no", device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.dtype = AUTOCAST_DTYPES.get(mixed_precision)

    def autocast(self):
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def prepare(self, *objects):
        return objects

    def unwrap_model(self, model):
        return unwrap(model)


class WrappingOptimizer(torch.optim.Optimizer):
    """An optimizer object around ``self.optimizer`` (the layer-wise wrapper, an engine's): gradients are zeroed
    and the state dict saved and loaded on the wrapped one."""

    optimizer: torch.optim.Optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class Step:
    """One way a training step runs. Subclasses set ``name``, :meth:`applies` and :meth:`step`, and
    override ``memory_plan``, :meth:`check`, :meth:`prepare_optimizer`, :meth:`setup` and the checkpoint methods where
    they differ from an in-memory model."""

    name: ClassVar[str]
    # which of the planner's memory models (lowmem.planner.plan.MEMORY_MODELS) predicts this step's peak:
    # "in_memory" (the step object traced on fake tensors), "zo2" (the traced zeroth-order step on the doubled
    # batch, the blocks' weights replaced by the engine's device buffers), "first_order_offload" (Fuyou's
    # device and host parts), "fsdp2" (one rank's shards and gathers, lowmem.planner.run.plan_run). A new way of
    # stepping names the one its memory follows.
    memory_plan: ClassVar[str] = "in_memory"

    @staticmethod
    def applies(recipe, zeroth_order: bool) -> bool:
        """Whether this is the way ``recipe`` steps (exactly one registered class applies)."""
        raise NotImplementedError

    @classmethod
    def check(cls, recipe) -> None:
        """Refuse what this way of stepping cannot run, in one line naming the field (ValueError). The
        recipe's validator asks the class that applies, so the rule is stated here only."""

    def __init__(self, recipe, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator,
                 loss_fn: Callable, eval_fn: Callable):
        self.recipe, self.accelerator = recipe, accelerator
        self.loss_fn, self.eval_fn = loss_fn, eval_fn     # (model, batch) -> loss; -> {"eval_loss": ...}
        # what a checkpoint saves and the scheduler drives
        self.inner_optimizer = self.prepare_optimizer(model, optimizer)
        self.model, self.optimizer = self.setup(model, self.inner_optimizer)  # the model and optimizer stepped
        self.on_phase: Callable[[str], None] = lambda phase: None

    def prepare_optimizer(self, model, optimizer):
        """The optimizer as this way of stepping drives it (the one a checkpoint saves): as built."""
        return optimizer

    def setup(self, model, optimizer):
        """Place the model (and wrap the optimizer for the devices) for this way of stepping."""
        device = self.accelerator.device
        if any(p.device != device for p in model.parameters()):  # (a tied fake parameter cannot be moved)
            model = model.to(device)
        return model, optimizer

    def step(self, micro_batch: MicroBatch) -> tuple[float, float | None]:
        """One optimizer step on ``micro_batch(0..n-1)``: (mean loss, grad norm or None); NaN loss = skipped."""
        raise NotImplementedError

    def flush(self) -> None:
        """Apply deferred work now (nothing is deferred in memory); the trainer calls it before evaluating."""

    def evaluate(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.accelerator.autocast():
            return self.eval_fn(self.model, batch)

    def close(self) -> None:
        self.flush()

    def model_parts(self):
        """The trained weights as parts to save streamed (:mod:`lowmem.model_save`), or None: the model
        holds them in memory (closed first, then saved by ``save_pretrained``)."""
        return None

    def release(self) -> None:
        """End the run after a streamed save, without bringing the weights back into the model."""
        self.close()

    def summary(self) -> dict:
        """Entries this way of stepping adds to the run's ``summary.json`` (every rank calls it)."""
        return {}

    # ------------------------------------------------------------ checkpoints
    def save_kwargs(self) -> dict:
        """``save_checkpoint`` arguments for the weights (``model`` or ``weights``) and this step's ``extra``."""
        model = unwrap(self.model)
        weights = stored_weights(model)  # int8 weights: payloads and scales
        return {"model": model, "extra": {}} if weights is None else {"weights": weights, "extra": {}}

    def saving(self):
        """Held while the checkpoint is written (offloaded optimizer state brought back meanwhile)."""
        return contextlib.nullcontext()

    def load_kwargs(self) -> dict:
        """``load_checkpoint`` arguments for the weights."""
        model = unwrap(self.model)
        if stored_weights(model) is None:
            return {"model": model}
        return {"load_weights": lambda tensors: load_stored_weights(model, tensors)}

    def loading(self):
        """Held while the checkpoint is read (offloaded optimizer state placed again on exit)."""
        return contextlib.nullcontext()

    def restore(self, extra: dict) -> None:
        """Take this step's part of the checkpoint's ``extra`` back."""
