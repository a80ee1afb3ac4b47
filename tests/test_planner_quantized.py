"""The memory planner on trainable int8 weights (``model.dtype: int8``): the model is traced on fake tensors
as a run builds it (payloads, scales, the per-layer dequantized buffers, the fp32 weight while its update
runs), and the predicted peak RSS is within 15% of a fresh process's measured step."""

from test_planner import LW_GC, MEDIUM, make_recipe, measured, start_fresh_processes

from lowmem.planner import plan

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
