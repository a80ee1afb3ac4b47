"""Every way of stepping makes a real optimizer step before the trainer's LR scheduler steps: torch warns
"lr_scheduler.step() before optimizer.step()" otherwise (pytorch/pytorch#20124), and for the offload
engines, which step the weights themselves, that warning would be false (issue 28). The schedule is the
recipe's own: the LR after one step is ``lr * lr_factor(1)``."""

from __future__ import annotations

import warnings

import pytest

from lowmem.build import build_scheduler, build_step, lr_factor, sample_batch
from lowmem.models import load_model
from lowmem.recipe import recipe_from_dict
from lowmem.steps import OneProcess

CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}
OPTIM = {"mezo": {"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}}, "adamw": {"name": "adamw", "lr": 1e-3, "max_grad_norm": None}}


@pytest.mark.parametrize("optim, offload", [("mezo", True), ("adamw", True), ("mezo", False), ("adamw", False)])
def test_scheduler_steps_after_an_optimizer_step_without_warning(optim, offload):
    recipe = recipe_from_dict({"model": {"config": CONFIG, "tokenizer": "bytes"}, "data": {"path": "corpus"},
                               "optim": OPTIM[optim], "offload": {"enabled": offload},
                               "train": {"steps": 4, "warmup_steps": 2, "batch_size": 2, "seq_len": 16},
                               "output": {"dir": "run"}})
    stepper = build_step(recipe, load_model(recipe.model), OneProcess())
    scheduler = build_scheduler(stepper.inner_optimizer, recipe.train)
    batch = sample_batch(recipe, CONFIG["vocab_size"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            stepper.step(lambda micro: batch)
            scheduler.step()
        lr = stepper.optimizer.param_groups[0]["lr"]  # the LR the stepped optimizer (the engine's) reads
    finally:
        stepper.close()
    assert lr == 1e-3 * lr_factor(1, kind=recipe.train.lr_schedule, warm=2, total=4, floor=recipe.train.min_lr_ratio)
