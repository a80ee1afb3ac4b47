"""One step of a recipe, measured: ``python -m lowmem.steps.measure RECIPE.yaml [--forward]`` prints JSON.

The step is the trainer's own step object (:func:`lowmem.steps.make_step`) on the recipe's model,
optimizer and objective (``data.task``: the LM loss, chunked or not, or candidate classification),
with ``train.grad_accum`` micro-batches of :func:`sample_batch`, run through :class:`OneProcess`
(one process, the recipe's autocast). :mod:`lowmem.step_trace` runs the same functions on fake
tensors, so the planner predicts what is measured here. The RSS high-water mark is reset after the model
is built (``/proc/self/clear_refs``), so the peak is the step's own, with the model resident; like ``lowmem-train`` it first fixes glibc's mmap threshold
(:func:`lowmem.memory.fix_malloc_threshold`).
"""

from __future__ import annotations

import json
import sys

import torch

from lowmem.memory import (cuda_peak_bytes, current_rss_bytes, reset_peak_rss, state_bytes, tensor_bytes,
                           window_peak_rss_bytes)
from lowmem.steps import OneProcess, Step, make_step

FILLER = "lorem "  # the text of a planned classification example, long enough to be truncated


def in_memory(recipe):
    """``recipe`` with ``offload.enabled`` off: the step traced for an offloaded ZO2 recipe is MeZO's in memory."""
    return recipe.model_copy(update={"offload": recipe.offload.model_copy(update={"enabled": False})})


def sample_batch(recipe, vocab_size: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A micro-batch of the largest shape ``recipe`` trains on, from a fixed generator: ``data.task: lm`` or
    ``sft`` ``(batch_size, seq_len)`` token ids with labels (packed: position_ids of two documents a row);
    ``classification``: every example's rows filled to
    ``seq_len`` by :func:`lowmem.build.candidate_collator` (the text truncated, the candidates whole)."""
    if recipe.data.task == "classification":
        from lowmem.build import candidate_collator
        from lowmem.models import load_tokenizer

        collator = candidate_collator(recipe, load_tokenizer(recipe.model))
        text = FILLER * recipe.train.seq_len
        examples = [(text, i % len(collator.verbalizers)) for i in range(recipe.train.batch_size)]
        return {k: v.to(device) for k, v in collator(examples).items()}
    gen = torch.Generator().manual_seed(recipe.train.seed)
    shape = (recipe.train.batch_size, recipe.train.seq_len)
    ids = torch.randint(0, vocab_size, shape, generator=gen)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    if recipe.data.packing:  # two documents per row: the model builds its block-diagonal mask, as in training
        batch["position_ids"] = (torch.arange(shape[1]) % (shape[1] // 2 + 1)).expand(shape).to(device)
    return batch


def no_grad_forward(recipe, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The reference every step peak is compared with: one forward without autograd (with the LM loss;
    a classification batch's inputs only)."""
    drop = ("labels", "option_mask") if "option_mask" in batch else ()
    with torch.no_grad(), OneProcess(recipe.train.mixed_precision, batch["input_ids"].device).autocast():
        model(**{k: v for k, v in batch.items() if k not in drop}, use_cache=False)


def recipe_step(recipe, model: torch.nn.Module, device: str = "cpu") -> tuple[Step, bool]:
    """The trainer's step object for ``recipe`` on ``model`` (in memory, one process), and whether it is
    zeroth order: :func:`lowmem.build.build_optimizer` and :func:`lowmem.build.objective` as a run has them."""
    from lowmem.build import build_optimizer, objective

    recipe = in_memory(recipe)
    accelerator = OneProcess(recipe.train.mixed_precision, device)
    optimizer, zeroth_order, _ = build_optimizer(recipe, model, accelerator)
    return make_step(recipe, model, optimizer, zeroth_order, accelerator, *objective(recipe)), zeroth_order


def measure_step(recipe, forward_only: bool = False) -> dict:
    """Build ``recipe``'s model (``model.config`` or loaded, its ``activations`` section applied), take one
    step (or one no-grad forward) and report measured bytes: RSS after the imports (the runtime baseline),
    peak RSS, parameters, gradients (just before the update), optimizer state, the CUDA peak on a GPU."""
    from lowmem.activations import apply_activations
    from lowmem.models import load_model

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


if __name__ == "__main__":
    from lowmem.memory import fix_malloc_threshold

    fix_malloc_threshold()
    from lowmem.recipe import load_recipe

    print(json.dumps(measure_step(load_recipe(sys.argv[1]), forward_only="--forward" in sys.argv[2:])))
