"""``--plan`` for a first-order offloaded run: the predicted peak RSS of its steps on a CPU device is
within 15% of the measured one (fresh processes; host and NVMe tiers, AdamW and APOLLO-Mini), and a
GPU plan keeps the blocks' states and all but ``prefetch_depth + 1`` blocks off the device."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from lowmem.planner import format_plan, plan
from tests.test_planner import MEDIUM, make_recipe

CONFIG = {**MEDIUM, "hidden_size": 512, "num_hidden_layers": 6, "vocab_size": 32000, "intermediate_size": 1376}
OFFLOAD = ["optim.max_grad_norm=null", "offload.enabled=true"]


def test_peak_rss_of_offloaded_steps_within_15_percent(tmp_path):
    recipes = {"host": make_recipe(tmp_path, *OFFLOAD, config=CONFIG),
               "nvme": make_recipe(tmp_path, *OFFLOAD, "offload.host_memory_budget_gb=0.01",
                                   f"offload.nvme_dir={tmp_path / 'nvme'}", config=CONFIG),
               "apollo_mini": make_recipe(tmp_path, *OFFLOAD, "optim.name=apollo_mini", config=CONFIG)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    running = {}
    for name, recipe in recipes.items():  # one fresh process each (RSS is per process)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe.model_dump()))
        running[name] = subprocess.Popen([sys.executable, "-m", "lowmem.tools.measure", str(path), "--offload"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    predicted = {name: plan(recipe, "cpu") for name, recipe in recipes.items()}
    for name, proc in running.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        report = json.loads(out.strip().splitlines()[-1])
        peak, p = report["peak_rss"], predicted[name]
        assert p.host_rss_bytes == p.peak_bytes
        assert abs(p.peak_bytes - peak) <= 0.15 * peak, (name, p.peak_bytes / 2**20, peak / 2**20)
        assert set(report["tiers"]["masters"]) == ({"nvme"} if name == "nvme" else {"host"})
    assert "host (offloaded blocks)" in format_plan(predicted["nvme"])


@pytest.mark.parametrize("depth", [1, 2])
def test_gpu_plan_holds_resident_parts_and_a_few_blocks(tmp_path, depth):
    config = {**CONFIG, "num_hidden_layers": 12}
    off = make_recipe(tmp_path, *OFFLOAD, f"offload.prefetch_depth={depth}", "model.dtype=bfloat16", config=config)
    full = make_recipe(tmp_path, "optim.max_grad_norm=null", "model.dtype=bfloat16", config=config)
    p, whole = plan(off, "cuda"), plan(full, "cuda")
    block = (whole.totals["weights"] - p.parts["weights"]) / (config["num_hidden_layers"] - 1)  # bf16 block bytes
    assert p.parts["runtime"] == 0 and p.host_rss_bytes > sum(p.host_parts.values())
    assert p.totals["weights"] == whole.totals["weights"] and p.totals["gradients"] == whole.totals["gradients"]
    # depth + 1 device slots in bf16 (one counted in the traced weights) + fp32 staging for each
    assert p.parts["transfer_buffers"] == pytest.approx(depth * block + (depth + 1) * 2 * block, rel=0.02)
    assert p.peak_bytes < 0.6 * whole.peak_bytes
    # the blocks' AdamW moments are stepped on fp32 masters: twice the bytes of a bf16 in-memory run's
    in_blocks = whole.totals["optimizer_states"] - p.parts["optimizer_states"]
    assert p.host_parts["host_states"] == pytest.approx(2 * in_blocks, rel=1e-3)


def test_plan_follows_accumulation_swapping_and_embeddings(tmp_path):
    """Each switch moves exactly its bytes: gradient sums on the host (grad_accum > 1), swapped block
    inputs from the device to the host, the embedding's fp32 master and AdamW state off the device.
    Batch 8 x 512: the backward (logits, kept block inputs) is the device's peak, not the
    embedding's AdamW step after it."""
    from lowmem.planner import with_overrides

    base = make_recipe(tmp_path, *OFFLOAD, "offload.offload_embeddings=off", config=CONFIG, batch=8, seq=512)
    n, boundary = CONFIG["num_hidden_layers"], 8 * 512 * CONFIG["hidden_size"] * 4  # fp32
    p0 = plan(base, "cuda")
    w32 = p0.host_parts["host_masters"] // n
    acc, swap, emb = (plan(with_overrides(base, [o]), "cuda") for o in
                      ["train.grad_accum=2", "offload.swap_activations=on", "offload.offload_embeddings=auto"])
    assert acc.host_parts["host_buffers"] - p0.host_parts["host_buffers"] == n * w32
    assert p0.parts["activations"] - swap.parts["activations"] == (n - 1) * boundary
    assert swap.host_parts["host_buffers"] - p0.host_parts["host_buffers"] == (n - 1) * boundary
    embedding = CONFIG["vocab_size"] * CONFIG["hidden_size"]  # tied, larger than a block: auto moves it alone
    assert emb.host_parts["host_masters"] - p0.host_parts["host_masters"] == 4 * embedding
    moments = pytest.approx(2 * 4 * embedding, abs=8)  # AdamW m, v (and torch's 4-byte step tensor)
    assert p0.parts["optimizer_states"] - emb.parts["optimizer_states"] == moments
    assert emb.host_parts["host_states"] - p0.host_parts["host_states"] == moments
