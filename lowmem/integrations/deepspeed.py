"""Which lowmem pieces run under DeepSpeed, and a one-line error for those that do not.

DeepSpeed comes in through accelerate's DeepSpeed plugin (``accelerate launch
--use_deepspeed``, or ``TrainingArguments(deepspeed=config)`` in a ``transformers.Trainer``);
a lowmem optimizer is then DeepSpeed's *client optimizer*. What DeepSpeed hands that
optimizer decides what works (DeepSpeed 0.19, ``runtime/zero/stage_1_and_2.py``, ``stage3.py``,
``runtime/bf16_optimizer.py``):

* ZeRO-1/2/3, and ZeRO-0 with bf16/fp16, replace each param group's tensors by one flat
  1-D fp32 partition. Element-wise rules (AdamW) are unaffected; GaLore, APOLLO and FRUGAL
  project 2-D weight matrices and cannot run on a flat partition, and the 8-bit optimizers
  choose their per-tensor storage by shape and name. They run under ZeRO-0 in fp32 only.
* Zeroth-order methods (MeZO, ZO-AdaMU) step with ``step(closure)`` and no backward; the
  DeepSpeed engine steps its optimizer after its own backward. For ZO beyond one GPU's
  memory use lowmem's ZO2 offload (``offload.enabled``), which is built for it.
* Layer-wise mode updates parameters in backward hooks, while DeepSpeed owns the gradients
  (buckets, reduce-scatter): refused.
* WTA-CRS swaps Linear layers in place; ZeRO-3 gathers and releases weights around module
  hooks that the sampled backward has not been tested with: refused at ZeRO-3.

``check_deepspeed_combination`` applies these rules; ``check_trainer_deepspeed`` reads them
from a ``TrainingArguments`` with a DeepSpeed config (the callback calls it).

``lowmem-train`` itself does not run under DeepSpeed yet: its loop clips and steps the
optimizer itself, while under DeepSpeed ``accelerator.backward`` already steps the engine and
the gradient norm comes from the engine; and on a CPU-only machine accelerate silently drops
the DeepSpeed plugin. ``refuse_deepspeed_launch`` turns both into one line.
"""

from __future__ import annotations

import os

import torch

from lowmem.optim.registry import available, get_spec

ELEMENTWISE_UNDER_ZERO = frozenset({"adamw"})  # tested: tests/integrations/test_deepspeed.py


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The registry name of ``optimizer``'s class (apollo and apollo_mini share one class)."""
    for name in available():
        try:
            if get_spec(name).cls is type(optimizer):
                return name
        except ValueError:  # an optimizer whose optional dependency is missing cannot be this one
            continue
    raise ValueError(f"DeepSpeed: {type(optimizer).__name__} is not a lowmem optimizer")


def check_deepspeed_combination(stage: int, optimizer_name: str, layerwise: bool = False,
                                mixed_precision: str = "no", offload_optimizer: bool = False,
                                offload_param: bool = False, wta_crs: bool = False) -> None:
    """Raise a one-line ``ValueError`` naming the combination if it does not work (see the module doc)."""
    where = f"DeepSpeed ZeRO-{stage} with {optimizer_name!r}"
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed: ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    spec = get_spec(optimizer_name)
    if spec.zeroth_order:
        raise ValueError(f"{where}: zeroth-order optimizers step without a backward, which the DeepSpeed engine "
                         "needs; use lowmem's ZO2 offload (offload.enabled) instead")
    if layerwise:
        raise ValueError(f"{where}: layer-wise mode is not supported (DeepSpeed owns the gradients)")
    if offload_param and stage != 3:
        raise ValueError(f"{where}: parameter offload needs ZeRO-3")
    flat = stage > 0 or mixed_precision != "no"
    if flat and optimizer_name not in ELEMENTWISE_UNDER_ZERO:
        why = "projects 2-D weight matrices" if spec.target_keys else "chooses its state storage per tensor"
        raise ValueError(f"{where} ({mixed_precision}): DeepSpeed hands the optimizer flat 1-D partitions and "
                         f"{optimizer_name} {why}; use ZeRO-0 in fp32, or data parallel without DeepSpeed")
    if offload_optimizer and optimizer_name not in ELEMENTWISE_UNDER_ZERO:
        raise ValueError(f"{where}: optimizer offload works with 'adamw' only")
    if wta_crs and stage == 3:
        raise ValueError(f"{where}: WTA-CRS is not supported with ZeRO-3 (weights gathered around module hooks)")


def check_trainer_deepspeed(args, optimizer: torch.optim.Optimizer, layerwise: bool, wta_crs: bool) -> None:
    """``check_deepspeed_combination`` for a ``TrainingArguments`` carrying a DeepSpeed config."""
    if not all("param_names" in group for group in optimizer.param_groups):  # groups lowmem did not build
        raise ValueError("DeepSpeed: the Trainer built its own optimizer (its DeepSpeed path drops `optimizers=`); "
                         "pass optimizer_cls_and_kwargs=lowmem.integrations.trainer_optimizer(name, **hparams)")
    config = args.hf_deepspeed_config.config
    zero = config.get("zero_optimization", {})
    precision = "bf16" if config.get("bf16", {}).get("enabled") is True else \
        "fp16" if config.get("fp16", {}).get("enabled") is True else "no"
    device = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
    check_deepspeed_combination(int(zero.get("stage", 0)), optimizer_name(optimizer), layerwise=layerwise,
                                mixed_precision=precision, offload_optimizer=device("offload_optimizer"),
                                offload_param=device("offload_param"), wta_crs=wta_crs)


def refuse_deepspeed_launch(accelerator) -> None:
    """For ``lowmem-train``: a one-line error when launched with ``accelerate launch --use_deepspeed``
    (or a DeepSpeed plugin), instead of running without DeepSpeed or with a loop not made for it."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    why = "accelerate drops DeepSpeed on a CPU-only machine" if plugin is None else \
        "its loop clips and steps the optimizer, which the DeepSpeed engine does itself"
    raise ValueError(f"lowmem-train: DeepSpeed launches are not supported ({why}); use accelerate launch "
                     "--multi_gpu for data parallel, or transformers.Trainer with "
                     "lowmem.integrations.trainer_optimizer for DeepSpeed")
