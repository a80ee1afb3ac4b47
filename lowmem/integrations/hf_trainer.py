"""lowmem inside a Hugging Face ``transformers.Trainer``: a callback and a zeroth-order Trainer.

First-order optimizers need nothing but the optimizer and, optionally, the callback::

    opt = lowmem.create_optimizer(model, "apollo_mini", lr=1e-3)
    Trainer(model, args, train_dataset=ds, optimizers=(opt, None),
            callbacks=[lowmem.LowMemCallback(layerwise=False, wta_crs_keep_ratio=0.3)]).train()

:class:`LowMemCallback`, at ``on_train_begin`` (after the Trainer built its scheduler,
prepared the optimizer and loaded a checkpoint):

* applies WTA-CRS to the model (``wta_crs_keep_ratio``) and restores its private
  generator on resume (kept in ``trainer_state.json`` through ``ExportableState``);
* makes the RMSNorm and gated-MLP modules lean (``lean=True``, :mod:`lowmem.activations.lean`);
* switches the optimizer to layer-wise mode (``layerwise=True``): the Trainer's
  accelerate wrapper then steps a :class:`~lowmem.steps.layerwise.LayerwiseOptimizer`
  that shares the inner optimizer's param groups, so the Trainer's scheduler still drives it;
* refuses combinations that would silently train wrong (one-line ``ValueError``).

At every log it adds ``optimizer_state_mb``, ``peak_rss_gb`` (and ``peak_cuda_gb``) to the
record, in ``trainer.state.log_history`` and in what later callbacks (the printer) receive.

Zeroth-order optimizers (``mezo``, ``zo_adamu``) use :class:`ZOTrainer`, which overrides only
``training_step`` (the Trainer's loop, logging, evaluation and checkpoints stay as they are).

FSDP2 (issue 26): shard the model with :func:`shard_for_trainer` before making the optimizer and the
Trainer, and launch with ``torchrun`` or ``accelerate launch --multi_gpu``::

    args = TrainingArguments(..., save_only_model=True)
    model = lowmem.shard_for_trainer(model, args)          # lowmem's fully_shard, per block then the root
    opt = lowmem.create_optimizer(model, "apollo_mini", lr=1e-3)   # on the DTensor shards
    Trainer(model, args, train_dataset=ds, optimizers=(opt, None), callbacks=[lowmem.LowMemCallback()]).train()

The Trainer then takes the model as one sharded at load time (``from_pretrained(distributed_config=...)``):
no DDP wrapper, FSDP2 reduce-scatters the gradients, and its rule for such models holds (no optimizer
checkpoints: ``save_only_model=True`` or ``save_strategy="no"``). :class:`ZOTrainer` steps such a
model as ``lowmem-train`` does under FSDP2 (the ranks perturb their rows, the loss is the global
batch's). The Trainer's own FSDP option (``fsdp=...``, ``fsdp_version: 2``) is accelerate's plugin;
on a CPU it trains plain DDP.

Checkpoints: the Trainer saves ``optimizer.state_dict()`` with ``torch.save`` and loads it with
``weights_only=True`` through the accelerate wrapper into lowmem's ``load_state_dict``, which
keeps every state tensor's dtype (fp32 moments of a bf16 model, 8-bit codes).
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from lowmem.memory import cuda_peak_bytes, peak_rss_bytes, state_bytes
from lowmem.steps.layerwise import LayerwiseOptimizer, check_layerwise
from lowmem.optim.registry import check_hparams, create_optimizer, is_zeroth_order
from lowmem.optim.dtensor import is_sharded
from lowmem.steps import ZerothOrderStep
from lowmem.steps.fsdp_zeroth_order import ShardedZerothOrderStep


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The lowmem optimizer inside accelerate's wrapper and DeepSpeed's ZeRO optimizer, which
    both keep the wrapped one in ``.optimizer`` (a LayerwiseOptimizer is returned as it is)."""
    while not isinstance(optimizer, LayerwiseOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def shard_for_trainer(model: torch.nn.Module, args) -> torch.nn.Module:
    """``model`` sharded by FSDP2 for a ``transformers.Trainer`` with ``args`` (module docstring): placed
    on ``args.device`` in the launcher's process group (made by ``args``), ``fully_shard`` per decoder
    block and then the root (:func:`lowmem.fsdp.shard_model`, what ``train.distributed: fsdp2`` does),
    and marked as sharded at load time so that the Trainer neither wraps it in DDP nor moves it.
    Make the optimizer afterwards: it then steps the ``DTensor`` shards (:mod:`lowmem.optim.dtensor`)."""
    from lowmem.fsdp import ensure_process_group, shard_model

    device = args.device  # accelerate starts the launcher's process group here, as the Trainer will use it
    ensure_process_group(device)  # no launcher: a group of one process
    model = shard_model(model.to(device), None)
    model._is_distributed_loading_by_transformers = True  # transformers' flag for a model that owns its sharding
    return model


def _tensor_to_json(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": t.flatten().tolist()}


def _tensor_from_json(d: dict) -> torch.Tensor:
    return torch.tensor(d["values"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


class OptimizerFactory:
    """What ``Trainer(optimizer_cls_and_kwargs=...)`` instantiates and calls with ``(model, **kwargs)``
    (transformers' optimizer-factory protocol). Use :func:`trainer_optimizer` to build the pair."""

    def __call__(self, model: torch.nn.Module, name: str, **hparams) -> torch.optim.Optimizer:
        return create_optimizer(model, name, **hparams)


def trainer_optimizer(name: str, **hparams) -> tuple[type, dict]:
    """``optimizer_cls_and_kwargs`` for a ``transformers.Trainer``: the Trainer then builds the lowmem
    optimizer itself, which is the only way through its DeepSpeed path (``deepspeed_init`` drops
    an optimizer passed in ``optimizers=`` and builds its default AdamW instead).

    >>> Trainer(model, args, optimizer_cls_and_kwargs=trainer_optimizer("adamw", lr=1e-3))
    """
    check_hparams(name, {k: v for k, v in hparams.items() if k != "target_modules"})
    return OptimizerFactory, {"name": name, **hparams}


class LowMemCallback(TrainerCallback, ExportableState):
    """Apply lowmem's layer-wise mode, WTA-CRS and lean modules in a ``transformers.Trainer`` and log memory.

    ``layerwise``: update each parameter inside backward and free its gradient
    (needs ``max_grad_norm=0``, one process, no fp16). ``wta_crs_keep_ratio``: keep this fraction
    of activation rows for backward in the default WTA-CRS targets (or ``wta_crs_targets``
    glob patterns), sampled from a generator seeded with ``wta_crs_seed``. ``lean``: RMSNorm and
    gated MLP keep only their inputs for backward (same forward, gradients to rounding).
    """

    def __init__(self, layerwise: bool = False, wta_crs_keep_ratio: float | None = None,
                 wta_crs_targets: list[str] | None = None, wta_crs_seed: int = 0, lean: bool = False):
        self.layerwise = layerwise
        self.lean = lean
        self.lean_handle = None
        self.wta_crs_keep_ratio = wta_crs_keep_ratio
        self.wta_crs_targets = wta_crs_targets
        self.wta_crs_seed = wta_crs_seed
        self.wta_handle = None

    # ------------------------------------------------------------ checkpoint (trainer_state.json)
    def state(self) -> dict:
        wta = None if self.wta_handle is None else \
            {k: _tensor_to_json(v) for k, v in self.wta_handle.state_dict().items()}
        return {"args": {"layerwise": self.layerwise, "wta_crs_keep_ratio": self.wta_crs_keep_ratio,
                         "wta_crs_targets": self.wta_crs_targets, "wta_crs_seed": self.wta_crs_seed,
                         "lean": self.lean},
                "attributes": {"wta_crs_state": wta}}

    def _saved_wta_state(self, state) -> dict | None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, list):  # several LowMemCallbacks: the Trainer keeps a list; use the first
            saved = saved[0] if saved else None
        return None if saved is None else saved.get("attributes", {}).get("wta_crs_state")

    # ------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = unwrap_optimizer(optimizer)
        if args.deepspeed:
            from lowmem.integrations.deepspeed import check_trainer_deepspeed

            check_trainer_deepspeed(args, inner, layerwise=self.layerwise,
                                    wta_crs=self.wta_crs_keep_ratio is not None)
        if self.wta_crs_keep_ratio is not None:
            self._apply_wta_crs(model, state)
        if self.lean and self.lean_handle is None:  # a second trainer.train() keeps them
            from lowmem.activations import apply_lean

            self.lean_handle = apply_lean(model)
        if self.layerwise:
            self._make_layerwise(args, optimizer, inner, model)

    def _apply_wta_crs(self, model, state) -> None:
        if self.wta_handle is None:  # a second trainer.train() keeps the layers already swapped
            from lowmem.activations import apply_wta_crs

            self.wta_handle = apply_wta_crs(model, self.wta_crs_keep_ratio, targets=self.wta_crs_targets,
                                            seed=self.wta_crs_seed)
        saved = self._saved_wta_state(state)
        if saved is not None:  # resumed (or a later train() call): continue the same random stream
            self.wta_handle.load_state_dict({k: _tensor_from_json(v) for k, v in saved.items()})

    @staticmethod
    def _make_layerwise(args, optimizer, inner, model) -> None:
        check_layerwise("LowMemCallback(layerwise=True)", zeroth_order=is_zeroth_order(inner),
                        max_grad_norm=max(args.max_grad_norm or 0, 0), processes=args.world_size, fp16=args.fp16,
                        clip_fix="set TrainingArguments(max_grad_norm=0)")
        if isinstance(inner, LayerwiseOptimizer):
            return
        if optimizer is inner:
            raise ValueError("LowMemCallback(layerwise=True): expected the Trainer's accelerate-prepared optimizer")
        # the wrapper steps the layer-wise view; param_groups/state are the inner optimizer's own
        # objects, so the Trainer's LR scheduler (built on `inner`) drives the LR the hooks use
        # with the model, a tied embedding/LM-head gradient is held once in backward (lowmem.steps.tied_lookup)
        optimizer.optimizer = LayerwiseOptimizer(inner, grad_accum_steps=args.gradient_accumulation_steps, model=model)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # ZOTrainer has already stepped and cleared the sync flag; a plain Trainer would step without a closure
        synced = getattr(getattr(optimizer, "gradient_state", None), "sync_gradients", False)
        if synced and is_zeroth_order(unwrap_optimizer(optimizer)):
            raise ValueError("zeroth-order optimizer in a plain transformers.Trainer: use lowmem.ZOTrainer "
                             "(its training_step runs optimizer.step(closure))")

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or optimizer is None:
            return
        figures = {"optimizer_state_mb": round(state_bytes(unwrap_optimizer(optimizer)) / 2**20, 4),
                   "peak_rss_gb": round(peak_rss_bytes() / 2**30, 3)}
        if cuda_peak_bytes() is not None:
            figures["peak_cuda_gb"] = round(cuda_peak_bytes() / 2**30, 3)
        logs.update(figures)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and set(logs) - set(figures) <= set(last):
            last.update(figures)  # the Trainer appended a copy of `logs` just before calling on_log


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` for lowmem's zeroth-order optimizers (``mezo``, ``zo_adamu``).

    Only ``training_step`` changes: it runs lowmem's zeroth-order step
    (:class:`lowmem.steps.ZerothOrderStep`, as ``lowmem-train`` does): ``optimizer.step(closure)`` on the
    batch, two no-grad forwards per perturbation with the model in eval mode as in MeZO, and returns
    the loss at ``theta + eps z`` (NaN when the update was skipped). The loop's own
    ``optimizer.step()`` that follows is skipped through accelerate's sync flag (the mechanism the loop uses between accumulation micro-batches);
    the LR scheduler, logging, evaluation and checkpoints run unchanged.
    """

    def train(self, *args, **kwargs):
        """``Trainer.train``; afterwards accelerate's sync flag is set again: its gradient state is one
        per process, and a later Accelerator (another Trainer, ``lowmem.train``) would skip its steps."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.accelerator.gradient_state._set_sync_gradients(True)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        zo = unwrap_optimizer(self.optimizer)
        if not is_zeroth_order(zo):
            raise ValueError(f"ZOTrainer: {type(zo).__name__} is not a zeroth-order optimizer; "
                             "use transformers.Trainer for first-order optimizers")
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("ZOTrainer: set gradient_accumulation_steps=1 (a zeroth-order step takes one batch)")
        inputs = self._prepare_inputs(inputs)

        def loss_fn(model, batch) -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, batch)

        # the step lowmem-train takes (lowmem.steps): eval mode, fp32 forwards unless the optimizer allows
        # autocast, NaN when the update was skipped (the Trainer's logging_nan_inf_filter leaves it out)
        sharded = is_sharded(zo.param_groups[0]["params"][0])  # by shard_for_trainer
        if sharded and not zo.sharded:
            zo.shard()  # each rank perturbs its rows with its slice of the one-process noise
        stepper = (ShardedZerothOrderStep if sharded else ZerothOrderStep)(None, model, zo, self.accelerator,
                                                                          loss_fn, None)
        loss, _ = stepper.step(lambda micro: inputs)
        self.accelerator.gradient_state._set_sync_gradients(False)  # the update is done: no second step
        return torch.tensor(loss, device=self.args.device)
