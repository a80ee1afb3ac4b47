"""How a recipe steps is decided once (issue 28 item 3): exactly one step class applies to every
recipe, and what a way of stepping refuses is its class's ``check``, which the recipe's validator asks."""

from __future__ import annotations

import itertools

import pytest

import lowmem.steps as steps
from lowmem.optim.registry import get_spec
from lowmem.recipe import RecipeError, recipe_from_dict
from lowmem.steps import (FirstOrderOffloadStep, FirstOrderStep, FSDP2Step, FSDP2ZerothOrderStep, LayerwiseStep,
                          ZerothOrderStep, ZO2Step, step_class)

TREE = {"model": {"config": {"model_type": "llama"}, "tokenizer": "bytes"}, "data": {"path": "corpus"},
        "train": {"steps": 1}, "output": {"dir": "run"}}


def recipe(**sections):
    return recipe_from_dict({**TREE, **sections})


# (zeroth order, optim.layerwise, offload.enabled) -> the one class that applies
EXPECTED = {(False, False, False): FirstOrderStep, (False, True, False): LayerwiseStep,
            (False, False, True): FirstOrderOffloadStep, (False, True, True): FirstOrderOffloadStep,
            (True, False, False): ZerothOrderStep, (True, True, False): ZerothOrderStep,
            (True, False, True): ZO2Step, (True, True, True): ZO2Step}


@pytest.mark.parametrize("distributed", ["ddp", "fsdp2"])
@pytest.mark.parametrize("zeroth_order, layerwise, offload", list(itertools.product((False, True), repeat=3)))
def test_exactly_one_step_class_applies(zeroth_order, layerwise, offload, distributed):
    base = recipe()  # flags set without validation: a refused combination must still find its class
    flagged = base.model_copy(update={"optim": base.optim.model_copy(update={"layerwise": layerwise}),
                                      "offload": base.offload.model_copy(update={"enabled": offload}),
                                      "train": base.train.model_copy(update={"distributed": distributed})})
    applying = [cls for cls in steps.STEPS if cls.applies(flagged, zeroth_order)]
    # FSDP2 has one class per kind of optimizer; its check refuses layer-wise mode and offload
    expected = EXPECTED[zeroth_order, layerwise, offload] if distributed == "ddp" else \
        (FSDP2ZerothOrderStep if zeroth_order else FSDP2Step)
    assert applying == [expected]
    assert step_class(flagged, zeroth_order) is applying[0]


def test_an_overlapping_registry_is_refused(monkeypatch):
    class AlsoFirstOrder(FirstOrderStep):
        name = "also_first_order"

    monkeypatch.setattr(steps, "STEPS", [*steps.STEPS, AlsoFirstOrder])
    with pytest.raises(RuntimeError, match="2 step classes apply .*FirstOrderStep, AlsoFirstOrder"):
        step_class(recipe(), zeroth_order=False)


@pytest.mark.parametrize("sections, field", [
    ({"optim": {"name": "mezo", "layerwise": True, "max_grad_norm": None}}, "optim.layerwise: zeroth-order"),
    ({"optim": {"name": "mezo"}, "train": {"steps": 1, "grad_accum": 2}}, "train.grad_accum: zeroth-order"),
    ({"optim": {"name": "mezo"}, "train": {"steps": 1, "grad_accum": 2}, "offload": {"enabled": True}},
     "train.grad_accum: zeroth-order"),
    ({"optim": {"layerwise": True}}, "optim.layerwise: gradient clipping"),
    ({"offload": {"enabled": True}}, "optim.max_grad_norm: the first-order offload engine"),
    ({"optim": {"name": "mezo"}, "offload": {"enabled": True, "host_dtype": "float32"},
      "model": {**TREE["model"], "dtype": "bfloat16"}}, "offload.host_dtype: float32 is not coarser"),
])
def test_the_recipe_refuses_what_its_step_class_refuses(sections, field):
    with pytest.raises(RecipeError, match=field):
        recipe_from_dict({**TREE, **sections})


def test_the_refusal_is_the_step_classes_own():
    base = recipe()
    unchecked = base.model_copy(update={"optim": base.optim.model_copy(update={"name": "mezo"}),
                                        "train": base.train.model_copy(update={"grad_accum": 2})})
    cls = step_class(unchecked, get_spec("mezo").zeroth_order)
    with pytest.raises(ValueError, match="^train.grad_accum: zeroth-order optimizers take one batch"):
        cls.check(unchecked)


def test_every_step_class_names_a_memory_model_of_the_planner():
    """The planner predicts a step's peak with the model its class declares (``Step.memory_plan``), so a new
    way of stepping is one class: it must name a model the planner has."""
    from lowmem.planner.plan import MEMORY_MODELS

    assert {cls.memory_plan for cls in steps.STEPS} <= MEMORY_MODELS.keys()
