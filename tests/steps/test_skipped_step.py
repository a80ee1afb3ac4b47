"""What a skipped step leaves untouched (issue 28; lowmem.steps.base): a non-finite gradient skips a
first-order step with every weight as it was, while the layer-wise step, which updates inside
backward, leaves only the parameter whose gradient was non-finite untouched."""

from __future__ import annotations

import math

import torch

from lowmem.build import recipe_step, sample_batch
from lowmem.models import load_model
from lowmem.recipe import recipe_from_dict

CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}


def _step_with_nan_gradient(layerwise: bool):
    recipe = recipe_from_dict({"model": {"config": CONFIG, "tokenizer": "bytes"}, "data": {"path": "corpus"},
                               "optim": {"name": "adamw", "lr": 1e-2, "layerwise": layerwise,
                                         "max_grad_norm": None if layerwise else 1.0},
                               "train": {"steps": 1, "batch_size": 2, "seq_len": 16}, "output": {"dir": "run"}})
    model = load_model(recipe.model)
    stepper, _ = recipe_step(recipe, model)
    bad = model.model.layers[0].mlp.up_proj.weight  # its gradient made NaN before it accumulates
    bad.register_hook(lambda g: torch.full_like(g, math.nan))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = sample_batch(recipe, CONFIG["vocab_size"])
    loss, _ = stepper.step(lambda micro: batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return loss, changed, stepper


def test_first_order_skip_leaves_every_weight_and_the_state():
    loss, changed, stepper = _step_with_nan_gradient(layerwise=False)
    assert math.isnan(loss) and changed == set()
    assert not stepper.inner_optimizer.state  # no moment was created either


def test_layerwise_skip_leaves_only_the_parameter_with_the_non_finite_gradient():
    loss, changed, stepper = _step_with_nan_gradient(layerwise=True)
    assert math.isnan(loss)
    assert "model.layers.0.mlp.up_proj.weight" not in changed
    assert "model.layers.1.mlp.up_proj.weight" in changed  # updated inside backward before the NaN arrived
    bad = dict(stepper.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert bad not in stepper.inner_optimizer.state  # its optimizer state untouched as well
