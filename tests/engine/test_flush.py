"""The trainer honours the step contract's ``flush`` (issue 28): deferred work (ZO2's pending update) is
applied before every evaluation reads the weights, through the step object, not inside one engine."""

from __future__ import annotations

from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer


def test_every_evaluation_flushes_the_step_first(tiny_recipe):
    trainer = Trainer(load_recipe(tiny_recipe(train={"steps": 2, "eval_every": 1, "checkpoint_every": 0})),
                      progress=False)
    stepper, calls = trainer.run.stepper, []
    real_flush, real_evaluate = stepper.flush, stepper.evaluate

    def flush():
        calls.append("flush")
        real_flush()

    def evaluate(batch):
        calls.append("evaluate")
        return real_evaluate(batch)

    stepper.flush, stepper.evaluate = flush, evaluate
    trainer.evaluate()
    assert calls[0] == "flush" and calls.count("flush") == 1 and calls.count("evaluate") >= 1
