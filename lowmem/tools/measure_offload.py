"""Measure steps of an offloaded run in this process (first-order, or ZO2 for a zeroth-order optimizer) (``python -m lowmem.tools.measure
RECIPE.yaml --offload [--steps N] [--inmemory | --forward]``): peak RSS while stepping, step times, tiers.

The model is built and the engine set up first (loading holds the whole model once, as any run
does); the kernel's RSS high-water mark is then reset (``/proc/self/clear_refs``), so the reported
``peak_rss`` is the steps' own, the number :mod:`lowmem.planner.first_order` predicts. ``--inmemory``
takes the same steps with in-memory layer-wise training, ``--forward`` one no-grad forward of the
whole model in memory (the comparisons the benchmarks make).
"""

from __future__ import annotations

import time

from lowmem.build import build_optimizer, lm_loss, no_grad_forward, sample_batch
from lowmem.memory import current_rss_bytes, reset_peak_rss, state_bytes, window_peak_rss_bytes
from lowmem.models import load_model
from lowmem.offload.engine import ZO2Engine
from lowmem.offload.firstorder import FirstOrderEngine
from lowmem.steps.layerwise import LayerwiseOptimizer


def forward_peak(recipe) -> dict:
    """Peak RSS of one no-grad forward of the whole model held in memory (after loading it)."""
    model = load_model(recipe.model)
    batch = sample_batch(recipe, model.config.vocab_size)
    reset_peak_rss()
    t0 = time.perf_counter()
    no_grad_forward(recipe, model, batch)
    return {"peak_rss": window_peak_rss_bytes(), "forward_s": time.perf_counter() - t0}


def measure(recipe, steps: int = 2, inmemory: bool = False) -> dict:
    baseline = current_rss_bytes()
    model = load_model(recipe.model).train()
    optimizer, _ = build_optimizer(recipe, model)
    loss_fn = lm_loss(recipe.train)
    engine = None
    zeroth_order = getattr(optimizer, "zeroth_order", False)
    if inmemory:
        optimizer = LayerwiseOptimizer(optimizer)
    elif zeroth_order:
        engine = ZO2Engine(model.eval(), optimizer, recipe.offload, device="cpu")
    else:
        engine = FirstOrderEngine(model, optimizer, recipe.offload, device="cpu")
    batch = sample_batch(recipe, model.config.vocab_size)
    reset_peak_rss()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if zeroth_order and engine is not None:
            loss = engine.step(batch)
        elif engine is not None:
            loss, _ = engine.step(lambda: loss_fn(model, batch))
        else:
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {"baseline_rss": baseline, "peak_rss": window_peak_rss_bytes(), "step_s": times, "losses": losses,
           "state_bytes_in_memory": state_bytes(optimizer)}
    if zeroth_order and engine is not None:
        out["tiers"] = {"blocks": engine.store.tiers}
    elif engine is not None:
        out["tiers"] = {"masters": engine.store.tiers, "states": [engine.states.tiers.get(k) for k in
                                                                  range(len(engine.packed))]}
        engine.close()
    return out
