"""Measure a recipe's steps in this process and print JSON: the one measuring command.

``python -m lowmem.tools.measure RECIPE.yaml [--forward]``: one step of the trainer's own step object
(:func:`lowmem.build.recipe_step`: :func:`lowmem.build.build_step` on one process, the recipe's
autocast, offloading off) on the recipe's model and objective (``data.task``: the LM loss, chunked or
not, or candidate classification), with ``train.grad_accum`` micro-batches of
:func:`lowmem.build.sample_batch`; ``--forward``: one no-grad forward instead. The planner's trace
(:mod:`lowmem.planner.trace`) runs the same functions on fake tensors, so it predicts what is
measured here.

``python -m lowmem.tools.measure RECIPE.yaml --offload [--steps N] [--inmemory | --forward]``: steps
of the first-order offload engine set up in this process (:mod:`lowmem.tools.measure_offload`).

The RSS high-water mark is reset after the model is built (``/proc/self/clear_refs``), so the peak
is the step's own, with the model resident; like ``lowmem-train`` it first fixes glibc's mmap
threshold (:func:`lowmem.memory.fix_malloc_threshold`).
"""

from __future__ import annotations

import json
import sys

import torch

from lowmem.activations import apply_activations
from lowmem.build import no_grad_forward, recipe_step, sample_batch
from lowmem.memory import (cuda_peak_bytes, current_rss_bytes, fix_malloc_threshold, reset_peak_rss, state_bytes,
                           tensor_bytes, window_peak_rss_bytes)
from lowmem.models import load_model
from lowmem.recipe import load_recipe


def measure_step(recipe, forward_only: bool = False) -> dict:
    """Build ``recipe``'s model (``model.config`` or loaded, its ``activations`` section applied), take one
    step (or one no-grad forward) and report measured bytes: RSS after the imports (the runtime baseline),
    peak RSS, parameters, gradients (just before the update), optimizer state, the CUDA peak on a GPU."""
    baseline = current_rss_bytes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(recipe.model).to(device)
    apply_activations(model, recipe.activations, recipe.train.seed)  # WTA-CRS, lean modules: as the trainer
    batch = sample_batch(recipe, model.config.vocab_size, device)
    params = {id(p): p for p in model.parameters()}.values()
    out = {"baseline_rss": baseline, "param_bytes": sum(tensor_bytes(p) for p in params), "grad_bytes": 0}
    if forward_only:
        reset_peak_rss()
        no_grad_forward(recipe, model, batch)
    else:
        stepper, _ = recipe_step(recipe, model, device)

        def on_phase(phase: str) -> None:
            if phase == "step":
                out["grad_bytes"] = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)

        stepper.on_phase = on_phase
        reset_peak_rss()
        stepper.step(lambda micro: batch)
        out["state_bytes"] = state_bytes(stepper.inner_optimizer)
    return {**out, "peak_rss": window_peak_rss_bytes(), "cuda_peak": cuda_peak_bytes()}


def main(args: list[str]) -> dict:
    recipe = load_recipe(args[0])
    if "--offload" in args:
        # imported only here: an in-memory measurement holds what a run imports, no engine modules
        from lowmem.tools import measure_offload

        if "--forward" in args:
            return measure_offload.forward_peak(recipe)
        steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 2
        return measure_offload.measure(recipe, steps, "--inmemory" in args)
    return measure_step(recipe, forward_only="--forward" in args)


if __name__ == "__main__":
    fix_malloc_threshold()
    print(json.dumps(main(sys.argv[1:])))
