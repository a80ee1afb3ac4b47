"""Measure the per-rank peak of FSDP2 steps (``train.distributed: fsdp2``) and print JSON on rank 0.

``torchrun --nproc_per_node N -m lowmem.tools.measure_fsdp RECIPE.yaml [...] [--steps K]``: for each recipe
in turn, each rank builds its model, the trainer's step object under accelerate's process group (which shards it with
``fully_shard``, :mod:`lowmem.fsdp`), resets its RSS high-water mark, takes ``K`` steps (default 2:
the second step's backward holds the state the first made) on :func:`lowmem.build.sample_batch` and
reports its peak RSS; rank 0 prints a line ``{"peak_rss": [per rank], "baseline_rss": [per rank]}`` per
recipe, what :func:`lowmem.planner.plan_fsdp2` predicts. The baseline is each rank's RSS after its imports.
On a CPU (gloo); with ``fix_malloc_threshold`` a recipe's freed tensors leave before the next one's.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
import torch.distributed as dist

from lowmem.memory import current_rss_bytes, fix_malloc_threshold, reset_peak_rss, window_peak_rss_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    fix_malloc_threshold()  # as lowmem-train: freed tensors leave the process
    from lowmem.fsdp import teardown
    from lowmem.recipe import load_recipe

    for path in args.recipes:
        measure(load_recipe(path, ["train.distributed=fsdp2"]), args.steps)
    teardown(False)
    dist.destroy_process_group()


def measure(recipe, steps: int) -> None:
    """One recipe's steps on this rank; rank 0 prints every rank's peak."""
    from accelerate import Accelerator

    from lowmem.build import build_step, sample_batch
    from lowmem.models import load_model

    baseline = current_rss_bytes()
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    model = load_model(recipe.model)
    stepper = build_step(recipe, model, accelerator)  # shards the model (FSDP2Step.setup)
    batch = sample_batch(recipe, model.config.vocab_size)
    reset_peak_rss()
    for _ in range(steps):
        stepper.step(lambda micro: batch)
    mine = torch.tensor([window_peak_rss_bytes(), baseline], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if dist.get_rank() == 0:
        print(json.dumps({"peak_rss": [int(t[0]) for t in every], "baseline_rss": [int(t[1]) for t in every]}))
    del stepper, model, batch
    gc.collect()


if __name__ == "__main__":
    main()
