"""The planner traces the trainer's own step objects (issue 19): the recipe's objective (candidate
classification included), gradient accumulation, and a zeroth-order step's eval mode and fp32 forwards.

* the parameter, gradient and optimizer-state bytes of a classification step equal the real tensors';
* ``plan(...)`` is within 15% of the peak RSS measured in a fresh process (``python -m
  lowmem.tools.measure``) for a classification recipe (first and zeroth order) and a ``grad_accum: 2``
  recipe, the tolerance of tests/test_planner.py;
* a zeroth-order trace runs as the trainer does: eval mode, no autocast under ``mixed_precision: bf16``.
"""

from __future__ import annotations

import pytest

from lowmem.planner import model_config, plan, trace_step
from lowmem.steps import ZerothOrderStep
from tests.test_planner import MEDIUM, SMALL, make_recipe, measure_in_process, measured, start_fresh_processes

CLS = ["data.task=classification",
       "data.classification={candidates: {a: ' business', b: ' sport', c: ' technology', d: ' politics'}}"]
PEAK_CONFIG = {**MEDIUM, "hidden_size": 512, "num_hidden_layers": 6, "vocab_size": 32000, "intermediate_size": 1376}


@pytest.mark.parametrize("optim", ["adamw", "mezo"])
def test_classification_parts_are_exact(tmp_path, monkeypatch, optim):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    recipe = make_recipe(tmp_path, *CLS, f"optim.name={optim}", config=SMALL, seq=32)
    _, predicted = trace_step(recipe, model_config(recipe.model))
    assert predicted == measure_in_process(recipe)


def test_classification_and_accumulation_peaks_within_15_percent(tmp_path):
    recipes = {name: make_recipe(tmp_path, *overrides, config=PEAK_CONFIG) for name, overrides in [
        ("classification", [*CLS]), ("classification_mezo", [*CLS, "optim.name=mezo"]),
        ("grad_accum", ["train.grad_accum=2"])]}
    running = start_fresh_processes(tmp_path, recipes)
    predicted = {name: plan(recipe, "cpu", suggest=False).peak_bytes for name, recipe in recipes.items()}
    for name, report in measured(running).items():
        peak = report["peak_rss"]
        assert abs(predicted[name] - peak) <= 0.15 * peak, (name, predicted[name] / 2**20, peak / 2**20)


def test_classification_is_planned_on_its_own_objective(tmp_path):
    """Four candidates per example: a zeroth-order classification step runs 4x the rows of the LM step
    with the same batch size, and its activations at the peak are larger than the LM step's."""
    lm = make_recipe(tmp_path, "optim.name=mezo", config=SMALL, seq=64)
    cls = make_recipe(tmp_path, *CLS, "optim.name=mezo", config=SMALL, seq=64)
    config = model_config(lm.model)
    assert trace_step(cls, config)[0]["activations"] > trace_step(lm, config)[0]["activations"]


def test_zeroth_order_trace_runs_in_eval_mode_without_autocast(tmp_path, monkeypatch):
    """The old trace re-entered autocast in the zeroth-order closure and kept the model in train mode."""
    seen = []
    original = ZerothOrderStep.step

    def spy(self, micro_batch):
        batch = micro_batch(0)
        original_loss = self.loss_fn

        def loss_fn(model, b):
            seen.append((model.training, __import__("torch").is_autocast_enabled("cpu")))
            return original_loss(model, b)

        self.loss_fn = loss_fn
        return original(self, lambda micro: batch)

    monkeypatch.setattr(ZerothOrderStep, "step", spy)
    fp32 = make_recipe(tmp_path, "optim.name=mezo", config=SMALL, seq=32)
    bf16 = make_recipe(tmp_path, "optim.name=mezo", "train.mixed_precision=bf16", config=SMALL, seq=32)
    config = model_config(fp32.model)
    assert trace_step(bf16, config)[0] == trace_step(fp32, config)[0]
    assert seen and all(mode == (False, False) for mode in seen)
