"""GPU proof step ``quantized`` (issue 27): the Llama-3-8B-shape step with quantized weights.

* ``int8``: trainable int8 block weights (``model.dtype: int8``), APOLLO-Mini layer-wise, checkpointing,
  bf16 autocast, batch 1 x 1024: ``torch.cuda.max_memory_allocated`` against the planner and against the
  bf16-weight step of ``llama_step`` (same recipe otherwise);
* ``nf4_lora``: LoRA (r 16 on q/k/v/o) on a frozen NF4 double-quantized base (``model.quantize``), AdamW on the
  adapters, checkpointing: its peak (the planner does not model a bitsandbytes base).

ZO2 with an int8 host copy (``offload.host_dtype: int8``) is not built yet: no row for it.
"""

from __future__ import annotations

import time

import torch
from gpu_proof_common import Shapes, _batch, _recipe, free, host_model, median_time, peak_since, reset_peak

def _held(model) -> int:
    """Bytes of the model's own tensors (the step's peak counts them: the model is built before the reset)."""
    tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _int8_step(s: Shapes) -> dict:
    from lowmem.planner import model_config, plan
    from lowmem.planner import fake_model
    from lowmem.build import recipe_step, sample_batch

    recipe = _recipe(s.llama, s.llama_tokens, "int8", {"name": "apollo_mini", "layerwise": True,
                                                       "max_grad_norm": None}, {"gradient_checkpointing": True})
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"mixed_precision": "bf16"})})
    predicted = plan(recipe, "cuda", suggest=False)
    with torch.device(s.device):
        model = fake_model(recipe.model, model_config(recipe.model))  # fp32 on the device, blocks -> int8
    free(s.device)
    base = reset_peak(s.device, held=_held(model))
    stepper, _ = recipe_step(recipe, model, s.device)
    batch = sample_batch(recipe, model.config.vocab_size, s.device)
    step = median_time(lambda: stepper.step(lambda micro: batch), s.device, 1)
    measured = peak_since(base, s.device)
    out = {"predicted_GiB": predicted.peak_bytes / 2**30, "weights_GiB": predicted.parts["weights"] / 2**30,
           "step_s": step}
    if measured is not None:
        out.update(measured_GiB=measured / 2**30, planner_error=(predicted.peak_bytes - measured) / measured)
    del model, stepper
    free(s.device)
    return out


def _nf4_lora_step(s: Shapes) -> dict:
    from lowmem.models import select_trained
    from lowmem.quantized_base import quantize_model
    from lowmem.recipe import QuantizeSection
    from lowmem.build import recipe_step

    recipe = _recipe(s.llama, s.llama_tokens, "bfloat16", {"name": "adamw", "max_grad_norm": 1.0},
                     {"gradient_checkpointing": True, "lora": LORA,
                      "quantize": {"bits": 4, "type": "nf4", "double_quant": True}})
    started = time.perf_counter()
    model = quantize_model(lambda: host_model(s.llama, torch.bfloat16),
                           QuantizeSection(bits=4, type="nf4", double_quant=True), torch.bfloat16)
    load_s = time.perf_counter() - started
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = select_trained(model, recipe.model).train()
    free(s.device)
    base = reset_peak(s.device, held=_held(model))
    stepper, _ = recipe_step(recipe, model, s.device)
    batch = _batch(s.llama, s.llama_tokens, s.device)
    step = median_time(lambda: stepper.step(lambda micro: batch), s.device, 1)
    measured = peak_since(base, s.device)
    out = {"load_s": load_s, "step_s": step, "weights_GiB": _held(model) / 2**30}
    if measured is not None:
        out["measured_GiB"] = measured / 2**30
    del model, stepper
    free(s.device)
    return out


def quantized(s: Shapes) -> dict:
    return {"int8": _int8_step(s), "nf4_lora": _nf4_lora_step(s)}
