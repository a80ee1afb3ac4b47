"""What is trained: ``model.trainable`` globs and ``model.lora`` (peft) adapters, with a first-order
and a zeroth-order optimizer; a LoRA + MeZO run resumes bit-exactly; peft reloads the saved adapter with
the other trained parameters as the model that was trained."""

import json

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file
from test_trainer import _cli, _losses, whole_and_resumed

from lowmem.build import lm_metrics
from lowmem.model_save import saved_tensors
from lowmem.models import load_model
from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer

pytest.importorskip("peft")

OPTIMS = {"adamw": {"name": "adamw", "lr": 1e-2}, "mezo": {"name": "mezo", "lr": 1e-2, "args": {"eps": 1e-3}}}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _changed_after_training(recipe_path) -> tuple[set[str], set[str]]:
    """(names of parameters that changed, all parameter names) over a short run."""
    trainer = Trainer(load_recipe(recipe_path), progress=False)
    model = trainer.run.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    return {n for n in before if not torch.equal(before[n], after[n].detach())}, set(before)


@pytest.mark.parametrize("optim", OPTIMS)
def test_trainable_globs_train_only_the_matching_parameters(tiny_recipe, optim):
    recipe = tiny_recipe(model={**TINY_MODEL, "trainable": ["*norm*"]}, optim=OPTIMS[optim],
                         train={"steps": 2, "checkpoint_every": 0})
    changed, names = _changed_after_training(recipe)
    norms = {n for n in names if "norm" in n}
    assert norms and changed == norms


@pytest.mark.parametrize("optim", OPTIMS)
def test_lora_trains_only_the_adapters_and_saves_them(tiny_recipe, tmp_path, optim):
    recipe = tiny_recipe(model={**TINY_MODEL, "lora": LORA}, optim=OPTIMS[optim],
                         train={"steps": 2, "checkpoint_every": 0})
    changed, names = _changed_after_training(recipe)
    adapters = {n for n in names if "lora_" in n}
    assert len(adapters) == 2 * 2 * 2  # A and B, q and v, 2 layers
    assert changed == adapters
    saved = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_lora_with_extra_trainable_globs(tiny_recipe):
    recipe = tiny_recipe(model={**TINY_MODEL, "lora": LORA, "trainable": ["*model.norm.weight"]},
                         optim=OPTIMS["mezo"], train={"steps": 1, "checkpoint_every": 0})
    changed, names = _changed_after_training(recipe)
    assert changed == {n for n in names if "lora_" in n or n.endswith("model.norm.weight")}


def assert_peft_reloads_the_trained_model(recipe_path, run_dir) -> None:
    """Train ``recipe_path`` (LoRA with ``model.trainable``), then load its base and saved adapter with
    ``PeftModel.from_pretrained``: the same eval loss (to 1e-6) and the same trained non-adapter tensors,
    which peft holds in its ``modules_to_save`` copies."""
    from peft import PeftModel

    recipe = load_recipe(recipe_path)
    trainer = Trainer(recipe, progress=False)
    summary = trainer.train()
    extra = {n: p for n, p in trainer.run.model.named_parameters() if p.requires_grad and "lora_" not in n}
    base = load_model(recipe.model.model_copy(update={"lora": None, "trainable": None}))
    loaded = PeftModel.from_pretrained(base, run_dir / "model").eval()
    with torch.no_grad():
        losses = [lm_metrics(loaded, batch)["eval_loss"] for batch in trainer.run.eval_batches]
    assert abs(torch.stack(losses).mean().item() - summary["eval_loss"]) <= 1e-6
    assert summary["eval_loss"] != summary["eval_loss_before"]
    weights = dict(loaded.named_parameters())
    for name, p in extra.items():
        owner, leaf = name.rsplit(".", 1)
        assert torch.equal(weights[f"{owner}.modules_to_save.default.{leaf}"], p.detach()), name


TIED = {**TINY_MODEL["config"], "tie_word_embeddings": True}


@pytest.mark.parametrize("model", [{"trainable": ["*norm*"]},
                                   {"config": TIED, "trainable": ["*embed_tokens*", "*model.norm.weight"]}])
def test_saved_adapter_holds_the_trained_parameters(tiny_recipe, tmp_path, model):
    """The norms (tied embeddings: ``lm_head`` saved with ``embed_tokens``) trained beside the adapters."""
    recipe = tiny_recipe(model={**TINY_MODEL, "lora": LORA, **model}, optim=OPTIMS["adamw"],
                         train={"steps": 2, "checkpoint_every": 0})
    assert_peft_reloads_the_trained_model(recipe, tmp_path / "run")


def test_lora_mezo_resume_is_bit_exact(tiny_recipe, tmp_path):
    """LoRA with trained norms: the checkpoint holds both, so the resumed run saves the same adapter and norms."""
    recipe = tiny_recipe(model={**TINY_MODEL, "lora": LORA, "trainable": ["*norm*"]}, optim=OPTIMS["mezo"])
    whole, broken = whole_and_resumed(recipe, tmp_path)
    assert _losses(broken) == _losses(whole)
    a = load_file(whole / "model" / "adapter_model.safetensors")
    b = load_file(broken / "model" / "adapter_model.safetensors")
    assert any("norm" in k for k in a) and any("lora_" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model, message", [
    ({"trainable": ["*nothing_like_this*"]}, "model.trainable: '*nothing_like_this*' matches no parameter"),
    ({"lora": {"target_modules": ["no_such_proj"]}}, "model.lora.target_modules"),
])
def test_bad_selection_is_a_one_line_error(tiny_recipe, model, message):
    proc = _cli(tiny_recipe(model={**TINY_MODEL, **model}), check=False)
    # the last line: importing peft imports bitsandbytes, whose CPU build may log a line of its own
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"lowmem-train: error: {message}")


def test_first_order_offload_refuses_a_subset(tiny_recipe):
    optim = {**OPTIMS["adamw"], "max_grad_norm": None}  # layer-wise rules: no global clipping
    proc = _cli(tiny_recipe(model={**TINY_MODEL, "trainable": ["*norm*"]}, optim=optim, offload={"enabled": True}),
                check=False)
    assert proc.returncode == 2 and "model.trainable: the first-order offload engine" in proc.stderr


def _metrics(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k == "loss" or k.startswith("eval_")} for r in records]


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_offload_trains_a_subset_like_in_memory(tiny_recipe, tmp_path, task):
    """ZO2 (offload.enabled) with model.trainable, on the LM and the candidate-classification objective:
    the same losses, eval metrics and saved weights as in-memory MeZO."""
    data = {"task": "classification", "classification": {"candidates": {"business": " business",
                                                                         "politics": " politics"}}}
    runs = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        recipe = tiny_recipe(f"{offload}.yaml", model={**TINY_MODEL, "trainable": ["*norm*", "*layers.1.mlp*"]},
                             optim=OPTIMS["mezo"], data=data if task == "classification" else {},
                             offload={"enabled": offload}, train={"steps": 3, "checkpoint_every": 0, "eval_every": 3},
                             output={"dir": str(out)})
        Trainer(load_recipe(recipe), progress=False).train()
        runs[offload] = (_metrics(out), saved_tensors(out / "model"))
    (metrics, weights), (metrics_zo2, weights_zo2) = runs[False], runs[True]
    assert metrics_zo2 == metrics and any("eval_loss" in r for r in metrics)
    if task == "classification":
        assert any("eval_accuracy" in r for r in metrics_zo2)
    assert weights.keys() == weights_zo2.keys() and all(torch.equal(weights[k], weights_zo2[k]) for k in weights)


def test_plan_counts_no_gradient_for_frozen_weights(tiny_recipe):
    from lowmem.planner import plan

    everything = plan(load_recipe(tiny_recipe(optim=OPTIMS["adamw"])))
    norms_only = plan(load_recipe(tiny_recipe(model={**TINY_MODEL, "trainable": ["*norm*"]}, optim=OPTIMS["adamw"])))
    assert everything.totals["gradients"] > 0 and everything.totals["optimizer_states"] > 0
    assert 0 < norms_only.totals["gradients"] < everything.totals["gradients"] / 20
    adapters = plan(load_recipe(tiny_recipe(model={**TINY_MODEL, "lora": LORA}, optim=OPTIMS["adamw"])))
    assert 0 < adapters.totals["gradients"] < everything.totals["gradients"] / 20  # the adapters' only
