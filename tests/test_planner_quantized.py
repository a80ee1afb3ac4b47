"""The memory planner on quantized weights (issue 27), traced on fake tensors as a run builds them:

* trainable int8 weights (``model.dtype: int8``): payloads, scales, the per-layer dequantized buffers, the
  fp32 weight while its update runs;
* LoRA, alone and on a frozen 4/8-bit bitsandbytes base (``model.quantize``): codes and constants, the fp32
  norms and embeddings of peft's k-bit preparation, the adapters, bitsandbytes' own autograd functions.

The traced bytes equal the real ones, and the predicted peak RSS is within 15% of a fresh process's step."""

import pytest
from test_planner import LW_GC, MEDIUM, SMALL, make_recipe, measure_in_process, measured, start_fresh_processes

from lowmem.models import load_model
from lowmem.planner import model_config, plan, trace_step, with_overrides

CONFIG = {**MEDIUM, "hidden_size": 512, "num_hidden_layers": 6, "vocab_size": 32000, "intermediate_size": 1376}


def test_int8_weights_peak_rss_within_15_percent(tmp_path):
    recipe = make_recipe(tmp_path, "model.dtype=int8", "optim.name=apollo_mini", *LW_GC, config=CONFIG)
    running = start_fresh_processes(tmp_path, {"int8": recipe})
    predicted = plan(recipe, "cpu")
    fp32 = plan(make_recipe(tmp_path, "optim.name=apollo_mini", *LW_GC, config=CONFIG), "cpu")
    peak = measured(running)["int8"]["peak_rss"]
    assert abs(predicted.peak_bytes - peak) <= 0.15 * peak, (predicted.peak_bytes / 2**20, peak / 2**20)
    h, f, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["hidden_size"] // 2  # 2 of 4 KV heads
    linear = CONFIG["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * f)
    # the blocks' Linear weights in 1 + 4/256 bytes instead of 4, everything else as in fp32
    saved = fp32.totals["weights"] - predicted.totals["weights"]
    assert abs(saved - linear * (3 - 4 / 256)) <= 4096, (saved, linear)


# LoRA adapters, alone and on a frozen 4/8-bit bitsandbytes base (model.quantize): traced on fake tensors with
# peft's own layers and bitsandbytes' own autograd functions (lowmem.planner.fake_base)
LORA = "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj, down_proj]}"
NF4 = "model.quantize={bits: 4, type: nf4, double_quant: true}"
BASES = {"bf16": [], "nf4": [NF4], "fp4": ["model.quantize={bits: 4, type: fp4}"], "int8": ["model.quantize={bits: 8}"]}


def held_bytes(model) -> int:
    """Bytes of every distinct storage a built model holds: parameters, buffers, and bitsandbytes' quantization
    constants (a ``Params4bit``'s ``quant_state``, an ``Int8Params``' row scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        if getattr(getattr(module, "weight", None), "SCB", None) is not None:  # an Int8Params
            tensors.append(module.weight.SCB)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("base", BASES)
def test_lora_parts_are_exact(tmp_path, base):
    """Weights (codes, constants, the fp32 norms and embeddings peft's k-bit preparation makes), adapter gradients
    and their AdamW state: the traced bytes equal the real model's and step's."""
    recipe = make_recipe(tmp_path, "model.dtype=bfloat16", LORA, *BASES[base], config=SMALL, seq=32)
    assert with_overrides(recipe, []) == recipe  # a dumped recipe loads again (8-bit: 4-bit options at defaults)
    _, predicted = trace_step(recipe, model_config(recipe.model))
    real = measure_in_process(recipe)
    model = load_model(recipe.model)
    assert predicted == {**real, "weights": held_bytes(model)}


def test_quantized_lora_peak_rss_within_15_percent(tmp_path):
    recipe = make_recipe(tmp_path, "model.dtype=bfloat16", LORA, NF4, config=CONFIG)
    running = start_fresh_processes(tmp_path, {"nf4": recipe})
    predicted = plan(recipe, "cpu")
    peak = measured(running)["nf4"]["peak_rss"]
    assert abs(predicted.peak_bytes - peak) <= 0.15 * peak, (predicted.peak_bytes / 2**20, peak / 2**20)
