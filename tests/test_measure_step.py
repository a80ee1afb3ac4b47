"""``lowmem.tools.measure.measure_step`` measures the recipe's step as the trainer runs it: WTA-CRS and
lean modules applied (issue #18: the peak-memory table's WTA-CRS rows measured plain AdamW)."""

from __future__ import annotations

import lowmem.tools.measure as measure
from lowmem.activations import lean
from lowmem.activations.swap import ORIGINAL_CLASS
from tests.test_planner import SMALL, make_recipe


def test_measure_step_applies_wta_crs_and_lean(tmp_path, monkeypatch):
    seen = {}
    original = measure.recipe_step

    def spy(recipe, model, *args, **kwargs):
        seen["sampled"] = sum(type(m) in ORIGINAL_CLASS for m in model.modules())
        seen["lean"] = sum(type(m) in lean._ORIGINAL for m in model.modules())
        return original(recipe, model, *args, **kwargs)

    monkeypatch.setattr(measure, "recipe_step", spy)
    recipe = make_recipe(tmp_path, "activations.wta_crs={keep_ratio: 0.3}", "activations.lean=true",
                         config=SMALL, seq=32)
    out = measure.measure_step(recipe)
    assert seen["sampled"] >= SMALL["num_hidden_layers"] and seen["lean"] > 0
    assert out["state_bytes"] > 0 and out["grad_bytes"] > 0
    plain = make_recipe(tmp_path, config=SMALL, seq=32)
    measure.measure_step(plain)
    assert seen["sampled"] == 0 and seen["lean"] == 0
