"""The noise's scratch buffer of an in-memory zeroth-order step (lowmem.optim.zo_noise.release_scratch,
issue 27): held while the step perturbs (the planner's trace counts it in the step's peak) and dropped when
the step ends, so the eval and the save -- planned as the forward + state, the weights + the largest
tensor -- do not hold a buffer the size of the largest parameter."""

from __future__ import annotations

import torch

import lowmem.optim.zo_noise as zo_noise
from lowmem.build import recipe_step, sample_batch
from lowmem.models import load_model
from lowmem.planner.plan import model_config
from lowmem.planner.trace import trace_step
from lowmem.recipe import recipe_from_dict

CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 64}
RECIPE = recipe_from_dict({"model": {"config": CONFIG, "tokenizer": "bytes"}, "data": {"path": "corpus"},
                           "optim": {"name": "mezo", "lr": 1e-3}, "train": {"steps": 1, "batch_size": 1, "seq_len": 8},
                           "output": {"dir": "run"}})


def test_the_step_draws_into_a_scratch_buffer_and_drops_it_when_it_ends():
    model = load_model(RECIPE.model)
    stepper, zeroth_order = recipe_step(RECIPE, model)
    drawn = []
    scratch = zo_noise._scratch

    def recorded(like):
        drawn.append(like.numel())
        return scratch(like)

    zo_noise._scratch = recorded
    try:
        stepper.step(lambda micro: sample_batch(RECIPE, CONFIG["vocab_size"]))
    finally:
        zo_noise._scratch = scratch
    largest = max(p.numel() for p in model.parameters())
    assert zeroth_order and max(drawn) == largest  # the embedding's z went through the scratch
    assert not getattr(zo_noise._local, "lowmem_noise_scratch", None)  # and nothing stays after the step


def test_the_plan_counts_the_scratch_in_the_step_but_not_in_the_forward():
    config = model_config(RECIPE.model)
    step, _ = trace_step(RECIPE, config)
    forward, _ = trace_step(RECIPE, config, forward_only=True)
    embedding = CONFIG["vocab_size"] * CONFIG["hidden_size"] * torch.float32.itemsize
    assert step["activations"] - forward["activations"] >= embedding
