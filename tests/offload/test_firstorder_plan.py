"""``--plan`` for a first-order offloaded run against measurement: the predicted peak RSS of its steps
on a CPU device is within 15% of the measured one (fresh processes; host and NVMe tiers, AdamW and
APOLLO-Mini); each part the plan moves between device and host (mover slots and staging, fp32
masters and states on the host, gradient sums, swapped activations, offloaded embeddings) is the
number of bytes the engine really allocates for it, read off a real engine on a small model (the
layout does not depend on size); and a GPU plan keeps the blocks off the device."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from lowmem.models import load_model
from lowmem.offload.firstorder import FirstOrderEngine
from lowmem.optim import create_optimizer
from lowmem.planner import format_plan, plan, with_overrides
from lowmem.build import sample_batch
from tests.test_planner import MEDIUM, make_recipe

CONFIG = {**MEDIUM, "hidden_size": 512, "num_hidden_layers": 6, "vocab_size": 32000, "intermediate_size": 1376}
OFFLOAD = ["optim.max_grad_norm=null", "offload.enabled=true"]
# the engine measured in process: small, its embedding (4096 x 256) larger than a block, so that
# offload_embeddings=auto moves it
SMALL = {**MEDIUM, "num_hidden_layers": 3, "vocab_size": 4096}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _engine(recipe) -> FirstOrderEngine:
    """The engine a run of ``recipe`` sets up, on a CPU "device" (AdamW: its groups do not change a state's size)."""
    model = load_model(recipe.model).train()
    return FirstOrderEngine(model, create_optimizer(model, "adamw", lr=1e-3), recipe.offload, device="cpu")


def _states(eng: FirstOrderEngine, params) -> int:
    """Bytes of the optimizer state of ``params`` (in memory: the host tier)."""
    return _nbytes(v for p in params for v in eng.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor))


def _step(eng: FirstOrderEngine, recipe, micro_batches: int = 1, during=None) -> None:
    """One step; ``during(eng, m)`` runs after micro-batch ``m``'s forward (and, from the second on, once
    the host holds the sums of the ones before)."""
    batch = sample_batch(recipe, eng.model.config.vocab_size)

    def closure(m):
        if m:
            eng.barrier()
        loss = eng.model(**batch).loss
        if during is not None:
            during(eng, m)
        return loss

    _, nonfinite = eng.step([lambda m=m: closure(m) for m in range(micro_batches)])
    assert not nonfinite


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
        assert abs(p.peak_bytes - peak) <= 0.15 * peak, (name, p.peak_bytes / 2**20, peak / 2**20)
        assert set(report["tiers"]["masters"]) == ({"nvme"} if name == "nvme" else {"host"})
    assert "host (offloaded blocks)" in format_plan(predicted["nvme"])


def test_gpu_plan_keeps_the_blocks_off_the_device(tmp_path):
    config = {**MEDIUM, "num_hidden_layers": 8, "vocab_size": 4096}
    off = make_recipe(tmp_path, *OFFLOAD, "model.dtype=bfloat16", config=config)
    full = make_recipe(tmp_path, "optim.max_grad_norm=null", "model.dtype=bfloat16", config=config)
    p, whole = plan(off, "cuda"), plan(full, "cuda")
    assert p.parts["runtime"] == 0 and p.host_rss_bytes > sum(p.host_parts.values())
    assert p.peak_bytes < 0.6 * whole.peak_bytes


@pytest.mark.parametrize("depth", [1, 2])
def test_gpu_plan_parts_are_what_the_engine_allocates(tmp_path, depth):
    """bf16 training: the mover's slots (bf16) and fp32 staging, the fp32 masters and the blocks'
    AdamW moments on fp32 masters, as the engine holds them after one step."""
    recipe = make_recipe(tmp_path, *OFFLOAD, f"offload.prefetch_depth={depth}", "model.dtype=bfloat16",
                         "offload.offload_embeddings=off", config=SMALL, batch=2, seq=32)
    p = plan(recipe, "cuda")
    eng = _engine(recipe)
    _step(eng, recipe)
    block_bf16 = eng.packed[0].numel * 2
    slots = _nbytes(eng.mover.slots + (eng.mover.staging or []))
    assert len(eng.mover.slots) == depth + 1
    # one slot is the block the trace already holds on the device
    assert p.parts["transfer_buffers"] + block_bf16 == pytest.approx(slots, rel=0.02)
    assert p.host_parts["host_masters"] == pytest.approx(eng.store.ram_bytes, rel=0.02)
    in_blocks = [q for pk in eng.packed for q in pk.params]
    assert p.host_parts["host_states"] == pytest.approx(_states(eng, in_blocks), rel=1e-3)
    assert p.parts["optimizer_states"] == pytest.approx(_states(eng, eng.resident), abs=64)
    eng.close()


def test_plan_follows_accumulation_swapping_and_embeddings(tmp_path):
    """Each switch moves exactly the bytes the engine holds for it: the gradient sums on the host
    (grad_accum > 1), the swapped block inputs (from the device to the host), the embedding's fp32
    master and AdamW state off the device."""
    # batch 4 x 128: the backward (logits, kept block inputs) is the device's peak, not the step after it
    base = make_recipe(tmp_path, *OFFLOAD, "offload.offload_embeddings=off", config=SMALL, batch=4, seq=128)
    p0 = plan(base, "cuda")
    acc, swap, emb = (with_overrides(base, [o]) for o in
                      ["train.grad_accum=2", "offload.swap_activations=on", "offload.offload_embeddings=auto"])
    held = {}

    eng = _engine(acc)  # the gradient sums held between micro-batches
    _step(eng, acc, 2, during=lambda e, m: held.setdefault("sums", _nbytes(t for s in e.host.accum.values()
                                                                           for t in s)) if m else None)
    eng.close()
    assert plan(acc, "cuda").host_parts["host_buffers"] - p0.host_parts["host_buffers"] == held["sums"]

    eng = _engine(swap)  # the block inputs on the host after the forward
    _step(eng, swap, during=lambda e, m: held.setdefault("swapped", _nbytes(h for h, _ in e.driver.swapped.values())))
    eng.close()
    ps = plan(swap, "cuda")
    assert held["swapped"] > 0
    assert p0.parts["activations"] - ps.parts["activations"] == held["swapped"]
    assert ps.host_parts["host_buffers"] - p0.host_parts["host_buffers"] == held["swapped"]

    eng = _engine(emb)  # the embedding's master in its store, its AdamW state after a step
    _step(eng, emb)
    assert eng.big_params and set(eng.big.store.tiers) == {"host"} and len(eng.big.store.tiers) > 1  # row chunks
    master, state = eng.big.store.ram_bytes, _states(eng, eng.big_params)
    eng.close()
    pe = plan(emb, "cuda")
    assert pe.host_parts["host_masters"] - p0.host_parts["host_masters"] == master
    assert p0.parts["optimizer_states"] - pe.parts["optimizer_states"] == state
    assert pe.host_parts["host_states"] - p0.host_parts["host_states"] == state
