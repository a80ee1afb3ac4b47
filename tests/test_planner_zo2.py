"""The planner's ZO2 device figure counts what the engine allocates: its block slots, staging
buffers and the copy of a tied weight held during the dual forward (issue #18)."""

from __future__ import annotations

import pytest
import torch

from lowmem.memory import tensor_bytes
from lowmem.models import load_model
from lowmem.offload.engine import ZO2Engine
from lowmem.offload.resident import ResidentPerturber
from lowmem.optim import create_optimizer
from lowmem.planner import model_config, plan, zo2_device_buffers
from tests.test_planner import make_recipe

OPT = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 160, "num_hidden_layers": 5, "num_attention_heads": 4,
       "word_embed_proj_dim": 64, "vocab_size": 300, "max_position_embeddings": 128, "tie_word_embeddings": True}


def engine_allocations(recipe, monkeypatch) -> dict[str, int]:
    """The device bytes of a real (CPU) engine: slots, staging buffers, the largest tied copy held."""
    held = [0]
    visit = ResidentPerturber.visit

    def spy(self, *args, **kwargs):
        out = visit(self, *args, **kwargs)
        held[0] = max(held[0], sum(tensor_bytes(c) for _, c, _ in self._held.values()))
        return out

    monkeypatch.setattr(ResidentPerturber, "visit", spy)
    model = load_model(recipe.model)
    opt = create_optimizer(model, "mezo", lr=1e-4, eps=1e-3)
    cfg = recipe.offload  # the engine takes the recipe's section
    eng = ZO2Engine(model, opt, cfg, device="cpu")
    ids = torch.randint(0, OPT["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    eng.step({"input_ids": ids, "labels": ids})
    staging = eng.mover.staging or []
    out = {"slots": sum(tensor_bytes(t) for t in eng.mover.slots), "staging": sum(tensor_bytes(t) for t in staging),
           "tied_copy": held[0]}
    eng.close()
    return out


@pytest.mark.parametrize("dtype,host,depth", [("float32", None, 1), ("float32", "bfloat16", 2),
                                              ("bfloat16", None, 4)])
def test_zo2_device_buffers_equal_the_engine_allocations(tmp_path, monkeypatch, dtype, host, depth):
    recipe = make_recipe(tmp_path, "optim.name=mezo", "offload.enabled=true", f"model.dtype={dtype}",
                         f"offload.prefetch_depth={depth}", *([f"offload.host_dtype={host}"] if host else []),
                         config=OPT)
    predicted = zo2_device_buffers(recipe, model_config(recipe.model))
    measured = engine_allocations(recipe, monkeypatch)
    assert measured["tied_copy"] > 0 and (measured["staging"] > 0) == (host is not None)
    assert {k: predicted[k] for k in measured} == measured


def test_cuda_plan_holds_the_buffers_and_not_the_blocks(tmp_path):
    recipe = make_recipe(tmp_path, "optim.name=mezo", "offload.enabled=true", "offload.host_dtype=bfloat16",
                         config=OPT)
    config = model_config(recipe.model)
    buffers = zo2_device_buffers(recipe, config)
    offloaded = plan(recipe, "cuda", suggest=False)
    in_memory = plan(recipe.model_copy(update={"offload": recipe.offload.model_copy(update={"enabled": False})}),
                     "cuda", suggest=False)
    assert offloaded.parts["transfer_buffers"] == buffers["slots"] + buffers["staging"]
    assert offloaded.parts["weights"] == in_memory.totals["weights"] - buffers["in_blocks"]
    assert offloaded.parts["step_temporaries"] >= buffers["tied_copy"]
